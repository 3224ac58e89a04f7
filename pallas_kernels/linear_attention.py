"""Chunked linear attention with per-step decay (gated linear attention), forward in Pallas.

Definition (shared with the attention-kinds helper in jaxaccel/layers/):
    o_t = sum_{s <= t} exp(G_t - G_s) * (q_t . k_s) * v_s,   q scaled by D**-0.5,
    G_t = sum_{u <= t} g_u,  g = log-decay <= 0 per (batch, time, head).
q, k, v [B, T, H, D]; log_decay [B, T, H].

Chunked form (chunk length C, G local to the chunk, S the [D, D] state carried across chunks):
    o_i  = exp(G_i) q_i S  +  sum_{j <= i in chunk} exp(G_i - G_j) (q_i . k_j) v_j
    S'   = exp(G_C) S  +  sum_j exp(G_C - G_j) k_j^T v_j
Every exponent is a difference G_later - G_earlier <= 0 (or G_i <= 0), so nothing ever
overflows: decays stay in log space and we never exponentiate a positive number.

The kernel runs one program per (batch, head) and walks the chunks in order with the state in
registers (float32). The chunk-local cumulative sums are computed in XLA beforehand (a tiny
[B, T, H] op). Backward: `jax.custom_vjp` whose backward differentiates the pure-JAX chunked
form (`chunked_linear_attention_reference`) — documented and tested, not a kernel.

Hardware: GPU through Pallas's Triton lowering (compiler params from `_common.compiler_params`;
jax 0.10's default Mosaic GPU lowering wants warpgroup-style kernels). The lowering to Triton IR
is checked on CPU by exporting for "cuda" (tests/test_pallas_lowering.py); on an H200 (jax 0.11.2)
the tests passed with the kernel compiled for the GPU (benchmarks/h200/kernel_tests.log). TPU: the forward hands over to `chunked_linear_attention_tpu`
(pallas_kernels/linear_attention_tpu.py: [B, H, T, D] blocks, chunk_size a multiple of 8),
tested under the TPU interpreter and exported for "tpu" on CPU, not run on a TPU. Correctness
was checked in interpret mode on CPU only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (KernelArgumentError, cdiv, check_head_dim, check_positive, check_rank,
                                     compiler_params, default_interpret, tpu_route)


def linear_attention_quadratic(q_bthd, k_bthd, v_bthd, log_decay_bth) -> jax.Array:
    """The definition, computed directly in O(T^2) (float32): the test oracle."""
    q = q_bthd.astype(jnp.float32) * q_bthd.shape[-1] ** -0.5
    g_bht = jnp.cumsum(log_decay_bth.astype(jnp.float32), axis=1).transpose(0, 2, 1)
    t = q.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    diff = jnp.where(causal, g_bht[:, :, :, None] - g_bht[:, :, None, :], -jnp.inf)
    scores = jnp.einsum("bthd,bshd->bhts", q, k_bthd.astype(jnp.float32)) * jnp.exp(diff)
    return jnp.einsum("bhts,bshd->bthd", scores, v_bthd.astype(jnp.float32)).astype(v_bthd.dtype)


def chunk_local_cumsum(log_decay_bth, chunk):
    b, t, h = log_decay_bth.shape
    g = log_decay_bth.astype(jnp.float32).reshape(b, t // chunk, chunk, h)
    return jnp.cumsum(g, axis=2).reshape(b, t, h)


def pad_time(x, t_pad):
    return jnp.pad(x, [(0, 0), (0, t_pad - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def chunked_linear_attention_reference(q_bthd, k_bthd, v_bthd, log_decay_bth, chunk_size: int = 64) -> jax.Array:
    """The chunked algorithm in pure JAX (lax.scan over chunks, float32 state)."""
    b, t, h, d = q_bthd.shape
    c = chunk_size
    t_pad = cdiv(t, c) * c
    q, k, v = (pad_time(x.astype(jnp.float32), t_pad) for x in (q_bthd, k_bthd, v_bthd))
    q = q * d**-0.5
    g = chunk_local_cumsum(pad_time(log_decay_bth, t_pad), c)
    split = lambda x: x.reshape(b, t_pad // c, c, *x.shape[2:]).swapaxes(0, 1)  # [N, B, C, ...]
    causal = jnp.tril(jnp.ones((c, c), bool))

    def step(state_bhde, chunk):
        q_c, k_c, v_c, g_c = chunk  # [B, C, H, D] x3, [B, C, H]
        g_bhc = g_c.transpose(0, 2, 1)
        decay_bhij = jnp.exp(jnp.where(causal, g_bhc[:, :, :, None] - g_bhc[:, :, None, :], -jnp.inf))
        scores = jnp.einsum("bihd,bjhd->bhij", q_c, k_c) * decay_bhij
        intra = jnp.einsum("bhij,bjhd->bihd", scores, v_c)
        inter = jnp.einsum("bihd,bhde->bihe", q_c * jnp.exp(g_c)[..., None], state_bhde)
        g_end = g_bhc[:, :, -1]
        k_to_end = k_c * jnp.exp(g_end[:, None, :] - g_c)[..., None]
        state = jnp.exp(g_end)[..., None, None] * state_bhde + jnp.einsum("bjhd,bjhe->bhde", k_to_end, v_c)
        return state, intra + inter

    state0 = jnp.zeros((b, h, d, v_bthd.shape[-1]), jnp.float32)
    _, o = lax.scan(step, state0, (split(q), split(k), split(v), split(g)))
    return o.swapaxes(0, 1).reshape(b, t_pad, h, -1)[:, :t].astype(v_bthd.dtype)


def _linear_kernel(q_ref, k_ref, v_ref, g_ref, o_ref, *, chunk, num_chunks, scale):
    causal = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0) >= lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)

    def visit(c, state_de):
        start = pl.multiple_of(c * chunk, chunk)
        q = q_ref[pl.ds(start, chunk), :].astype(jnp.float32) * scale
        k = k_ref[pl.ds(start, chunk), :].astype(jnp.float32)
        v = v_ref[pl.ds(start, chunk), :].astype(jnp.float32)
        g = g_ref[pl.ds(start, chunk)]  # chunk-local cumulative log decay, <= 0, non-increasing
        g_end = g_ref[pl.ds(start + chunk - 1, 1)]  # [1]
        decay_ij = jnp.exp(jnp.where(causal, g[:, None] - g[None, :], -jnp.inf))
        scores_ij = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * decay_ij
        out = jnp.dot(scores_ij, v, preferred_element_type=jnp.float32)
        out = out + jnp.dot(q * jnp.exp(g)[:, None], state_de, preferred_element_type=jnp.float32)
        o_ref[pl.ds(start, chunk), :] = out.astype(o_ref.dtype)
        k_to_end = k * jnp.exp(g_end - g)[:, None]
        update = lax.dot_general(k_to_end, v, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return jnp.exp(g_end)[:, None] * state_de + update

    d, e = q_ref.shape[1], v_ref.shape[1]
    lax.fori_loop(0, num_chunks, visit, jnp.zeros((d, e), jnp.float32))


def _forward(q, k, v, log_decay, chunk, interpret):
    if tpu_route(interpret):
        from pallas_kernels.linear_attention_tpu import chunked_linear_attention_tpu

        return chunked_linear_attention_tpu(q, k, v, log_decay, chunk, interpret=interpret)
    b, t, h, d = q.shape
    e = v.shape[-1]
    t_pad = cdiv(t, chunk) * chunk
    q, k, v = (pad_time(x, t_pad) for x in (q, k, v))
    g_bht = chunk_local_cumsum(pad_time(log_decay, t_pad), chunk).transpose(0, 2, 1)
    kernel = functools.partial(_linear_kernel, chunk=chunk, num_chunks=t_pad // chunk, scale=d**-0.5)
    o = pl.pallas_call(
        kernel,
        grid=(b, h),
        in_specs=[pl.BlockSpec((None, t_pad, None, d), lambda i, j: (i, 0, j, 0)),
                  pl.BlockSpec((None, t_pad, None, d), lambda i, j: (i, 0, j, 0)),
                  pl.BlockSpec((None, t_pad, None, e), lambda i, j: (i, 0, j, 0)),
                  pl.BlockSpec((None, None, t_pad), lambda i, j: (i, j, 0))],
        out_specs=pl.BlockSpec((None, t_pad, None, e), lambda i, j: (i, 0, j, 0)),
        out_shape=jax.ShapeDtypeStruct((b, t_pad, h, e), v.dtype),
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="chunked_linear_attention",
    )(q, k, v, g_bht)
    return o[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _linear(q, k, v, log_decay, chunk, interpret):
    return _forward(q, k, v, log_decay, chunk, interpret)


def _linear_fwd(q, k, v, log_decay, chunk, interpret):
    return _forward(q, k, v, log_decay, chunk, interpret), (q, k, v, log_decay)


def _linear_bwd(chunk, interpret, residuals, d_out):
    _, pullback = jax.vjp(functools.partial(chunked_linear_attention_reference, chunk_size=chunk), *residuals)
    return pullback(d_out)


_linear.defvjp(_linear_fwd, _linear_bwd)


def chunked_linear_attention(q_bthd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array, log_decay_bth: jax.Array,
                             chunk_size: int = 64, *, interpret: bool | None = None) -> jax.Array:
    """Decayed linear attention (see the module doc) with the forward in a Pallas kernel.

    q_bthd, k_bthd [B, T, H, D]; v_bthd [B, T, H, Dv]; log_decay_bth [B, T, H] (<= 0, not
    checked on traced values). T need not be a multiple of chunk_size. Returns [B, T, H, Dv]
    in v's dtype. The backward differentiates `chunked_linear_attention_reference`. On TPU (or
    with interpret=pltpu.InterpretParams()) the forward is the TPU kernel (chunk_size % 8 == 0).
    """
    check_rank("q_bthd", q_bthd, 4, "[B, T, H, D]")
    check_rank("k_bthd", k_bthd, 4, "[B, T, H, D]")
    check_rank("v_bthd", v_bthd, 4, "[B, T, H, Dv]")
    check_rank("log_decay_bth", log_decay_bth, 3, "[B, T, H]")
    check_positive("chunk_size", chunk_size)
    if q_bthd.shape != k_bthd.shape or v_bthd.shape[:3] != q_bthd.shape[:3]:
        raise KernelArgumentError(f"q {q_bthd.shape}, k {k_bthd.shape}, v {v_bthd.shape} must share B, T, H (and q, k D)")
    if log_decay_bth.shape != q_bthd.shape[:3]:
        raise KernelArgumentError(f"log_decay_bth must be [B, T, H] = {q_bthd.shape[:3]}, got {log_decay_bth.shape}")
    interpret = default_interpret() if interpret is None else interpret
    check_head_dim("chunked_linear_attention", q_bthd.shape[-1], interpret)
    return _linear(q_bthd, k_bthd, v_bthd, log_decay_bth, chunk_size, interpret)
