"""Tree-verify / decode attention over a KV cache: flash-decoding (split-K over T) in Pallas.

n >= 1 query tokens per row ([B, n, Hq, D]: n = 1 is plain decoding, n = tree size is tree
verification) attend over a cache [B, T, Hkv, D] under a boolean visibility mask [B, n, T] — the
mask `jaxaccel.layers.attention.visible_keys` already computes (committed slots < lengths[b], the
n new slots under the [n, n] tree mask, an optional sliding window). A streaming (sink + recent)
cache is just a smaller T with its own mask, so the same kernel serves it.

Layout of the work: one program per (batch row, kv head, block of rows, split of T). The g = Hq / Hkv
query heads that share a kv head are stacked with the n tokens into R = n * g rows, so each K/V block
is read from memory once per kv head (GQA) while R fits one block of rows (64: decoding and trees).
Each program walks its split block by block with an online softmax and writes an unnormalised
partial output plus its running max and sum; a combine step (plain JAX, tiny) merges the splits. Blocks at or past `kv_end_b[b]` (read off the mask, or given:
lengths + n) are never visited, so a short row in a long cache costs only its own length. Rows R (and a
head_dim below 16) are padded to power-of-two tiles of at least 16, Triton's smallest dot; the
cache is not padded along T (an edge block's slots past T are masked instead).

Numerics equal the reference (`decode_attention_reference`, the model's XLA path): scores and
softmax in float32, scores scaled after the dot, masked scores set to the finite MASKED = -1e30.
A query that sees no key at all (only padding rows) gets an unspecified finite value.

Hardware: GPU through Pallas's Triton lowering (compiler params from `_common.compiler_params`;
jax 0.10's default Mosaic GPU lowering wants warpgroup-style kernels). The lowering to Triton IR
is checked on CPU by exporting for "cuda" (tests/test_pallas_lowering.py); on an H200 (jax 0.11.2)
the tests passed with the kernel compiled for the GPU (benchmarks/h200/kernel_tests.log). Triton
wants a power-of-two head_dim (smaller than 16 is padded) and tiles that fit in shared memory
(`_fits_shared_memory`). TPU: `decode_attention` hands over to `decode_attention_tpu`
(pallas_kernels/decode_attention_tpu.py: 128-lane blocks of whole kv heads, scalar-prefetched
lengths), tested under the TPU interpreter and exported for "tpu" on CPU, not run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (MASKED, KernelArgumentError, cdiv, check_positive,
                                     check_head_dim, check_rank, compiler_params, default_interpret,
                                     tpu_route)
from pallas_kernels.decode_attention_tpu import decode_attention_tpu


def decode_attention_reference(q_bnhd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array,
                               visible_bnt: jax.Array) -> jax.Array:
    """Pure-JAX softmax attention with GQA; scores and softmax in float32 (the model's XLA path).

    visible_bnt: [B, n, T] shared by all heads, or [B, Hkv, n, T] per kv head."""
    b, n, hq, d = q_bnhd.shape
    hkv = k_bthd.shape[2]
    q_bnkgd = q_bnhd.reshape(b, n, hkv, hq // hkv, d)
    scores = jnp.einsum("bnkgd,btkd->bkgnt", q_bnkgd, k_bthd, preferred_element_type=jnp.float32)
    visible_bkgnt = visible_bnt[:, None, None] if visible_bnt.ndim == 3 else visible_bnt[:, :, None]
    scores = jnp.where(visible_bkgnt, scores * d**-0.5, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bthd.dtype)
    out_bnkgd = jnp.einsum("bkgnt,btkd->bnkgd", probs, v_bthd)
    return out_bnkgd.reshape(b, n, hq, d)


def _decode_kernel(end_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, m_ref, l_ref, *,
                   block_t: int, split_len: int, seq_len: int, scale: float):
    """One (row b, kv head h, row block r, split s): online softmax over the split's blocks below kv_end."""
    split_start = pl.program_id(3) * split_len
    visible_in_split = end_ref[0] - split_start
    num_blocks = jnp.clip((visible_in_split + block_t - 1) // block_t, 0, split_len // block_t)
    q_rd = q_ref[...]
    rows = q_rd.shape[0]

    def visit_block(i, carry):
        acc_rd, m_r, l_r = carry
        start = pl.multiple_of(i * block_t, block_t)
        k_td = k_ref[pl.ds(start, block_t), :]
        v_td = v_ref[pl.ds(start, block_t), :]
        visible_rt = mask_ref[:, pl.ds(start, block_t)] != 0
        s_rt = lax.dot_general(q_rd, k_td, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s_rt = jnp.where(visible_rt, s_rt * scale, MASKED)  # also hides garbage past T
        m_new = jnp.maximum(m_r, jnp.max(s_rt, axis=1))
        p_rt = jnp.exp(s_rt - m_new[:, None])
        alpha_r = jnp.exp(m_r - m_new)
        # slots past T (edge block padding) may hold anything, NaN included: 0 * NaN is NaN
        slot_t = split_start + start + lax.broadcasted_iota(jnp.int32, (block_t, 1), 0)
        v_td = jnp.where(slot_t < seq_len, v_td, jnp.zeros_like(v_td))
        pv_rd = lax.dot_general(p_rt.astype(v_td.dtype), v_td, (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return alpha_r[:, None] * acc_rd + pv_rd, m_new, alpha_r * l_r + jnp.sum(p_rt, axis=1)

    init = (jnp.zeros((rows, q_rd.shape[1]), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc_rd, m_r, l_r = lax.fori_loop(0, num_blocks, visit_block, init)
    o_ref[...] = acc_rd
    m_ref[...] = m_r
    l_ref[...] = l_r


def _combine_splits(o_bksrd, m_bksr, l_bksr):
    """Merges the per-split partial softmaxes; splits that visited no block carry m = -inf."""
    m_bkr = jnp.maximum(jnp.max(m_bksr, axis=2), MASKED)
    w_bksr = jnp.exp(m_bksr - m_bkr[:, :, None])
    l_bkr = jnp.sum(w_bksr * l_bksr, axis=2)
    o_bkrd = jnp.sum(w_bksr[..., None] * o_bksrd, axis=2)
    return o_bkrd / jnp.where(l_bkr == 0, 1.0, l_bkr)[..., None]


def _check_args(q_bnhd, k_bthd, v_bthd, visible_bnt, kv_end_b):
    check_rank("q_bnhd", q_bnhd, 4, "[B, n, Hq, D]")
    check_rank("k_bthd", k_bthd, 4, "[B, T, Hkv, D]")
    if k_bthd.shape != v_bthd.shape:
        raise KernelArgumentError(f"keys {k_bthd.shape} and values {v_bthd.shape} differ in shape")
    b, n, hq, d = q_bnhd.shape
    if k_bthd.shape[0] != b or k_bthd.shape[3] != d:
        raise KernelArgumentError(f"queries {q_bnhd.shape} and cache {k_bthd.shape} disagree on batch or head_dim")
    if hq % k_bthd.shape[2]:
        raise KernelArgumentError(f"query heads ({hq}) must be a multiple of kv heads ({k_bthd.shape[2]})")
    t, hkv = k_bthd.shape[1], k_bthd.shape[2]
    if visible_bnt.shape not in ((b, n, t), (b, hkv, n, t)):
        raise KernelArgumentError(f"visible_bnt must be [B, n, T] = {(b, n, t)} or per kv head [B, Hkv, n, T] = "
                                  f"{(b, hkv, n, t)}, got {visible_bnt.shape}")
    if kv_end_b is not None and kv_end_b.shape != (b,):
        raise KernelArgumentError(f"kv_end_b must be [B] = ({b},), got {kv_end_b.shape}")


# One program's tiles must fit the GPU's shared memory (227 KiB on Hopper), and what Triton asks for
# grows with the key block: measured on an H200 (benchmarks/h200/decode_tiles.py, its table in
# benchmarks/h200/decode_tiles.json), every tile compiled whose K block (block_t x head_dim) held at
# most 32 KiB, or 64 KiB for a 16-bit cache with at most 32 rows; larger ones asked for 228-848 KiB.
# Many rows (a prefill's n * g, a wide tree) are split into blocks of 64, each its own program.
MAX_ROWS_PER_PROGRAM = 64


def _fits_shared_memory(rows: int, block_t: int, d: int, itemsize: int) -> bool:
    k_block_bytes = block_t * d * itemsize
    return k_block_bytes <= (64 if itemsize <= 2 and rows <= 32 else 32) * 1024


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


@functools.partial(jax.jit, static_argnames=("block_t", "num_splits", "interpret"))
def _decode_attention_pallas(q_bnhd, k_bthd, v_bthd, visible_bnt, kv_end_b, *, block_t, num_splits, interpret):
    b, n, hq, d = q_bnhd.shape
    t, hkv = k_bthd.shape[1], k_bthd.shape[2]
    g = hq // hkv
    rows = n * g
    rows_pad = max(16, _next_power_of_2(rows))  # Triton dots want power-of-two tiles of >= 16
    rows_blk = min(rows_pad, MAX_ROWS_PER_PROGRAM)
    block_t = max(16, min(block_t, _next_power_of_2(t)))
    itemsize = max(jnp.dtype(k_bthd.dtype).itemsize, jnp.dtype(q_bnhd.dtype).itemsize)
    while block_t > 16 and not _fits_shared_memory(rows_blk, block_t, max(d, 16), itemsize):
        block_t //= 2
    if d < 16:  # toy head sizes only: zero columns change no dot product (the scale keeps d)
        q_bnhd, k_bthd, v_bthd = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 16 - d))) for x in (q_bnhd, k_bthd, v_bthd))
    d_pad = max(d, 16)
    blocks = cdiv(t, block_t)
    splits = min(num_splits, blocks)
    split_len = cdiv(blocks, splits) * block_t
    splits = cdiv(t, split_len)

    # rows ordered (token, group): row i * g + j is token i of query head h * g + j
    q_bkrd = q_bnhd.reshape(b, n, hkv, g, d_pad).transpose(0, 2, 1, 3, 4).reshape(b, hkv, rows, d_pad)
    q_bkrd = jnp.pad(q_bkrd, ((0, 0), (0, 0), (0, rows_pad - rows), (0, 0)))
    # the mask is small next to the cache: expand it to rows and pad it (never the cache)
    per_head = visible_bnt.ndim == 4
    mask_bkrt = visible_bnt if per_head else visible_bnt[:, None]  # [B, Hkv or 1, n, T]
    mask_bkrt = jnp.repeat(mask_bkrt.astype(jnp.int8), g, axis=2)
    mask_bkrt = jnp.pad(mask_bkrt, ((0, 0), (0, 0), (0, rows_pad - rows), (0, splits * split_len - t)))
    end_b = jnp.clip(kv_end_b.astype(jnp.int32), 0, t)

    kernel = functools.partial(_decode_kernel, block_t=block_t, split_len=split_len, seq_len=t, scale=d**-0.5)
    o_bksrd, m_bksr, l_bksr = pl.pallas_call(
        kernel,
        grid=(b, hkv, rows_pad // rows_blk, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h, r, s: (i,)),
            pl.BlockSpec((None, None, rows_blk, d_pad), lambda i, h, r, s: (i, h, r, 0)),
            pl.BlockSpec((None, split_len, None, d_pad), lambda i, h, r, s: (i, s, h, 0)),
            pl.BlockSpec((None, split_len, None, d_pad), lambda i, h, r, s: (i, s, h, 0)),
            pl.BlockSpec((None, None, rows_blk, split_len), lambda i, h, r, s: (i, h if per_head else 0, r, s)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows_blk, d_pad), lambda i, h, r, s: (i, h, s, r, 0)),
            pl.BlockSpec((None, None, None, rows_blk), lambda i, h, r, s: (i, h, s, r)),
            pl.BlockSpec((None, None, None, rows_blk), lambda i, h, r, s: (i, h, s, r)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, splits, rows_pad, d_pad), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, rows_pad), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, rows_pad), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="decode_attention",
    )(end_b, q_bkrd, k_bthd, v_bthd, mask_bkrt)
    o_bkrd = _combine_splits(o_bksrd, m_bksr, l_bksr)[:, :, :rows, :d]
    out = o_bkrd.reshape(b, hkv, n, g, d).transpose(0, 2, 1, 3, 4).reshape(b, n, hq, d)
    return out.astype(v_bthd.dtype)


def _visible_end(visible_bnt: jax.Array) -> jax.Array:
    """One past the last slot any query of the row sees."""
    slot_t = jnp.arange(1, visible_bnt.shape[-1] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(visible_bnt, slot_t, 0), axis=tuple(range(1, visible_bnt.ndim)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _decode_attention_vjp(q_bnhd, k_bthd, v_bthd, visible_bnt, kv_end_b, block_t, num_splits, interpret):
    if tpu_route(interpret):
        return decode_attention_tpu(q_bnhd, k_bthd, v_bthd, visible_bnt, kv_end_b, block_t=block_t,
                                    interpret=interpret)
    return _decode_attention_pallas(q_bnhd, k_bthd, v_bthd, visible_bnt, kv_end_b,
                                    block_t=block_t, num_splits=num_splits, interpret=interpret)


def _decode_fwd(q_bnhd, k_bthd, v_bthd, visible_bnt, kv_end_b, block_t, num_splits, interpret):
    out = _decode_attention_vjp(q_bnhd, k_bthd, v_bthd, visible_bnt, kv_end_b, block_t, num_splits, interpret)
    return out, (q_bnhd, k_bthd, v_bthd, visible_bnt, kv_end_b)


def _decode_bwd(block_t, num_splits, interpret, residuals, d_out):
    # Gradients (rarely needed: training over a cache) go through the reference; see module doc.
    q_bnhd, k_bthd, v_bthd, visible_bnt, kv_end_b = residuals
    _, pullback = jax.vjp(lambda q, k, v: decode_attention_reference(q, k, v, visible_bnt), q_bnhd, k_bthd, v_bthd)
    return (*pullback(d_out), None, None)


_decode_attention_vjp.defvjp(_decode_fwd, _decode_bwd)


def decode_attention(q_bnhd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array, visible_bnt: jax.Array,
                     kv_end_b: jax.Array | None = None, *, block_t: int = 256, num_splits: int = 8,
                     interpret: bool | None = None) -> jax.Array:
    """Flash-decoding attention: equals `decode_attention_reference` (see the module doc).

    q_bnhd [B, n, Hq, D]; k_bthd, v_bthd [B, T, Hkv, D] with Hq a multiple of Hkv;
    visible_bnt [B, n, T] bool, or [B, Hkv, n, T] for a mask per kv head (DuoAttention's
    streaming heads, Λ heads). kv_end_b [B] (optional): no slot at or past it is visible in row b
    (the model passes lengths + n) so those blocks are skipped; by default it is read off the mask.
    T is split into at most `num_splits` splits of whole `block_t` blocks (GPU). On TPU (or with
    interpret=pltpu.InterpretParams()) the TPU kernel runs instead: no splits, block_t a multiple
    of 128. `interpret` defaults to True on CPU.
    Differentiable: the backward pass is the reference's (XLA), not a kernel.
    """
    _check_args(q_bnhd, k_bthd, v_bthd, visible_bnt, kv_end_b)
    check_positive("block_t", block_t)
    check_positive("num_splits", num_splits)
    if kv_end_b is None:
        kv_end_b = _visible_end(visible_bnt)
    interpret = default_interpret() if interpret is None else interpret
    check_head_dim("decode_attention", q_bnhd.shape[-1], interpret)
    return _decode_attention_vjp(q_bnhd, k_bthd, v_bthd, visible_bnt, kv_end_b, block_t, num_splits, interpret)
