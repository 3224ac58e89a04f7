"""Softmax attention of a few queries per row over a KV cache, on CPU: the decode and tree-verify
steps' attention (decode_attention.cc says why XLA:CPU's own is slow there).

`decode_attention(q, k, v, visible)` is `jaxaccel.layers.attention.dot_product_attention`'s
function (no score soft-capping) for float32 q [B, n, Hq, D] with n <= MAX_QUERIES over k, v
[B, T, Hkv, D]. `available()` says whether this machine runs it (jaxaccel.cpu_kernels.build). The
decoders' copy of the model uses it (jaxaccel.model.decode_layout); nothing else needs to call it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxaccel.cpu_kernels.build import registered

TARGET = "jaxaccel_decode_attention"
MAX_QUERIES = 16  # a tree's nodes at most; a prefill's many queries are XLA's batched dots' work


def available() -> bool:
    """True once the kernel is built and registered with XLA:CPU (the first call builds it)."""
    return registered("decode_attention.cc", TARGET)


def runs(q_bnhd: jax.Array, k_bthd: jax.Array) -> bool:
    """Whether attention with these operands runs on the kernel: float32, at most MAX_QUERIES queries a row."""
    return q_bnhd.dtype == k_bthd.dtype == jnp.float32 and q_bnhd.shape[1] <= MAX_QUERIES


def decode_attention(q_bnhd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array, visible_bnt: jax.Array) -> jax.Array:
    """Softmax(q k^T / sqrt(D)) v over the keys `visible_bnt` [B, n, T] marks -> [B, n, Hq, D] float32."""
    b, n, hq, d = q_bnhd.shape
    if (k_bthd.ndim != 4 or k_bthd.shape != v_bthd.shape or k_bthd.shape[0] != b or k_bthd.shape[3] != d
            or hq % k_bthd.shape[2] or visible_bnt.shape != (b, n, k_bthd.shape[1])
            or not runs(q_bnhd, k_bthd) or v_bthd.dtype != jnp.float32):
        raise ValueError(f"decode_attention takes float32 q [B, n<={MAX_QUERIES}, Hq, D], k and v [B, T, Hkv, D] "
                         f"and visible [B, n, T]; got q {q_bnhd.dtype}{list(q_bnhd.shape)}, k "
                         f"{k_bthd.dtype}{list(k_bthd.shape)}, v {v_bthd.dtype}{list(v_bthd.shape)}, visible "
                         f"{list(visible_bnt.shape)}")
    out = jax.ShapeDtypeStruct(q_bnhd.shape, jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(q_bnhd, k_bthd, v_bthd, visible_bnt.astype(bool))
