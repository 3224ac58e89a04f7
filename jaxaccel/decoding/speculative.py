"""Speculative decoding: draft a token tree with heads, verify it in one forward pass, keep the
accepted path — one jitted `lax.while_loop` per generate call, static shapes throughout.

Each iteration, per row: the drafter lays out a tree whose root is the base model's own next
token (already emitted); the base model scores all tree nodes in one `forward` (tree positions,
ancestor mask) over the cache; `verify_tree` walks the tree (lossless at any temperature) and
emits the accepted drafts plus one token of the base model's; the cache keeps only the accepted
path's K/V (`KVCache.keep`); the drafter commits what it needs of the verified hidden states.
At temperature 0 the output is greedy decoding's, token for token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxaccel.cache import KVCache
from jaxaccel.decoding.drafters import DraftState, make_drafter
from jaxaccel.decoding.prompts import pad_prompts
from jaxaccel.decoding.result import DecodeResult, stop_id_array
from jaxaccel.decoding.sampling import Greedy, Policy
from jaxaccel.decoding.tree import DEFAULT_TREES, DynamicTree, Tree
from jaxaccel.decoding.timing import median_seconds
from jaxaccel.decoding.verify import TypicalAcceptance, verify_tree
from jaxaccel.model import Transformer


@struct.dataclass
class SpecState:
    """What the speculative while_loop carries from one step to the next."""
    cache: KVCache  # the base's: committed through the last accepted node
    draft: DraftState
    result: DecodeResult
    root_b: jax.Array  # [B] the base's next token: emitted, not yet in the cache
    key: jax.Array
    step: jax.Array  # forward passes so far (prefill is pass 0)


def spec_prefill(graphdef, params, heads_graphdef, heads_params, cache: KVCache, tokens_bs, lengths_b, stop_ids,
                 key, *, policy: Policy, drafter, max_new_tokens: int) -> SpecState:
    """Prefills the prompts, draws each row's first token and starts the drafter."""
    model, heads = nnx.merge(graphdef, params), nnx.merge(heads_graphdef, heads_params)
    out = model.prefill(tokens_bs, lengths_b, cache)
    last_b1d = jnp.take_along_axis(out.hidden, (lengths_b - 1)[:, None, None], axis=1)
    first_b = sample_policy(policy)(model.logits(last_b1d)[:, 0], jax.random.fold_in(key, 0))
    result = DecodeResult.empty(tokens_bs.shape[0], max_new_tokens).append(
        first_b[:, None], jnp.ones_like(lengths_b), stop_ids)
    draft = drafter.start(model, heads, out.hidden, tokens_bs, lengths_b, first_b, cache.max_len)
    return SpecState(cache=out.cache, draft=draft, result=result, root_b=first_b, key=key, step=jnp.int32(1))


def spec_step(model: Transformer, heads, state: SpecState, stop_ids, *, policy, drafter) -> SpecState:
    """Draft, verify, accept, commit: one base forward pass for every row."""
    draft_bn, tree = drafter.draft(model, heads, state.draft, state.root_b)
    positions_bn = state.cache.lengths[:, None] + tree.depth_bn
    out = model.forward(draft_bn, positions_bn, cache=state.cache, mask=tree.mask_bnn)
    verdict = verify_tree(tree, draft_bn, out.logits, policy, jax.random.fold_in(state.key, state.step))
    active_b = ~state.result.done_b
    return SpecState(
        cache=out.cache.keep(verdict.path_bd, jnp.where(active_b, verdict.num_nodes_b, 0)),
        draft=drafter.commit(model, heads, state.draft, out.hidden, draft_bn, verdict, state.cache.lengths),
        result=state.result.append(verdict.emitted(draft_bn), verdict.num_nodes_b, stop_ids),
        root_b=verdict.bonus_b, key=state.key, step=state.step + 1)


def spec_loop(graphdef, params, heads_graphdef, heads_params, state: SpecState, stop_ids, *, policy,
              drafter) -> SpecState:
    """Steps until every row is done."""
    model, heads = nnx.merge(graphdef, params), nnx.merge(heads_graphdef, heads_params)
    step = functools.partial(spec_step, model, heads, stop_ids=stop_ids, policy=policy, drafter=drafter)
    return jax.lax.while_loop(lambda s: ~jnp.all(s.result.done_b), step, state)


def spec_chunk(graphdef, params, heads_graphdef, heads_params, state: SpecState, stop_ids, max_steps, *, policy,
               drafter) -> SpecState:
    """`spec_loop` cut short after `max_steps` steps (an array: any count reuses one compilation)."""
    model, heads = nnx.merge(graphdef, params), nnx.merge(heads_graphdef, heads_params)
    step = functools.partial(spec_step, model, heads, stop_ids=stop_ids, policy=policy, drafter=drafter)
    until = state.step + max_steps
    return jax.lax.while_loop(lambda s: ~jnp.all(s.result.done_b) & (s.step < until), step, state)


def spec_single_step(graphdef, params, heads_graphdef, heads_params, state: SpecState, stop_ids, *, policy,
                     drafter) -> SpecState:
    """One iteration outside the loop (for timing a tree's step cost)."""
    model, heads = nnx.merge(graphdef, params), nnx.merge(heads_graphdef, heads_params)
    return spec_step(model, heads, state, stop_ids, policy=policy, drafter=drafter)


spec_prefill_jit = jax.jit(spec_prefill, static_argnums=(0, 2), static_argnames=("policy", "drafter", "max_new_tokens"),
                           donate_argnames=("cache",))
spec_loop_jit = jax.jit(spec_loop, static_argnums=(0, 2), static_argnames=("policy", "drafter"),
                        donate_argnames=("state",))
spec_chunk_jit = jax.jit(spec_chunk, static_argnums=(0, 2), static_argnames=("policy", "drafter"),
                         donate_argnames=("state",))
spec_single_step_jit = jax.jit(spec_single_step, static_argnums=(0, 2), static_argnames=("policy", "drafter"))


def sample_policy(policy) -> Policy:
    """The policy that draws the base's own tokens (typical acceptance draws greedily)."""
    return Greedy() if isinstance(policy, TypicalAcceptance) else policy


class SpeculativeDecoder:
    """A base model and its draft heads, split once into (graphdef, params), ready to decode.

    `tree`: a Tree, a DynamicTree (EAGLE-2, eagle heads), or None for the head kind's default.
    """

    def __init__(self, model: Transformer, heads, tree: Tree | DynamicTree | None = None):
        self.config = model.config
        self.graphdef, self.params = nnx.split(model)
        self.heads_graphdef, self.heads_params = nnx.split(heads)
        kind, depth = heads.config.kind, heads.config.num_heads
        if tree is None:  # the kind's default, cut to the depth the heads can draft
            tree = Tree(tuple(p for p in DEFAULT_TREES[kind].paths if len(p) <= depth or kind == "eagle"))
        elif kind != "eagle" and tree.depth > depth:
            raise ValueError(f"the tree is {tree.depth} levels deep, but these {kind} heads draft only {depth}")
        self.drafter = make_drafter(kind, tree)

    @property
    def tree(self) -> Tree | DynamicTree:
        """The token tree drafted every step."""
        return self.drafter.tree

    def start(self, prompts: Sequence[Sequence[int]], *, policy, max_new_tokens: int,
              stop_tokens: Sequence[int] = (), seed: int = 0) -> tuple[SpecState, jax.Array]:
        """Pads the prompts into a cache and prefills them (compiled per prompt bucket): the loop's first state."""
        # The cache also holds one tree's worth of unaccepted K/V past the generated tokens.
        tokens_bs, lengths_b, cache_len = pad_prompts(prompts, max_new_tokens + self.tree.num_nodes,
                                                      self.config.max_position_embeddings)
        stop_ids = stop_id_array(stop_tokens)
        cache = KVCache.create(self.config, len(prompts), cache_len)
        state = spec_prefill_jit(self.graphdef, self.params, self.heads_graphdef, self.heads_params, cache,
                                 jnp.asarray(tokens_bs), jnp.asarray(lengths_b), stop_ids, jax.random.key(seed),
                                 policy=policy, drafter=self.drafter, max_new_tokens=max_new_tokens)
        return state, stop_ids

    def finish(self, state: SpecState, stop_ids, *, policy) -> SpecState:
        """Runs the jitted while_loop from `start`'s state until every row is done."""
        return spec_loop_jit(self.graphdef, self.params, self.heads_graphdef, self.heads_params, state, stop_ids,
                             policy=policy, drafter=self.drafter)

    def advance(self, state: SpecState, stop_ids, *, policy, max_steps: int) -> SpecState:
        """Runs at most `max_steps` draft-verify steps (fewer once every row is done; the input state is
        donated): `finish` in pieces, for streaming."""
        return spec_chunk_jit(self.graphdef, self.params, self.heads_graphdef, self.heads_params, state, stop_ids,
                              jnp.int32(max_steps), policy=policy, drafter=self.drafter)

    def compile(self, prompts, *, policy, max_new_tokens: int, stop_tokens: Sequence[int] = ()) -> None:
        """Compiles prefill and loop for this prompt bucket, so that timed calls exclude compilation."""
        state, stop_ids = self.start(prompts, policy=policy, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens)
        spec_loop_jit.lower(self.graphdef, self.params, self.heads_graphdef, self.heads_params, state, stop_ids,
                            policy=policy, drafter=self.drafter).compile()

    def step_seconds(self, prompts: Sequence[Sequence[int]], *, policy=Greedy(), max_new_tokens: int = 8) -> float:
        """Median seconds of one draft + verify + accept step right after prefilling `prompts`."""
        state, stop_ids = self.start(prompts, policy=policy, max_new_tokens=max_new_tokens)
        return median_seconds(lambda: spec_single_step_jit(self.graphdef, self.params, self.heads_graphdef,
                                                           self.heads_params, state, stop_ids, policy=policy,
                                                           drafter=self.drafter), repeats=7)

    def generate(self, prompts: Sequence[Sequence[int]], *, policy=Greedy(), max_new_tokens: int,
                 stop_tokens: Sequence[int] = (), seed: int = 0) -> DecodeResult:
        """Decodes a batch of token-id prompts; the same contract as AutoregressiveDecoder.generate."""
        state, stop_ids = self.start(prompts, policy=policy, max_new_tokens=max_new_tokens,
                                     stop_tokens=stop_tokens, seed=seed)
        return jax.device_get(self.finish(state, stop_ids, policy=policy).result)
