"""Chunked linear attention for TPU (Mosaic): the same function as `chunked_linear_attention`.

Mosaic tiles the last two dimensions of every block in (8, 128) units, so the GPU kernel's
[B, T, H, D] blocks with a squeezed head axis do not lower. Training and prefill can afford one
transpose of q, k, v to [B, H, T, D] (the splash attention route does the same), after which a
chunk is a [C, D] block whose trailing dimension is whole.

Grid (batch, head, chunk), the chunk axis in order ("arbitrary") with the [D, Dv] state in VMEM
scratch (float32). The chunk-local cumulative log decay G comes twice, as a column [C, 1] and as
a row [1, C], so the decay matrix G_i - G_j needs no in-kernel transpose; every exponent is a
difference later - earlier <= 0, as in the GPU kernel (see linear_attention's module doc).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import SUBLANES, KernelArgumentError, cdiv
from pallas_kernels.linear_attention import chunk_local_cumsum, pad_time


def _linear_kernel(q_ref, k_ref, v_ref, g_col_ref, g_row_ref, o_ref, state_sc, *, chunk: int, scale: float):
    @pl.when(pl.program_id(2) == 0)
    def _init():
        state_sc[...] = jnp.zeros(state_sc.shape, jnp.float32)

    q = q_ref[...].astype(jnp.float32) * scale
    k = k_ref[...].astype(jnp.float32)
    v = v_ref[...].astype(jnp.float32)
    g_i1, g_1j = g_col_ref[...], g_row_ref[...]  # [C, 1], [1, C]: <= 0, non-increasing
    lane_1j = lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    g_end = jnp.sum(jnp.where(lane_1j == chunk - 1, g_1j, 0.0), axis=1, keepdims=True)  # [1, 1]
    causal = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0) >= lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    decay_ij = jnp.exp(jnp.where(causal, g_i1 - g_1j, -jnp.inf))
    scores_ij = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * decay_ij
    state_de = state_sc[...]
    out = jnp.dot(scores_ij, v, preferred_element_type=jnp.float32)
    out = out + jnp.dot(q * jnp.exp(g_i1), state_de, preferred_element_type=jnp.float32)
    o_ref[...] = out.astype(o_ref.dtype)
    k_to_end = k * jnp.exp(g_end - g_i1)
    update = lax.dot_general(k_to_end, v, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    state_sc[...] = jnp.exp(g_end) * state_de + update


@functools.partial(jax.jit, static_argnames=("chunk_size", "interpret"))
def chunked_linear_attention_tpu(q_bthd, k_bthd, v_bthd, log_decay_bth, chunk_size: int = 64, *, interpret=False):
    """TPU forward; arguments as `chunked_linear_attention` (checked there), chunk_size a multiple
    of 8. `interpret`: False on a TPU, or `pltpu.InterpretParams()` to simulate one. No backward:
    `chunked_linear_attention` differentiates the pure-JAX reference."""
    if chunk_size % SUBLANES:
        raise KernelArgumentError(f"chunk_size must be a multiple of {SUBLANES} on TPU, got {chunk_size}")
    b, t, h, d = q_bthd.shape
    e = v_bthd.shape[-1]
    c = chunk_size
    t_pad = cdiv(t, c) * c
    n = t_pad // c
    to_bhtd = lambda x: pad_time(x, t_pad).transpose(0, 2, 1, 3)
    g_bhnc = chunk_local_cumsum(pad_time(log_decay_bth, t_pad), c).transpose(0, 2, 1).reshape(b, h, n, c)
    chunk_of = lambda width: pl.BlockSpec((None, None, c, width), lambda bi, hi, ci: (bi, hi, ci, 0))
    o_bhtd = pl.pallas_call(
        functools.partial(_linear_kernel, chunk=c, scale=d**-0.5),
        grid=(b, h, n),
        in_specs=[chunk_of(d), chunk_of(d), chunk_of(e),
                  pl.BlockSpec((None, None, None, c, 1), lambda bi, hi, ci: (bi, hi, ci, 0, 0)),
                  pl.BlockSpec((None, None, None, 1, c), lambda bi, hi, ci: (bi, hi, ci, 0, 0))],
        out_specs=chunk_of(e),
        out_shape=jax.ShapeDtypeStruct((b, h, t_pad, e), v_bthd.dtype),
        scratch_shapes=[pltpu.VMEM((d, e), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="chunked_linear_attention_tpu",
    )(to_bhtd(q_bthd), to_bhtd(k_bthd), to_bhtd(v_bthd), g_bhnc[..., None], g_bhnc[..., None, :])
    return o_bhtd.transpose(0, 2, 1, 3)[:, :t]
