"""Tree-verify / decode attention for TPU (Mosaic): the same function as `decode_attention`.

Mosaic tiles the last two dimensions of every block in (8, 128) units, so the GPU kernel's
[B, T, Hkv, D] blocks with a squeezed head axis do not lower. Here the cache is viewed as
[B, T, Hkv * D] (a free reshape) and a program reads kv head h's keys as the lane block h of
width D, so D must be a multiple of 128 (the head size of Llama, Qwen and Mistral) unless there
is one kv head. Transposing the cache to [B, Hkv, T, D] instead would copy it on every step.

Layout of the work: grid (batch row, kv head, key block); the key-block axis is the reduction
("arbitrary"), carried in VMEM scratch by an online softmax and normalised at the last block, so
no split-K combine is needed (a TensorCore runs its grid in order). kv_end_b arrives by scalar
prefetch: blocks at or past it are not computed, and their index map repeats the last visible
block, which the pipeline does not fetch again, so a short row in a long cache reads only its own
length. The g = Hq / Hkv query heads of a kv head loop inside the program over one shared
[n_pad, block_t] mask tile (n padded to a multiple of 8 sublanes), so the mask is never repeated
per head. Numerics follow `decode_attention_reference`: float32 scores scaled after the dot,
masked scores MASKED, float32 softmax state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import LANES, MASKED, KernelArgumentError, cdiv, check_head_dim

SUBLANES = 8


def _decode_kernel(end_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, m_sc, l_sc, acc_sc, *,
                   block_t: int, seq_len: int, scale: float):
    """One (row b, kv head h, key block i): fold block i into the running softmax of every group."""
    b, i = pl.program_id(0), pl.program_id(2)

    @pl.when(i == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    start = i * block_t

    @pl.when(start < end_ref[b])
    def _visit():
        k_td = k_ref[...]
        slot_t1 = start + lax.broadcasted_iota(jnp.int32, (block_t, 1), 0)
        v_td = v_ref[...]
        v_td = jnp.where(slot_t1 < seq_len, v_td, jnp.zeros_like(v_td))  # an edge block's tail may hold NaN
        visible_rt = mask_ref[...] != 0
        for j in range(q_ref.shape[0]):  # the query heads sharing this kv head
            s_rt = lax.dot_general(q_ref[j], k_td, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            s_rt = jnp.where(visible_rt, s_rt * scale, MASKED)
            m_prev = m_sc[j]
            m_new = jnp.maximum(m_prev, jnp.max(s_rt, axis=1, keepdims=True))
            p_rt = jnp.exp(s_rt - m_new)
            alpha = jnp.exp(m_prev - m_new)
            l_sc[j] = alpha * l_sc[j] + jnp.sum(p_rt, axis=1, keepdims=True)
            pv_rd = lax.dot_general(p_rt.astype(v_td.dtype), v_td, (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
            acc_sc[j] = alpha * acc_sc[j] + pv_rd
            m_sc[j] = m_new

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(l == 0, 1.0, l)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_t", "interpret"))
def decode_attention_tpu(q_bnhd, k_bthd, v_bthd, visible_bnt, kv_end_b, *, block_t: int = 512,
                         interpret=False):
    """TPU flash-decoding; arguments as `decode_attention` (already checked there), block_t a
    multiple of 128. `interpret`: False on a TPU, or `pltpu.InterpretParams()` to simulate one."""
    b, n, hq, d = q_bnhd.shape
    t, hkv = k_bthd.shape[1], k_bthd.shape[2]
    check_head_dim("decode_attention", d, hkv, tpu=True)
    if block_t % LANES:
        raise KernelArgumentError(f"block_t must be a multiple of {LANES} on TPU, got {block_t}")
    g = hq // hkv
    n_pad = cdiv(n, SUBLANES) * SUBLANES
    block_t = t if t <= block_t else block_t  # a short (streaming) cache is one whole block
    blocks = cdiv(t, block_t)

    q_bkgnd = q_bnhd.reshape(b, n, hkv, g, d).transpose(0, 2, 3, 1, 4)
    q_bkgnd = jnp.pad(q_bkgnd, ((0, 0), (0, 0), (0, 0), (0, n_pad - n), (0, 0)))
    per_head = visible_bnt.ndim == 4
    mask_bknt = visible_bnt if per_head else visible_bnt[:, None]  # [B, Hkv or 1, n, T]
    mask_bknt = jnp.pad(mask_bknt.astype(jnp.int32), ((0, 0), (0, 0), (0, n_pad - n), (0, blocks * block_t - t)))
    end_b = jnp.clip(kv_end_b.astype(jnp.int32), 0, t)

    def key_block(bi, i, end_ref):  # past the row's end: the last visible block again (not re-fetched)
        last = lax.div(jnp.maximum(end_ref[bi], 1) - 1, block_t)  # lax.div: no sign op for Mosaic
        return jnp.minimum(i, last)

    kv_spec = pl.BlockSpec((None, block_t, d), lambda bi, h, i, end: (bi, key_block(bi, i, end), h))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, hkv, blocks),
        in_specs=[
            pl.BlockSpec((None, None, g, n_pad, d), lambda bi, h, i, end: (bi, h, 0, 0, 0)),
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, None, n_pad, block_t),
                         lambda bi, h, i, end: (bi, h if per_head else 0, 0, key_block(bi, i, end))),
        ],
        out_specs=pl.BlockSpec((None, None, g, n_pad, d), lambda bi, h, i, end: (bi, h, 0, 0, 0)),
        scratch_shapes=[pltpu.VMEM((g, n_pad, 1), jnp.float32), pltpu.VMEM((g, n_pad, 1), jnp.float32),
                        pltpu.VMEM((g, n_pad, d), jnp.float32)],
    )
    kernel = functools.partial(_decode_kernel, block_t=block_t, seq_len=t, scale=d**-0.5)
    out_bkgnd = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hkv, g, n_pad, d), v_bthd.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="decode_attention_tpu",
    )(end_b, q_bkgnd, k_bthd.reshape(b, t, hkv * d), v_bthd.reshape(b, t, hkv * d), mask_bknt)
    return out_bkgnd[:, :, :, :n].transpose(0, 3, 1, 2, 4).reshape(b, n, hq, d)

