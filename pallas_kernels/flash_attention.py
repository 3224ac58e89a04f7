"""Flash attention for training and prefill: causal and block-sparse masks, forward and backward.

q [B, T, Hq, D] attends over k, v [B, T, Hkv, D] (GQA: query head h reads kv head h // (Hq/Hkv)).
Query i sees key j when
    block_mask[h, i // block_q, j // block_k]  and  (not causal or j <= i).
A block that the block mask turns off is never loaded, so a sparse mask saves its compute and
memory traffic. `streaming_block_mask` builds DuoAttention's streaming Λ shape (attention sinks
plus a recent window) per head; `causal_block_mask` the dense one. A query that sees no key gets
a zero output (and zero gradients).

Forward: one program per (batch, query head, query block), an online softmax over the key
blocks (skipping masked-off blocks and, when causal, blocks above the diagonal); it also writes
the log-sum-exp that the backward needs. Backward (`jax.custom_vjp`): the standard two kernels,
dq per query block and dk/dv per key block, recomputing probabilities from the saved
log-sum-exp; dk/dv come out per query head and are summed over each GQA group in XLA.

T is padded to a multiple of the block sizes in the wrapper (a copy: fine for training and
prefill, which is why the decode kernel does not do it). Scores and softmax in float32.

Hardware: GPU through Pallas's Triton lowering (compiler params from `_common.compiler_params`;
jax 0.10's default Mosaic GPU lowering wants warpgroup-style kernels). The lowering to Triton IR
is checked on CPU by exporting for "cuda" (tests/test_pallas_lowering.py); on an H200 (jax 0.11.2)
the tests passed with the kernel compiled for the GPU (benchmarks/h200/kernel_tests.log). TPU: `flash_attention` hands over to `flash_attention_tpu`,
which wraps JAX's splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, its own
forward and backward) with the same mask; tested in interpret mode on CPU, not run on a TPU.
Correctness was checked in interpret mode on CPU only.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (MASKED, KernelArgumentError, cdiv, check_positive,
                                     check_head_dim, check_rank, compiler_params, default_interpret,
                                     tpu_route)


def causal_block_mask(num_heads: int, seq_len: int, block_q: int, block_k: int) -> np.ndarray:
    """All blocks on: with causal=True this is ordinary causal attention. [H, nq, nk] bool."""
    return np.ones((num_heads, cdiv(seq_len, block_q), cdiv(seq_len, block_k)), bool)


def streaming_block_mask(num_heads: int, seq_len: int, *, block_q: int, block_k: int, sink_tokens: int,
                         recent_tokens: int, streaming_heads=None) -> np.ndarray:
    """DuoAttention's streaming Λ at block granularity, as a [H, nq, nk] bool block mask.

    For a streaming head, query block i keeps key block j when j holds one of the first
    `sink_tokens` keys or a key within `recent_tokens` before some query of block i. Heads where
    `streaming_heads` ([H] bools; default all) is False keep every block (full causal attention).
    Use it with causal=True.
    """
    for name, value in (("num_heads", num_heads), ("seq_len", seq_len), ("block_q", block_q), ("block_k", block_k)):
        check_positive(name, value)
    if sink_tokens < 0 or recent_tokens < 1:
        raise KernelArgumentError(f"need sink_tokens >= 0 and recent_tokens >= 1, got {sink_tokens}, {recent_tokens}")
    nq, nk = cdiv(seq_len, block_q), cdiv(seq_len, block_k)
    q_first = np.arange(nq)[:, None] * block_q
    q_last = np.minimum(q_first + block_q, seq_len) - 1
    k_first = np.arange(nk)[None, :] * block_k
    k_last = k_first + block_k - 1
    sink = k_first < sink_tokens
    recent = (k_last >= q_first - recent_tokens + 1) & (k_first <= q_last)
    lam_qk = sink | recent
    if streaming_heads is None:
        streaming_heads = np.ones(num_heads, bool)
    streaming_heads = np.asarray(streaming_heads, bool)
    if streaming_heads.shape != (num_heads,):
        raise KernelArgumentError(f"streaming_heads must have shape ({num_heads},), got {streaming_heads.shape}")
    return np.where(streaming_heads[:, None, None], lam_qk[None], True)


def element_mask(block_mask_hqk, seq_len: int, block_q: int, block_k: int, causal: bool) -> jax.Array:
    """The [H, T, T] element mask that a block mask (plus causality) stands for."""
    q_t = jnp.arange(seq_len)
    blocks = jnp.asarray(block_mask_hqk, bool)[:, q_t // block_q][:, :, q_t // block_k]
    if causal:
        blocks = blocks & (q_t[None, :, None] >= q_t[None, None, :])
    return blocks


def flash_attention_reference(q_bthd, k_bthd, v_bthd, *, causal: bool = True, block_mask_hqk=None,
                              block_q: int = 64, block_k: int = 64) -> jax.Array:
    """Pure-JAX attention under the same mask (float32 scores; rows that see nothing give 0)."""
    b, t, hq, d = q_bthd.shape
    hkv = k_bthd.shape[2]
    if block_mask_hqk is None:
        block_mask_hqk = causal_block_mask(hq, t, block_q, block_k)
    visible_htt = element_mask(block_mask_hqk, t, block_q, block_k, causal)
    k_bthd = jnp.repeat(k_bthd, hq // hkv, axis=2)
    v_bthd = jnp.repeat(v_bthd, hq // hkv, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q_bthd, k_bthd, preferred_element_type=jnp.float32) * d**-0.5
    scores = jnp.where(visible_htt[None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(jnp.any(visible_htt, axis=-1, keepdims=True)[None], probs, 0.0).astype(v_bthd.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v_bthd)


# ---------------------------------------------------------------- kernels


def _visible(q_first, k_first, bq, bk, seq_len, causal):
    q_pos = q_first + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = k_first + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    visible = k_pos < seq_len
    if causal:
        visible = visible & (k_pos <= q_pos)
    return visible


def _key_blocks_for(i, bq, bk, nk, seq_len, causal):
    """How many key blocks query block i may see (all of them, or up to the diagonal)."""
    if not causal:
        return nk
    return jnp.minimum(((i + 1) * bq + bk - 1) // bk, nk)


def _dot_t(a, b):  # a @ b.T with float32 accumulation
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _forward_kernel(bm_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, bq, bk, nk, seq_len, causal, scale):
    i = pl.program_id(2)
    q = q_ref[...]

    def visit(j, carry):
        def update(carry):
            acc, m, l = carry
            start = pl.multiple_of(j * bk, bk)
            k = k_ref[pl.ds(start, bk), :]
            v = v_ref[pl.ds(start, bk), :]
            visible = _visible(i * bq, start, bq, bk, seq_len, causal)
            s = jnp.where(visible, _dot_t(q, k) * scale, MASKED)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
            alpha = jnp.exp(m - m_new)
            return alpha[:, None] * acc + _dot(p.astype(v.dtype), v), m_new, alpha * l + jnp.sum(p, axis=1)
        return lax.cond(bm_ref[j] != 0, update, lambda c: c, carry)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(0, _key_blocks_for(i, bq, bk, nk, seq_len, causal), visit, init)
    seen = l > 0
    o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)  # +inf: p = 0 in backward


def _dq_kernel(bm_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, bq, bk, nk, seq_len, causal, scale):
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def visit(j, dq):
        def update(dq):
            start = pl.multiple_of(j * bk, bk)
            k = k_ref[pl.ds(start, bk), :]
            v = v_ref[pl.ds(start, bk), :]
            visible = _visible(i * bq, start, bq, bk, seq_len, causal)
            s = jnp.where(visible, _dot_t(q, k) * scale, MASKED)
            p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
            ds = p * (_dot_t(do, v) - delta[:, None])
            return dq + _dot(ds.astype(k.dtype), k)
        return lax.cond(bm_ref[j] != 0, update, lambda d: d, dq)

    dq = lax.fori_loop(0, _key_blocks_for(i, bq, bk, nk, seq_len, causal), visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq * scale


def _dkv_kernel(bm_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                bq, bk, nq, seq_len, causal, scale):
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    k_first = j * bk

    def visit(i, carry):
        def update(carry):
            dk, dv = carry
            start = pl.multiple_of(i * bq, bq)
            q = q_ref[pl.ds(start, bq), :]
            do = do_ref[pl.ds(start, bq), :]
            lse = lse_ref[pl.ds(start, bq)]
            delta = delta_ref[pl.ds(start, bq)]
            visible_kq = _visible(start, k_first, bq, bk, seq_len, causal).T
            s_kq = jnp.where(visible_kq, _dot_t(k, q) * scale, MASKED)
            p_kq = jnp.where(visible_kq, jnp.exp(s_kq - lse[None, :]), 0.0)
            dv = dv + _dot(p_kq.astype(do.dtype), do)
            ds_kq = p_kq * (_dot_t(v, do) - delta[None, :])
            return dk + _dot(ds_kq.astype(q.dtype), q), dv
        return lax.cond(bm_ref[i] != 0, update, lambda c: c, carry)

    first = (k_first // bq) if causal else 0  # query blocks above the diagonal see nothing here
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(first, nq, visit, (zeros, zeros))
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


# ---------------------------------------------------------------- wrappers


def _specs(t_pad, d, bq, g):
    """BlockSpecs over grid (b, h, block): a [block, D] tile of query head h, whole-T of its kv head."""
    q_tile = pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, i, h, 0))
    kv_whole = pl.BlockSpec((None, t_pad, None, d), lambda b, h, i: (b, 0, h // g, 0))
    q_whole = pl.BlockSpec((None, t_pad, None, d), lambda b, h, i: (b, 0, h, 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    row_whole = pl.BlockSpec((None, None, t_pad), lambda b, h, i: (b, h, 0))
    return dict(q_tile=q_tile, kv_whole=kv_whole, q_whole=q_whole, row_tile=row_tile, row_whole=row_whole)


def _forward(q, k, v, bm, causal, bq, bk, seq_len, interpret):
    b, t_pad, hq, d = q.shape
    g = hq // k.shape[2]
    nq, nk = t_pad // bq, t_pad // bk
    sp = _specs(t_pad, d, bq, g)
    kernel = functools.partial(_forward_kernel, bq=bq, bk=bk, nk=nk, seq_len=seq_len, causal=causal, scale=d**-0.5)
    return pl.pallas_call(
        kernel,
        grid=(b, hq, nq),
        in_specs=[pl.BlockSpec((None, None, nk), lambda b, h, i: (h, i, 0)), sp["q_tile"], sp["kv_whole"], sp["kv_whole"]],
        out_specs=[sp["q_tile"], sp["row_tile"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, v.dtype), jax.ShapeDtypeStruct((b, hq, t_pad), jnp.float32)],
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="flash_attention_fwd",
    )(bm, q, k, v)


def _backward(q, k, v, o, lse, do, bm, causal, bq, bk, seq_len, interpret):
    b, t_pad, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    nq, nk = t_pad // bq, t_pad // bk
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    sp = _specs(t_pad, d, bq, g)
    common = dict(seq_len=seq_len, causal=causal, scale=d**-0.5, bq=bq, bk=bk)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, nk=nk, **common),
        grid=(b, hq, nq),
        in_specs=[pl.BlockSpec((None, None, nk), lambda b, h, i: (h, i, 0)), sp["q_tile"], sp["kv_whole"],
                  sp["kv_whole"], sp["q_tile"], sp["row_tile"], sp["row_tile"]],
        out_specs=sp["q_tile"],
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="flash_attention_dq",
    )(bm, q, k, v, do, lse, delta)
    k_tile = pl.BlockSpec((None, bk, None, d), lambda b, h, j: (b, j, h // g, 0))
    dkv_tile = pl.BlockSpec((None, bk, None, d), lambda b, h, j: (b, j, h, 0))
    dk_h, dv_h = pl.pallas_call(
        functools.partial(_dkv_kernel, nq=nq, **common),
        grid=(b, hq, nk),
        in_specs=[pl.BlockSpec((None, None, nq), lambda b, h, j: (h, j, 0)), sp["q_whole"], k_tile, k_tile,
                  sp["q_whole"], sp["row_whole"], sp["row_whole"]],
        out_specs=[dkv_tile, dkv_tile],
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 2,
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="flash_attention_dkv",
    )(jnp.swapaxes(bm, 1, 2), q, k, v, do, lse, delta)
    dk = dk_h.reshape(b, t_pad, hkv, g, d).sum(axis=3)
    dv = dv_h.reshape(b, t_pad, hkv, g, d).sum(axis=3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(q, k, v, bm, causal, bq, bk, seq_len, interpret):
    return _forward(q, k, v, bm, causal, bq, bk, seq_len, interpret)[0]


def _flash_fwd(q, k, v, bm, causal, bq, bk, seq_len, interpret):
    o, lse = _forward(q, k, v, bm, causal, bq, bk, seq_len, interpret)
    return o, (q, k, v, bm, o, lse)


def _flash_bwd(causal, bq, bk, seq_len, interpret, residuals, do):
    q, k, v, bm, o, lse = residuals
    return (*_backward(q, k, v, o, lse, do, bm, causal, bq, bk, seq_len, interpret), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_bthd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array, *, causal: bool = True,
                    block_mask_hqk=None, block_q: int | None = None, block_k: int | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """Flash attention with an optional per-head block mask; differentiable (kernel backward).

    q_bthd [B, T, Hq, D], k_bthd / v_bthd [B, T, Hkv, D]; block_mask_hqk [Hq, cdiv(T, block_q),
    cdiv(T, block_k)] bools (None: all blocks). Returns [B, T, Hq, D] in v's dtype. Equals
    `flash_attention_reference` with the same arguments. `interpret` defaults to True on CPU.
    On TPU (or with interpret=pltpu.InterpretParams()) splash attention runs it
    (`flash_attention_tpu`); the blocks default to 128 there, 64 elsewhere.
    """
    check_rank("q_bthd", q_bthd, 4, "[B, T, Hq, D]")
    check_rank("k_bthd", k_bthd, 4, "[B, T, Hkv, D]")
    on_tpu = tpu_route(interpret)
    block_q = block_q or (128 if on_tpu else 64)  # splash wants whole 128-lane blocks
    block_k = block_k or (128 if on_tpu else 64)
    check_positive("block_q", block_q)
    check_positive("block_k", block_k)
    b, t, hq, d = q_bthd.shape
    if k_bthd.shape != v_bthd.shape or k_bthd.shape[:2] != (b, t) or k_bthd.shape[3] != d:
        raise KernelArgumentError(f"q {q_bthd.shape}, k {k_bthd.shape}, v {v_bthd.shape} must share B, T and D")
    if hq % k_bthd.shape[2]:
        raise KernelArgumentError(f"query heads ({hq}) must be a multiple of kv heads ({k_bthd.shape[2]})")
    expected = (hq, cdiv(t, block_q), cdiv(t, block_k))
    if block_mask_hqk is None:
        block_mask_hqk = causal_block_mask(hq, t, block_q, block_k)
    if tuple(block_mask_hqk.shape) != expected:
        raise KernelArgumentError(f"block_mask_hqk must have shape [Hq, T/block_q, T/block_k] = {expected}, "
                                  f"got {tuple(block_mask_hqk.shape)}")
    if on_tpu:
        return flash_attention_tpu(q_bthd, k_bthd, v_bthd, causal=causal, block_mask_hqk=block_mask_hqk,
                                   block_q=block_q, block_k=block_k, interpret=interpret or False)
    interpret = default_interpret() if interpret is None else interpret
    check_head_dim("flash_attention", d, interpret)
    t_pad = cdiv(t, math.lcm(block_q, block_k)) * math.lcm(block_q, block_k)
    pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
    bm = jnp.asarray(block_mask_hqk).astype(jnp.int32)
    bm = jnp.pad(bm, ((0, 0), (0, t_pad // block_q - bm.shape[1]), (0, t_pad // block_k - bm.shape[2])))
    out = _flash(jnp.pad(q_bthd, pad), jnp.pad(k_bthd, pad), jnp.pad(v_bthd, pad), bm, causal, block_q, block_k,
                 t, interpret)
    return out[:, :t]


def _splash_head_masks(block_mask_hqk: np.ndarray, seq_len: int, t_pad: int, block_q: int, block_k: int,
                       causal: bool):
    """Splash's per-head masks over the padded length: the lazy causal mask where a head's block mask
    is all on, else one dense numpy mask per distinct head."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    t_q = np.arange(t_pad)
    cache: dict[bytes, object] = {}
    heads = []
    for head_mask in block_mask_hqk:
        key = head_mask.tobytes()
        if key not in cache and causal and head_mask.all():
            # plain causal: splash's lazy mask, no [T, T] array on the host. Over the padded length
            # it is still exact: real queries never reach the padded keys, padded queries see keys.
            cache[key] = mask_lib.CausalMask((t_pad, t_pad))
        if key not in cache:
            dense = head_mask[np.minimum(t_q, seq_len - 1) // block_q][:, np.minimum(t_q, seq_len - 1) // block_k]
            if causal:
                dense = dense & (t_q[:, None] >= t_q[None, :])
            dense = dense & (t_q[None, :] < seq_len)
            if not dense[:seq_len].any(axis=1).all():
                raise KernelArgumentError("flash_attention_tpu needs every query to see a key; this block mask "
                                          "leaves some query with none (the Pallas kernels handle that case)")
            dense[seq_len:, seq_len:] |= np.eye(t_pad - seq_len, dtype=bool)  # padded queries see themselves
            cache[key] = mask_lib.NumpyMask(dense)
        heads.append(cache[key])
    return mask_lib.MultiHeadMask(heads)


def flash_attention_tpu(q_bthd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array, *, causal: bool = True,
                        block_mask_hqk=None, block_q: int = 128, block_k: int = 128,
                        interpret: bool = False) -> jax.Array:
    """TPU: the same function as `flash_attention`, computed by JAX's splash attention kernel.

    The block mask must be concrete (numpy), as splash plans its sparsity on the host, and must
    leave every query some key. Host memory: one [T, T] bool mask per distinct sparse head mask
    (plain causal heads take splash's lazy causal mask). GQA repeats K/V per query head. Block
    sizes must be multiples of 128 (TPU lanes).
    """
    b, t, hq, d = q_bthd.shape
    g = hq // k_bthd.shape[2]
    if block_mask_hqk is None:
        block_mask_hqk = causal_block_mask(hq, t, block_q, block_k)
    try:
        block_mask_hqk = np.asarray(block_mask_hqk, bool)
    except jax.errors.TracerArrayConversionError:
        raise KernelArgumentError("flash_attention_tpu needs a concrete (numpy) block mask, not a traced one") from None
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    lcm = math.lcm(block_q, block_k)
    t_pad = cdiv(t, lcm) * lcm
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_k, block_kv_compute=block_k, block_q_dkv=block_q,
                              block_kv_dkv=block_k, block_kv_dkv_compute=block_k, block_q_dq=block_q,
                              block_kv_dq=block_k)
    kernel = splash.make_splash_mha(_splash_head_masks(block_mask_hqk, t, t_pad, block_q, block_k, causal),
                                    block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    to_bhtd = lambda x: jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    q = to_bhtd(q_bthd * jnp.asarray(d**-0.5, q_bthd.dtype))  # splash does not scale the scores
    k = to_bhtd(jnp.repeat(k_bthd, g, axis=2))
    v = to_bhtd(jnp.repeat(v_bthd, g, axis=2))
    out_bhtd = jax.vmap(kernel)(q, k, v)
    return out_bhtd.transpose(0, 2, 1, 3)[:, :t].astype(v_bthd.dtype)
