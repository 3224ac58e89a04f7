"""`linear` attention kind: gated linear attention with decays kept in log space.

    o_t = sum_{s <= t} exp(G_t - G_s) * (q_t · k_s) * v_s,   q scaled by D**-0.5,
    G_t = g_1 + ... + g_t,   g = log-decay <= 0 per (batch, time, head)

`gated`: g = logsigmoid(x W_g + b_g) / GATE_TEMPERATURE (data-dependent, GLA-style); `fixed`: one
rate per head, g_h = log(1 - 2**-(5 + h)) (RetNet-style). No RoPE (the decay orders tokens).
Training and prefill use the chunk-parallel form; decoding keeps the state
S = sum_s exp(G_last - G_s) k_s v_s^T [B, H, D, D] (jaxaccel.caches.linear_state), so memory is
constant in the context length. Tree verification: node i sees the committed state and its
ancestors j among the new tokens, exp(P_i - P_j) (q_i · k_j) v_j + exp(P_i) q_i S, where P sums g
along the node's path (a masked quadratic form over the n tree tokens).
Every exponent is a later-minus-earlier cumulative log-decay (<= 0): nothing overflows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxaccel.caches.linear_state import LinearStateEntry
from jaxaccel.config import AttentionSpec, ModelConfig, resolve_attention_impl
from jaxaccel.layers.attention import Attention
from jaxaccel.layers.context import ForwardContext
from jaxaccel.layers.linear import dense

GATE_TEMPERATURE = 16.0  # keeps initial decays close to 1 (GLA's normaliser)


def chunked_linear_attention(q_bthd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array, log_decay_bth: jax.Array,
                             chunk_size: int) -> jax.Array:
    """The definition above in O(T C D + T D^2): exact within chunks, a [D, D] state across them."""
    b, t, h, d = q_bthd.shape
    c = chunk_size
    pad = -t % c
    def chunks(x):
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((b, (t + pad) // c, c) + x.shape[2:])
    q, k, v, g = chunks(q_bthd * d**-0.5), chunks(k_bthd), chunks(v_bthd), chunks(log_decay_bth)  # [B, N, C, ...]
    cum_bnch = jnp.cumsum(g, axis=2)  # within each chunk
    causal = jnp.tril(jnp.ones((c, c), bool))
    decay = jnp.exp(jnp.where(causal[None, None, :, :, None], cum_bnch[:, :, :, None] - cum_bnch[:, :, None, :], -jnp.inf))
    intra = jnp.einsum("bnihd,bnjhd,bnijh,bnjhe->bnihe", q, k, decay, v)
    total_bnh = cum_bnch[:, :, -1]
    to_end = jnp.exp(total_bnh[:, :, None] - cum_bnch)  # decay from each token to its chunk's end
    chunk_update = jnp.einsum("bnjh,bnjhd,bnjhe->bnhde", to_end, k, v)

    def carry(state_bhde, xs):  # the state entering each chunk
        update_bhde, total_bh = xs
        return jnp.exp(total_bh)[:, :, None, None] * state_bhde + update_bhde, state_bhde

    _, entering_nbhde = jax.lax.scan(carry, jnp.zeros((b, h, d, d), jnp.float32),
                                     (chunk_update.transpose(1, 0, 2, 3, 4), total_bnh.transpose(1, 0, 2)))
    inter = jnp.einsum("bnih,bnihd,nbhde->bnihe", jnp.exp(cum_bnch), q, entering_nbhde)
    out = (intra + inter).reshape(b, t + pad, h, d)[:, :t]
    return out.astype(v_bthd.dtype)


def masked_linear_attention(q_bnhd: jax.Array, k_bnhd: jax.Array, v_bnhd: jax.Array, log_decay_bnh: jax.Array,
                            mask_bnn: jax.Array, state_bhde: jax.Array | None = None) -> jax.Array:
    """n tokens whose mask is ancestor-closed (causal, or a tree's ancestor mask), after `state`."""
    d = q_bnhd.shape[-1]
    q = q_bnhd.astype(jnp.float32) * d**-0.5
    path_bnh = jnp.einsum("bij,bjh->bih", mask_bnn.astype(jnp.float32), log_decay_bnh.astype(jnp.float32))
    exponent = jnp.where(mask_bnn[:, :, :, None], path_bnh[:, :, None] - path_bnh[:, None, :], -jnp.inf)
    scores = jnp.einsum("bihd,bjhd->bijh", q, k_bnhd.astype(jnp.float32)) * jnp.exp(exponent)
    out = jnp.einsum("bijh,bjhe->bihe", scores, v_bnhd.astype(jnp.float32))
    if state_bhde is not None:
        out = out + state_contribution(q, path_bnh, state_bhde)
    return out.astype(v_bnhd.dtype)


def state_contribution(q_scaled_bnhd: jax.Array, path_bnh: jax.Array, state_bhde: jax.Array) -> jax.Array:
    """exp(P_i) q_i S: what the committed tokens add to new token i (P_i: log-decay since them)."""
    return jnp.einsum("bnh,bnhd,bhde->bnhe", jnp.exp(path_bnh), q_scaled_bnhd, state_bhde)


def linear_attention_step(q_bhd, k_bhd, v_bhd, log_decay_bh, state_bhde):
    """One recurrent step: S <- exp(g) S + k v^T, o = (q D**-0.5) S. Returns (o [B, H, D], S)."""
    d = q_bhd.shape[-1]
    state = (jnp.exp(log_decay_bh.astype(jnp.float32))[:, :, None, None] * state_bhde
             + jnp.einsum("bhd,bhe->bhde", k_bhd.astype(jnp.float32), v_bhd.astype(jnp.float32)))
    return jnp.einsum("bhd,bhde->bhe", q_bhd.astype(jnp.float32) * d**-0.5, state), state


def fixed_log_decays(num_heads: int) -> np.ndarray:
    """RetNet's per-head rates, log(1 - 2**-(5 + h))."""
    return np.log1p(-(2.0 ** -(5.0 + np.arange(num_heads)))).astype(np.float32)


class LinearAttention(Attention):
    """`linear` attention (module doc): chunk-parallel in training and prefill, a recurrent state in decoding."""
    def __init__(self, config: ModelConfig, layer_index: int = 0, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs, layer_index=layer_index)
        spec = config.attention or AttentionSpec(kinds=("linear",))
        self.chunk_size, self.decay = spec.chunk_size, spec.decay
        self.gate_proj = (dense(config, config.hidden_size, config.num_heads, ("embed", "heads"), True, rngs)
                          if spec.decay == "gated" else None)

    def log_decay(self, x_bnd: jax.Array) -> jax.Array:
        """g [B, n, H] <= 0."""
        if self.gate_proj is None:
            return jnp.broadcast_to(jnp.asarray(fixed_log_decays(self.num_heads)), x_bnd.shape[:2] + (self.num_heads,))
        return jax.nn.log_sigmoid(self.gate_proj(x_bnd).astype(jnp.float32)) / GATE_TEMPERATURE

    def __call__(self, x_bnd: jax.Array, ctx: ForwardContext, entry: LinearStateEntry | None = None):
        b, n, _ = x_bnd.shape
        q, k, v = self.project_qkv(x_bnd, ctx.positions_bn, rope=False)
        group = self.num_heads // self.num_kv_heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        g = self.log_decay(x_bnd)
        state = None if entry is None else entry.state
        if ctx.causal and n > 1:
            impl = resolve_attention_impl(self.config.attention_impl, kernel="chunked_linear_attention",
                                          head_dim=self.head_dim)
            if impl == "pallas":
                from pallas_kernels import chunked_linear_attention as kernel  # the same definition
                out = kernel(q, k, v, g, self.chunk_size)
            else:
                out = chunked_linear_attention(q, k, v, g, self.chunk_size)
            if state is not None:
                scaled = q.astype(jnp.float32) * self.head_dim**-0.5
                out = out + state_contribution(scaled, jnp.cumsum(g, axis=1), state).astype(out.dtype)
        else:
            out = masked_linear_attention(q, k, v, g, ctx.mask_bnn, state)
        new_entry = None if entry is None else entry.with_pending(k, v, g)
        return self.o_proj(out.reshape(b, n, self.num_heads * self.head_dim)), new_entry


def create_linear_entry(config: ModelConfig, layer_index: int, batch_size: int, max_len: int, dtype) -> LinearStateEntry:
    """The empty recurrent state of a linear layer."""
    return LinearStateEntry.create(batch_size, config.num_heads, config.resolved_head_dim)
