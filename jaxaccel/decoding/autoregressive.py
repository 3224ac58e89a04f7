"""Plain autoregressive decoding: one prefill, then one `lax.while_loop` of one-token steps.

Both phases are plain `jax.jit` functions of `(graphdef, params)` from `nnx.split` with the cache
(prefill) or the whole loop state (loop) donated, so the cache is updated in place. Shapes depend
only on (batch, prompt bucket, max_new_tokens): prompts of new lengths in the same bucket reuse
the compiled code. A speculative loop reuses `prefill_and_sample`, `DecodeResult` (buffers and stop
rule), the policies and the prompt bucketing; only its step differs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import Mesh

from jaxaccel.cache import KVCache
from jaxaccel.config import ModelConfig
from jaxaccel.decoding.prompts import pad_prompts
from jaxaccel.decoding.result import DecodeResult, stop_id_array
from jaxaccel.decoding.sampling import Greedy, Policy
from jaxaccel.model import Transformer, decode_layout
from jaxaccel.sharding import cache_sharding, shard_state, sharding_for


@struct.dataclass
class LoopState:
    """What the autoregressive while_loop carries: the cache, the outputs so far, the next input token, the key."""
    cache: KVCache  # prompt + generated tokens committed, except the last generated one
    result: DecodeResult
    last_b: jax.Array  # [B] int32: each row's latest token, the input of the next step
    key: jax.Array  # the run's key; step t draws with fold_in(key, t)
    step: jax.Array  # int32 scalar: forward passes so far (prefill is pass 0)


def prefill_and_sample(model: Transformer, cache: KVCache, tokens_bs: jax.Array, lengths_b: jax.Array,
                       stop_ids: jax.Array, key: jax.Array, policy: Policy, max_new_tokens: int):
    """Runs right-padded prompts through an empty cache and draws each row's first token (with
    fold_in(key, 0)). Returns (cache, result holding the first tokens, first_b, hidden_bd), where
    hidden_bd is the final hidden state at each prompt's last token (what draft heads read)."""
    out = model.prefill(tokens_bs, lengths_b, cache)
    # Only the last prompt token's logits are needed; XLA drops the other positions' LM head.
    hidden_b1d = jnp.take_along_axis(out.hidden, (lengths_b - 1)[:, None, None], axis=1)
    first_b = policy(model.logits(hidden_b1d)[:, 0], jax.random.fold_in(key, 0))
    result = DecodeResult.empty(tokens_bs.shape[0], max_new_tokens)
    result = result.append(first_b[:, None], jnp.ones_like(lengths_b), stop_ids)
    return out.cache, result, first_b, hidden_b1d[:, 0]


def prefill(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, tokens_bs: jax.Array,
            lengths_b: jax.Array, stop_ids: jax.Array, key: jax.Array, *, policy: Policy,
            max_new_tokens: int) -> LoopState:
    """The loop's initial state: prompts prefilled, first tokens drawn."""
    cache, result, first_b, _ = prefill_and_sample(nnx.merge(graphdef, params), cache, tokens_bs, lengths_b,
                                                   stop_ids, key, policy, max_new_tokens)
    return LoopState(cache=cache, result=result, last_b=first_b, key=key, step=jnp.int32(1))


def decode_step(model: Transformer, state: LoopState, stop_ids: jax.Array, policy: Policy) -> LoopState:
    """One forward pass of each row's last token; done rows run along but commit nothing."""
    out = model.forward(state.last_b[:, None], cache=state.cache)
    next_b = policy(out.logits[:, 0], jax.random.fold_in(state.key, state.step))
    active_b = ~state.result.done_b
    return LoopState(
        cache=out.cache.advance(active_b.astype(jnp.int32)),
        result=state.result.append(next_b[:, None], jnp.ones_like(next_b), stop_ids),
        last_b=next_b, key=state.key, step=state.step + 1)


def decode_loop(graphdef: nnx.GraphDef, params: nnx.State, state: LoopState, stop_ids: jax.Array, *,
                policy: Policy) -> LoopState:
    """Steps until every row is done (a stop token, or its output buffer is full)."""
    model = nnx.merge(graphdef, params)
    return jax.lax.while_loop(lambda s: ~jnp.all(s.result.done_b),
                              functools.partial(decode_step, model, stop_ids=stop_ids, policy=policy), state)


def decode_chunk(graphdef: nnx.GraphDef, params: nnx.State, state: LoopState, stop_ids: jax.Array,
                 max_steps: jax.Array, *, policy: Policy) -> LoopState:
    """`decode_loop` cut short after `max_steps` steps (an array: any count reuses one compilation),
    so that a caller can read tokens between chunks. Chunks in a row equal one whole loop."""
    model = nnx.merge(graphdef, params)
    until = state.step + max_steps
    return jax.lax.while_loop(lambda s: ~jnp.all(s.result.done_b) & (s.step < until),
                              functools.partial(decode_step, model, stop_ids=stop_ids, policy=policy), state)


prefill_jit = jax.jit(prefill, static_argnums=0, static_argnames=("policy", "max_new_tokens"),
                      donate_argnames=("cache",))
decode_loop_jit = jax.jit(decode_loop, static_argnums=0, static_argnames=("policy",), donate_argnames=("state",))
decode_chunk_jit = jax.jit(decode_chunk, static_argnums=0, static_argnames=("policy",), donate_argnames=("state",))


@functools.lru_cache(maxsize=64)
def _cache_shapes(config: ModelConfig, batch_size: int, cache_len: int) -> KVCache:
    return jax.eval_shape(lambda: KVCache.create(config, batch_size, cache_len))


class AutoregressiveDecoder:
    """A model split once into (graphdef, params), optionally sharded on a mesh, ready to decode.

    With a mesh, parameters and caches follow the rules table of jaxaccel.sharding (e.g.
    `tensor` splits heads, `data` splits the batch).
    """

    def __init__(self, model: Transformer, mesh: Mesh | None = None):
        self.config = model.config
        self.mesh = mesh
        # One device: the weights' decode-time layouts (jaxaccel.model.decode_layout), as the speculative
        # decoders verify with, so that AR and speculative rows multiply by the same kernels.
        self.graphdef, params = nnx.split(model if mesh is not None else decode_layout(model))
        self.params = params if mesh is None else shard_state(params, mesh)

    def _place(self, x, logical: tuple):
        x = jnp.asarray(x)
        return x if self.mesh is None else jax.device_put(x, sharding_for(logical, x.shape, self.mesh))

    def empty_cache(self, batch_size: int, cache_len: int) -> KVCache:
        """A fresh cache, allocated directly with its mesh sharding (never gathered on one device)."""
        shapes = _cache_shapes(self.config, batch_size, cache_len)

        def zeros(x):  # per-layer buffers [B, T, H, D] like a KV cache; anything else split by batch
            where = None
            if self.mesh is not None:
                where = (cache_sharding(self.mesh, x.shape) if x.ndim == 4
                         else sharding_for(("batch",) + (None,) * (x.ndim - 1), x.shape, self.mesh))
            return jnp.zeros(x.shape, x.dtype, device=where)

        return jax.tree.map(zeros, shapes)

    def start(self, prompts: Sequence[Sequence[int]], *, policy: Policy, max_new_tokens: int,
              stop_tokens: Sequence[int] = (), seed: int = 0) -> tuple[LoopState, jax.Array]:
        """Pads the prompts to their bucket and prefills: (loop state, stop ids) for `finish`."""
        tokens_bs, lengths_b, cache_len = pad_prompts(prompts, max_new_tokens, self.config.max_position_embeddings)
        stop_ids = stop_id_array(stop_tokens)
        state = prefill_jit(self.graphdef, self.params, self.empty_cache(len(prompts), cache_len),
                            self._place(tokens_bs, ("batch", None)), self._place(lengths_b, ("batch",)),
                            stop_ids, jax.random.key(seed), policy=policy, max_new_tokens=max_new_tokens)
        return state, stop_ids

    def compile(self, prompts: Sequence[Sequence[int]], *, policy: Policy, max_new_tokens: int,
                stop_tokens: Sequence[int] = ()) -> None:
        """Compiles prefill and loop for these prompts' shape bucket (running only the prefill), so
        that timing later calls excludes compilation."""
        state, stop_ids = self.start(prompts, policy=policy, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens)
        decode_loop_jit.lower(self.graphdef, self.params, state, stop_ids, policy=policy).compile()

    def finish(self, state: LoopState, stop_ids: jax.Array, *, policy: Policy) -> LoopState:
        """Runs the decode loop to the end (the input state is donated)."""
        return decode_loop_jit(self.graphdef, self.params, state, stop_ids, policy=policy)

    def advance(self, state: LoopState, stop_ids: jax.Array, *, policy: Policy, max_steps: int) -> LoopState:
        """Runs at most `max_steps` decode steps (fewer once every row is done; the input state is
        donated): `finish` in pieces, for streaming."""
        return decode_chunk_jit(self.graphdef, self.params, state, stop_ids, jnp.int32(max_steps), policy=policy)

    def generate(self, prompts: Sequence[Sequence[int]], *, policy: Policy = Greedy(), max_new_tokens: int,
                 stop_tokens: Sequence[int] = (), seed: int = 0) -> DecodeResult:
        """Decodes a batch of token-id prompts (ragged lengths allowed); stops each row at its
        first stop token or after max_new_tokens."""
        state, stop_ids = self.start(prompts, policy=policy, max_new_tokens=max_new_tokens,
                                     stop_tokens=stop_tokens, seed=seed)
        return jax.device_get(self.finish(state, stop_ids, policy=policy).result)


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, policy: Policy = Greedy(),
             max_new_tokens: int, stop_tokens: Sequence[int] = (), seed: int = 0,
             mesh: Mesh | None = None) -> DecodeResult:
    """One-shot `AutoregressiveDecoder(model, mesh).generate(...)`; the result holds numpy arrays."""
    return AutoregressiveDecoder(model, mesh).generate(prompts, policy=policy, max_new_tokens=max_new_tokens,
                                                       stop_tokens=stop_tokens, seed=seed)
