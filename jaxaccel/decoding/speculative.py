"""Speculative decoding: draft a token tree, verify it in one forward pass, keep the accepted
path — one jitted `lax.while_loop` per generate call, static shapes throughout.

Each iteration, per row: the drafter (any jaxaccel.drafters protocol object: trained heads,
prompt lookup, Token Recycling, ...) lays out a tree whose root is the base model's own next
token (already emitted); the base model scores all tree nodes in one `forward` (tree positions,
ancestor mask) over the cache; `verify_tree` walks the tree (lossless at any temperature) and
emits the accepted drafts plus one token of the base model's; the cache keeps only the accepted
path's K/V (`KVCache.keep`); the drafter commits what it needs of the verify pass. The loop
never asks which drafter it runs. At temperature 0 the output is greedy decoding's, token for token.
At temperature > 0 a drafter that can sample its drafts (the protocol's optional `sample_draft`)
draws them from its own distribution, and the walk takes the q-aware rule.
A drafter that learns across calls (the protocol's optional `carry`: Token Recycling's table) starts
each call of a decoder from what the last one left it; `SpeculativeDecoder.reset()` forgets it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxaccel.cache import KVCache
from jaxaccel.decoding.prompts import pad_prompts
from jaxaccel.decoding.result import DecodeResult, stop_id_array
from jaxaccel.decoding.sampling import Greedy, Policy, Sampler
from jaxaccel.decoding.tree import DynamicTree, Tree
from jaxaccel.decoding.timing import decode_step_seconds
from jaxaccel.decoding.verify import TypicalAcceptance, verify_tree
from jaxaccel.drafters import Drafter, Prefill, Verified, make_drafter
from jaxaccel.drafters.protocol import carries, samples_drafts
from jaxaccel.model import Transformer, decode_layout


@struct.dataclass
class SpecState:
    """What the speculative while_loop carries from one step to the next."""
    cache: KVCache  # the base's: committed through the last accepted node
    draft: Any  # the drafter's own state pytree
    result: DecodeResult
    root_b: jax.Array  # [B] the base's next token: emitted, not yet in the cache
    key: jax.Array
    step: jax.Array  # forward passes so far (prefill is pass 0)


def merge_parts(graphdef, params, module_graphdef, module_params):
    """The base model and the drafter's module (None for drafters without parameters)."""
    module = None if module_graphdef is None else nnx.merge(module_graphdef, module_params)
    return nnx.merge(graphdef, params), module


def spec_prefill(graphdef, params, module_graphdef, module_params, cache: KVCache, tokens_bs, lengths_b, stop_ids,
                 key, carried=None, *, policy: Policy, drafter, max_new_tokens: int) -> SpecState:
    """Prefills the prompts, draws each row's first token and starts the drafter (from `carried`,
    what its last call left, for a drafter that carries)."""
    model, module = merge_parts(graphdef, params, module_graphdef, module_params)
    out = model.forward(tokens_bs, cache=cache, capture=base_layers(drafter), empty_cache=True)
    out = out.replace(cache=out.cache.advance(lengths_b))
    last_b1d = jnp.take_along_axis(out.hidden, (lengths_b - 1)[:, None, None], axis=1)
    first_b = sample_policy(policy)(model.logits(last_b1d)[:, 0], jax.random.fold_in(key, 0))
    result = DecodeResult.empty(tokens_bs.shape[0], max_new_tokens).append(
        first_b[:, None], jnp.ones_like(lengths_b), stop_ids)
    prefill = Prefill(hidden_bsd=out.hidden, tokens_bs=tokens_bs, lengths_b=lengths_b, first_b=first_b,
                      cache_len=cache.max_len, captured_bskd=out.captured)
    draft = (drafter.start(model, module, prefill) if carried is None
             else drafter.start(model, module, prefill, carried))
    return SpecState(cache=out.cache, draft=draft, result=result, root_b=first_b, key=key, step=jnp.int32(1))


def draft_and_verify(model: Transformer, module, state: SpecState, *, policy, drafter):
    """A step before it commits anything: the draft, the base's forward over its tree, the verdict."""
    key = jax.random.fold_in(state.key, state.step)
    if isinstance(policy, Sampler) and samples_drafts(drafter):  # drafts drawn from q: the q-aware rule
        key, draft_key = jax.random.split(key)
        draft = drafter.sample_draft(model, module, state.draft, state.root_b, state.cache, policy, draft_key)
    else:
        draft = drafter.draft(model, module, state.draft, state.root_b, state.cache)
    positions_bn = state.cache.lengths[:, None] + draft.tree.depth_bn
    out = model.forward(draft.tokens_bn, positions_bn, cache=state.cache, mask=draft.tree.mask_bnn,
                        capture=base_layers(drafter))
    return draft, out, verify_tree(draft.tree, draft.tokens_bn, out.logits, policy, key, draft.q_bnv)


def spec_step(model: Transformer, module, state: SpecState, stop_ids, *, policy, drafter) -> SpecState:
    """Draft, verify, accept, commit: one base forward pass for every row."""
    draft, out, verdict = draft_and_verify(model, module, state, policy=policy, drafter=drafter)
    verified = Verified(draft=draft, hidden_bnd=out.hidden, logits_bnv=out.logits, verdict=verdict,
                        lengths_b=state.cache.lengths, captured_bnkd=out.captured)
    active_b = ~state.result.done_b
    return SpecState(
        cache=out.cache.keep(verdict.path_bd, jnp.where(active_b, verdict.num_nodes_b, 0)),
        draft=drafter.commit(model, module, state.draft, verified),
        result=state.result.append(verified.emitted_bd, verdict.num_nodes_b, stop_ids),
        root_b=verdict.bonus_b, key=state.key, step=state.step + 1)


def spec_loop(graphdef, params, module_graphdef, module_params, state: SpecState, stop_ids, *, policy,
              drafter) -> SpecState:
    """Steps until every row is done."""
    model, module = merge_parts(graphdef, params, module_graphdef, module_params)
    step = functools.partial(spec_step, model, module, stop_ids=stop_ids, policy=policy, drafter=drafter)
    return jax.lax.while_loop(lambda s: ~jnp.all(s.result.done_b), step, state)


def spec_chunk(graphdef, params, module_graphdef, module_params, state: SpecState, stop_ids, max_steps, *, policy,
               drafter) -> SpecState:
    """`spec_loop` cut short after `max_steps` steps (an array: any count reuses one compilation)."""
    model, module = merge_parts(graphdef, params, module_graphdef, module_params)
    step = functools.partial(spec_step, model, module, stop_ids=stop_ids, policy=policy, drafter=drafter)
    until = state.step + max_steps
    return jax.lax.while_loop(lambda s: ~jnp.all(s.result.done_b) & (s.step < until), step, state)


spec_prefill_jit = jax.jit(spec_prefill, static_argnums=(0, 2), static_argnames=("policy", "drafter", "max_new_tokens"),
                           donate_argnames=("cache",))
spec_loop_jit = jax.jit(spec_loop, static_argnums=(0, 2), static_argnames=("policy", "drafter"),
                        donate_argnames=("state",))
spec_chunk_jit = jax.jit(spec_chunk, static_argnums=(0, 2), static_argnames=("policy", "drafter"),
                         donate_argnames=("state",))
# Fresh buffers: the state it reads is donated to the next chunk.
drafter_carry_jit = jax.jit(lambda drafter, draft: drafter.carry(draft), static_argnums=0)


def base_layers(drafter) -> tuple[int, ...]:
    """The base layers whose outputs the drafter reads (`capture`; EAGLE-3's low/middle/high), or none."""
    return tuple(getattr(drafter, "capture", ()))


def sample_policy(policy) -> Policy:
    """The policy that draws the base's own tokens (typical acceptance draws greedily)."""
    return Greedy() if isinstance(policy, TypicalAcceptance) else policy


class SpeculativeDecoder:
    """A base model and a drafter, split once into (graphdef, params), ready to decode.

    `drafter`: any jaxaccel.drafters protocol object (`make_drafter("pld")`, `make_drafter(heads=...)`),
    or, for short, trained heads, whose kind's record builds the drafter with `tree` (a Tree, a
    DynamicTree for kinds that grow their own, or None for the record's default).
    """

    def __init__(self, model: Transformer, drafter: Drafter | nnx.Module, tree: Tree | DynamicTree | None = None):
        self.config = model.config
        self.graphdef, self.params = nnx.split(decode_layout(model))
        if isinstance(drafter, nnx.Module):
            drafter = make_drafter(heads=drafter, tree=tree)
        elif tree is not None:
            raise ValueError("pass the tree to make_drafter, not to SpeculativeDecoder, with a drafter")
        module = drafter.module
        # Parameters travel as arrays; the drafter, stripped of them, is a static jit argument.
        self.module_graphdef, self.module_params = (None, None) if module is None else nnx.split(decode_layout(module))
        self.drafter = drafter if module is None else dataclasses.replace(drafter, module=None)
        # What the drafter carries from call to call (None: it carries nothing).
        self.empty_carried = self.drafter.empty_carry(model) if carries(self.drafter) else None
        self.carried = self.empty_carried

    @property
    def tree(self) -> Tree | DynamicTree:
        """The token tree drafted every step."""
        return self.drafter.tree

    def reset(self) -> None:
        """Forgets what the drafter learned in earlier calls: the next call starts afresh."""
        self.carried = self.empty_carried

    def keep_carry(self, state: SpecState) -> SpecState:
        """Remembers what `state`'s drafter learned for the next call (done by `finish` and `advance`)."""
        if self.carried is not None:
            self.carried = drafter_carry_jit(self.drafter, state.draft)
        return state

    def start(self, prompts: Sequence[Sequence[int]], *, policy, max_new_tokens: int,
              stop_tokens: Sequence[int] = (), seed: int = 0) -> tuple[SpecState, jax.Array]:
        """Pads the prompts into a cache and prefills them (compiled per prompt bucket): the loop's first state."""
        # The cache also holds one tree's worth of unaccepted K/V past the generated tokens.
        tokens_bs, lengths_b, cache_len = pad_prompts(prompts, max_new_tokens + self.tree.num_nodes,
                                                      self.config.max_position_embeddings)
        stop_ids = stop_id_array(stop_tokens)
        cache = KVCache.create(self.config, len(prompts), cache_len)
        state = spec_prefill_jit(self.graphdef, self.params, self.module_graphdef, self.module_params, cache,
                                 jnp.asarray(tokens_bs), jnp.asarray(lengths_b), stop_ids, jax.random.key(seed),
                                 self.carried, policy=policy, drafter=self.drafter, max_new_tokens=max_new_tokens)
        return state, stop_ids

    def finish(self, state: SpecState, stop_ids, *, policy) -> SpecState:
        """Runs the jitted while_loop from `start`'s state until every row is done."""
        return self.keep_carry(spec_loop_jit(self.graphdef, self.params, self.module_graphdef, self.module_params,
                                             state, stop_ids, policy=policy, drafter=self.drafter))

    def advance(self, state: SpecState, stop_ids, *, policy, max_steps: int) -> SpecState:
        """Runs at most `max_steps` draft-verify steps (fewer once every row is done; the input state is
        donated): `finish` in pieces, for streaming."""
        return self.keep_carry(spec_chunk_jit(self.graphdef, self.params, self.module_graphdef, self.module_params,
                                              state, stop_ids, jnp.int32(max_steps), policy=policy,
                                              drafter=self.drafter))

    def compile(self, prompts, *, policy, max_new_tokens: int, stop_tokens: Sequence[int] = ()) -> None:
        """Compiles prefill and loop for this prompt bucket, so that timed calls exclude compilation."""
        state, stop_ids = self.start(prompts, policy=policy, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens)
        spec_loop_jit.lower(self.graphdef, self.params, self.module_graphdef, self.module_params, state, stop_ids,
                            policy=policy, drafter=self.drafter).compile()

    def step_seconds(self, prompts: Sequence[Sequence[int]], *, policy=Greedy(), steps: tuple[int, int] = (4, 20)) -> float:
        """Seconds of one draft + verify + accept step inside the compiled loop, right after prefilling
        `prompts` (timing.decode_step_seconds); what the drafter learns meanwhile is not kept."""
        carried = self.carried
        seconds = decode_step_seconds(self, prompts, policy=policy, steps=steps, tokens_per_step=self.tree.depth + 1)
        self.carried = carried
        return seconds

    def generate(self, prompts: Sequence[Sequence[int]], *, policy=Greedy(), max_new_tokens: int,
                 stop_tokens: Sequence[int] = (), seed: int = 0) -> DecodeResult:
        """Decodes a batch of token-id prompts; the same contract as AutoregressiveDecoder.generate."""
        state, stop_ids = self.start(prompts, policy=policy, max_new_tokens=max_new_tokens,
                                     stop_tokens=stop_tokens, seed=seed)
        return jax.device_get(self.finish(state, stop_ids, policy=policy).result)
