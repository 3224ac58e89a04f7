"""Tree-verify / decode attention for TPU (Mosaic): the same function as `decode_attention`.

Mosaic tiles the last two dimensions of every block in (8, 128) units, so the GPU kernel's
[B, T, Hkv, D] blocks with a squeezed head axis do not lower, and transposing the cache to
[B, Hkv, T, D] would copy it on every step. Here the cache is viewed as [B, T, Hkv * D] (a free
reshape) and a program reads a lane block of W = lcm(D, 128) lanes, which holds P = W / D whole
kv heads (the whole row, W = Hkv * D, where lcm(D, 128) does not divide it): D = 128 reads one
head per program, D = 64 two, any head size tiles. A query head is placed in its kv head's D
lanes of a W-lane row with zeros elsewhere, so its dot with the W-lane keys is its own scores;
its output is the matching D lanes of probabilities times the W-lane values (the other lanes are
dropped after the kernel). For P > 1 that is P times the dot FLOPs, on a pass that is bound by
reading the cache.

Layout of the work: grid (batch row, kv-head block, key block); the key-block axis is the
reduction ("arbitrary"), carried in VMEM scratch by an online softmax and normalised at the last
block, so no split-K combine is needed (a TensorCore runs its grid in order). kv_end_b arrives by
scalar prefetch: blocks at or past it are not computed, and their index map repeats the last
visible block, which the pipeline does not fetch again, so a short row in a long cache reads
only its own length. The P * g query heads of a program loop inside it over [n_pad, block_t]
mask tiles (n padded to a multiple of 8 sublanes; one tile shared by all heads, or one per kv
head), so the mask is never repeated per query head. Numerics follow
`decode_attention_reference`: float32 scores scaled after the dot, masked scores MASKED,
float32 softmax state.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import LANES, MASKED, SUBLANES, KernelArgumentError, cdiv


def heads_per_block(head_dim: int, num_kv_heads: int) -> int:
    """P: kv heads per program, so that P * head_dim lanes are a legal Mosaic block of the row."""
    width = math.lcm(head_dim, LANES)
    return width // head_dim if (num_kv_heads * head_dim) % width == 0 else num_kv_heads


def _decode_kernel(end_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, m_sc, l_sc, acc_sc, *,
                   block_t: int, seq_len: int, scale: float, group: int):
    """One (row b, kv-head block, key block i): fold block i into the running softmax of every
    query head of the block (slot s: kv head s // group of the block)."""
    b, i = pl.program_id(0), pl.program_id(2)

    @pl.when(i == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    start = i * block_t

    @pl.when(start < end_ref[b])
    def _visit():
        k_tw = k_ref[...]
        slot_t1 = start + lax.broadcasted_iota(jnp.int32, (block_t, 1), 0)
        v_tw = v_ref[...]
        v_tw = jnp.where(slot_t1 < seq_len, v_tw, jnp.zeros_like(v_tw))  # an edge block's tail may hold NaN
        for s in range(q_ref.shape[0]):
            visible_rt = mask_ref[min(s // group, mask_ref.shape[0] - 1)] != 0  # shared tile, or the head's
            s_rt = lax.dot_general(q_ref[s], k_tw, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            s_rt = jnp.where(visible_rt, s_rt * scale, MASKED)
            m_prev = m_sc[s]
            m_new = jnp.maximum(m_prev, jnp.max(s_rt, axis=1, keepdims=True))
            p_rt = jnp.exp(s_rt - m_new)
            alpha = jnp.exp(m_prev - m_new)
            l_sc[s] = alpha * l_sc[s] + jnp.sum(p_rt, axis=1, keepdims=True)
            pv_rw = lax.dot_general(p_rt.astype(v_tw.dtype), v_tw, (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
            acc_sc[s] = alpha * acc_sc[s] + pv_rw
            m_sc[s] = m_new

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
    if block_t % LANES:
        raise KernelArgumentError(f"block_t must be a multiple of {LANES} on TPU, got {block_t}")
    g = hq // hkv
    p = heads_per_block(d, hkv)
    nb, w = hkv // p, p * d
    n_pad = cdiv(n, SUBLANES) * SUBLANES
    block_t = t if t <= block_t else block_t  # a short (streaming) cache is one whole block
    blocks = cdiv(t, block_t)

    # query slot s = j * g + gi of block c: query head (c * P + j) * g + gi, in lanes j*D..(j+1)*D
    q_bcjgnd = q_bnhd.reshape(b, n, nb, p, g, d).transpose(0, 2, 3, 4, 1, 5)
    q_bcjgnd = jnp.pad(q_bcjgnd, ((0, 0),) * 4 + ((0, n_pad - n), (0, 0)))
    placed = jnp.eye(p, dtype=q_bnhd.dtype)[:, None, None, :, None]  # [j, 1, 1, j', 1]
    q_bcsnw = (q_bcjgnd[:, :, :, :, :, None, :] * placed).reshape(b, nb, p * g, n_pad, w)
    per_head = visible_bnt.ndim == 4
    mask_bknt = visible_bnt if per_head else visible_bnt[:, None]  # [B, Hkv or 1, n, T]
    mask_bknt = jnp.pad(mask_bknt.astype(jnp.int32), ((0, 0), (0, 0), (0, n_pad - n), (0, blocks * block_t - t)))
    mask_heads = p if per_head else 1
    mask_bcjnt = mask_bknt.reshape(b, -1, mask_heads, n_pad, blocks * block_t)
    end_b = jnp.clip(kv_end_b.astype(jnp.int32), 0, t)

    def key_block(bi, i, end_ref):  # past the row's end: the last visible block again (not re-fetched)
        last = lax.div(jnp.maximum(end_ref[bi], 1) - 1, block_t)  # lax.div: no sign op for Mosaic
        return jnp.minimum(i, last)

    kv_spec = pl.BlockSpec((None, block_t, w), lambda bi, c, i, end: (bi, key_block(bi, i, end), c))
    slots_spec = pl.BlockSpec((None, None, p * g, n_pad, w), lambda bi, c, i, end: (bi, c, 0, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, nb, blocks),
        in_specs=[
            slots_spec,
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, None, mask_heads, n_pad, block_t),
                         lambda bi, c, i, end: (bi, c if per_head else 0, 0, 0, key_block(bi, i, end))),
        ],
        out_specs=slots_spec,
        scratch_shapes=[pltpu.VMEM((p * g, n_pad, 1), jnp.float32), pltpu.VMEM((p * g, n_pad, 1), jnp.float32),
                        pltpu.VMEM((p * g, n_pad, w), jnp.float32)],
    )
    kernel = functools.partial(_decode_kernel, block_t=block_t, seq_len=t, scale=d**-0.5, group=g)
    out_bcsnw = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, nb, p * g, n_pad, w), v_bthd.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="decode_attention_tpu",
    )(end_b, q_bcsnw, k_bthd.reshape(b, t, hkv * d), v_bthd.reshape(b, t, hkv * d), mask_bcjnt)
    # keep each query head's own D lanes: slot (j, gi) reads lanes j*D..(j+1)*D
    out_bcjgnjd = out_bcsnw.reshape(b, nb, p, g, n_pad, p, d)
    out_bcgndj = jnp.diagonal(out_bcjgnjd, axis1=2, axis2=5)
    out_bcjgnd = out_bcgndj.transpose(0, 1, 5, 2, 3, 4)[:, :, :, :, :n]
    return out_bcjgnd.reshape(b, hkv, g, n, d).transpose(0, 3, 1, 2, 4).reshape(b, n, hq, d)
