"""Attention over groups of KV heads that see different keys (duo's retrieval / streaming heads,
block_sparse's dense / Λ heads)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.layers.attention import MASKED, dot_product_attention


def query_heads(kv_heads: tuple[int, ...], group: int) -> np.ndarray:
    """The query heads served by these KV heads (GQA: kv head h serves h*group .. h*group+group-1)."""
    return np.asarray([h * group + g for h in kv_heads for g in range(group)], np.int32)


def masked_attention_per_head(q_bnhd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array,
                              visible_bknt: jax.Array) -> jax.Array:
    """Softmax attention with a mask per KV head [B, Hkv, n, t] (float32 scores), GQA."""
    b, n, hq, d = q_bnhd.shape
    hkv = k_bthd.shape[2]
    q_bnkgd = q_bnhd.reshape(b, n, hkv, hq // hkv, d)
    scores = jnp.einsum("bnkgd,btkd->bkgnt", q_bnkgd, k_bthd, preferred_element_type=jnp.float32)
    scores = jnp.where(visible_bknt[:, :, None], scores * d**-0.5, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bthd.dtype)
    return jnp.einsum("bkgnt,btkd->bnkgd", probs, v_bthd).reshape(b, n, hq, d)


def merge_groups(outputs: list[tuple[np.ndarray, jax.Array]], num_heads: int) -> jax.Array:
    """Puts per-group outputs [B, n, h_group, D] (with their query-head indices) back in head order."""
    order = np.concatenate([heads for heads, _ in outputs])
    out_bnhd = jnp.concatenate([o for _, o in outputs], axis=2)
    return out_bnhd[:, :, np.argsort(order)] if len(order) == num_heads else out_bnhd


def attend(q_bnhd, k_bthd, v_bthd, visible_bnt, impl: str = "xla") -> jax.Array:
    """Shared-mask softmax attention: the house function, so that its kernels apply (impl)."""
    return dot_product_attention(q_bnhd, k_bthd, v_bthd, visible_bnt, impl=impl)
