"""Grouped-query self-attention with one code path for training, prefill and tree verification.

Without a cache, the n tokens attend among themselves under `mask_bnn`. With a cache, their K/V
are first written at slots lengths[b].. of the row's cache, then every query attends over the
whole cache: committed slots (< lengths[b]) are all visible, the new slots follow `mask_bnn`.
Prefill is a causal mask over an empty cache, so its tokens attend among themselves only (the
cache written all the same); decoding one token is n = 1; verifying a token tree is n tree tokens
under the tree's ancestor mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel.config import ModelConfig, resolve_attention_impl
from jaxaccel.cache import write_rows
from jaxaccel.cpu_kernels import decode_attention as cpu_attention
from jaxaccel.layers.linear import dense
from jaxaccel.layers.norms import RMSNorm
from jaxaccel.layers.rope import apply_rope, inverse_frequencies
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention

MASKED = -1e30  # finite, so that a fully masked row gives a uniform (unused) result instead of NaN
CAUSAL_BLOCK = 128  # queries per block of a long causal pass on XLA (prefill): keys past a block are skipped


def dot_product_attention(q_bnhd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array,
                          visible_bnt: jax.Array, *, impl: str = "xla", softcap: float | None = None) -> jax.Array:
    """Softmax attention of n queries over t keys with GQA; scores (times head_dim ** -0.5) and
    softmax in float32. `softcap` c: scores -> tanh(scores / c) * c before masking (Gemma 2; XLA only).

    impl: "xla" (the einsums below), "pallas" (`pallas_kernels.decode_attention`, the same
    function; Pallas interpreter on CPU) or "auto" (see `config.resolve_attention_impl`).
    """
    if softcap is None and resolve_attention_impl(
            impl, kernel="decode_attention", head_dim=q_bnhd.shape[-1]) == "pallas":
        return decode_attention(q_bnhd, k_bthd, v_bthd, visible_bnt)
    b, n, hq, d = q_bnhd.shape
    t, hkv = k_bthd.shape[1:3]
    g = hq // hkv
    # Heads-major operands (the queries of a KV head's group as the rows m = (g, n)), so that XLA
    # computes the scores as [B, Hkv, m, T], the softmax axis minor: otherwise XLA:CPU's dot
    # writes them [Hkv, T, m] and transposes the whole [.., n, T] array (most of a long prefill).
    q_bkmd = q_bnhd.reshape(b, n, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * n, d)
    k_bktd, v_bktd = k_bthd.transpose(0, 2, 1, 3), v_bthd.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkmd,bktd->bkmt", q_bkmd, k_bktd, preferred_element_type=jnp.float32) * d**-0.5
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(visible_bnt[:, None, None], scores.reshape(b, hkv, g, n, t), MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bthd.dtype).reshape(b, hkv, g * n, t)
    out_bkmd = jnp.einsum("bkmt,bktd->bkmd", probs, v_bktd)
    return out_bkmd.reshape(b, hkv, g, n, d).transpose(0, 3, 1, 2, 4).reshape(b, n, hq, d)


def visible_keys(mask_bnn: jax.Array, positions_bn: jax.Array, lengths_b: jax.Array | None,
                 max_len: int | None, sliding_window: int | None) -> jax.Array:
    """Which keys each query sees: [B, n, n] without a cache, [B, n, T] over a cache of T slots."""
    if lengths_b is None:
        visible, key_pos = mask_bnn, positions_bn[:, None, :]
    else:
        slot_t = jnp.arange(max_len)
        offset_bt = slot_t[None, :] - lengths_b[:, None]  # index among the new tokens
        in_new_bt = (offset_bt >= 0) & (offset_bt < mask_bnn.shape[-1])
        index_bt = jnp.clip(offset_bt, 0, mask_bnn.shape[-1] - 1)
        tree_bnt = jnp.take_along_axis(mask_bnn, jnp.broadcast_to(index_bt[:, None, :], mask_bnn.shape[:2] + (max_len,)), axis=2)
        visible = (offset_bt < 0)[:, None, :] | (in_new_bt[:, None, :] & tree_bnt)
        key_pos = jnp.where(offset_bt < 0, slot_t[None, :], jnp.take_along_axis(positions_bn, index_bt, axis=1))[:, None, :]
    if sliding_window is not None:
        visible = visible & (positions_bn[:, :, None] - key_pos < sliding_window)
    return visible


class Attention(nnx.Module):
    """Multi-head attention with GQA, RoPE and optional q/k norms: the projections every softmax kind
    shares. Layer `layer_index`'s own settings: its sliding window (None: none) and rope base."""
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, layer_index: int = 0):
        d, hd = config.hidden_size, config.resolved_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.config, self.layer_index = config, layer_index
        self.cpu_kernel = False  # see `attend`
        self.sliding_window = config.layer_window(layer_index)
        # Scores are scaled by head_dim ** -0.5 where they are computed; query_pre_attn_scalar's
        # scale is reached by scaling q by the ratio (1 when it equals head_dim, as in small Gemmas).
        scalar = config.query_pre_attn_scalar
        self.query_factor = 1.0 if scalar is None else float((hd / scalar) ** 0.5)
        self.q_proj = dense(config, d, config.num_heads * hd, ("embed", "heads"), config.qkv_bias, rngs)
        self.k_proj = dense(config, d, config.num_kv_heads * hd, ("embed", "kv_heads"), config.qkv_bias, rngs)
        self.v_proj = dense(config, d, config.num_kv_heads * hd, ("embed", "kv_heads"), config.qkv_bias, rngs)
        self.o_proj = dense(config, config.num_heads * hd, d, ("heads", "embed"), config.o_bias, rngs)
        if config.qk_norm:
            pdt, offset = jnp.dtype(config.param_dtype), config.norm_offset
            self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps, param_dtype=pdt, offset=offset)
            self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps, param_dtype=pdt, offset=offset)
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(self, x_bnd: jax.Array, positions_bn: jax.Array, rope: bool = True):
        """q [B, n, H, D], k and v [B, n, Hkv, D]: the projections, q/k norms and (rope) RoPE that
        every softmax kind shares (linear attention takes them without RoPE)."""
        b, n, _ = x_bnd.shape
        q = self.q_proj(x_bnd).reshape(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(x_bnd).reshape(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_bnd).reshape(b, n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope:
            inv_freq = inverse_frequencies(self.config, self.layer_index)  # a trace-time constant
            q, k = apply_rope(q, positions_bn, inv_freq), apply_rope(k, positions_bn, inv_freq)
        if self.query_factor != 1.0:
            q = q * jnp.asarray(self.query_factor, q.dtype)
        return q, k, v

    def attend(self, q_bnhd, k_bthd, v_bthd, visible_bnt) -> jax.Array:
        """Softmax attention with this model's impl and score soft-capping; where that is XLA, a few
        queries a row run on the CPU kernel in a decoder's copy of the model (`cpu_kernel`, set by
        decode_layout)."""
        if (self.cpu_kernel and self.config.attn_softcap is None and cpu_attention.runs(q_bnhd, k_bthd)
                and resolve_attention_impl(self.config.attention_impl) == "xla"):  # an explicit "pallas" stays
            return cpu_attention.decode_attention(q_bnhd, k_bthd, v_bthd, visible_bnt)
        return dot_product_attention(q_bnhd, k_bthd, v_bthd, visible_bnt, impl=self.config.attention_impl,
                                     softcap=self.config.attn_softcap)

    def __call__(self, x_bnd: jax.Array, positions_bn: jax.Array, visible_bnt: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None = None, lengths_b: jax.Array | None = None,
                 causal: bool = False, among_new: bool = False):
        """Returns the attention output [B, n, d] and the layer's (keys, values) cache with the new K/V
        written. visible_bnt (from `visible_keys`): which of the n new keys, or of the cache's T
        slots, each query sees. among_new: the cache holds nothing before these tokens (a prefill),
        so they attend among themselves (visible_bnt is [B, n, n]) while their K/V are written.
        causal: visible_bnt is exactly the causal mask among the new tokens, so without a cache the
        Pallas impl may run flash attention (training) instead of the masked kernel, and a prefill on
        XLA skips the key blocks above the diagonal."""
        b, n, _ = x_bnd.shape
        q, k, v = self.project_qkv(x_bnd, positions_bn)
        if kv is not None:
            kv = (write_rows(kv[0], k, lengths_b), write_rows(kv[1], v, lengths_b))
            if not among_new:
                k, v = kv
        if causal and kv is None and self.config.attn_softcap is None and resolve_attention_impl(
                self.config.attention_impl, kernel="flash_attention", head_dim=self.head_dim) == "pallas":
            out = flash_attention(q, k, v, causal=True)
        elif (causal and among_new and n > CAUSAL_BLOCK
              and resolve_attention_impl(self.config.attention_impl) == "xla"):
            out = self.attend_causal_blocks(q, k, v, visible_bnt)
        else:
            out = self.attend(q, k, v, visible_bnt)
        return self.o_proj(out.reshape(b, n, self.num_heads * self.head_dim)), kv

    def attend_causal_blocks(self, q_bnhd, k_bnhd, v_bnhd, visible_bnn) -> jax.Array:
        """Causal attention among n tokens, CAUSAL_BLOCK queries at a time, each block over the keys up
        to its last query only: about half the work of the whole square, the same result."""
        n = q_bnhd.shape[1]
        outs = []
        for start in range(0, n, CAUSAL_BLOCK):
            stop = min(start + CAUSAL_BLOCK, n)
            outs.append(self.attend(q_bnhd[:, start:stop], k_bnhd[:, :stop], v_bnhd[:, :stop],
                                    visible_bnn[:, start:stop, :stop]))
        return jnp.concatenate(outs, axis=1)
