"""Grouped matmul for Mixture-of-Experts: rows sorted by expert times that expert's weights.

out[m] = lhs[m] @ rhs[g(m)] where row m belongs to group g(m): the first group_sizes[0] rows to
group 0, the next group_sizes[1] rows to group 1, and so on; rows past sum(group_sizes) are zero.
This is `jax.lax.ragged_dot`'s meaning (the reference), for where ragged_dot lowers poorly.

One program per (row tile, column tile). A row tile may straddle group boundaries, so the
program loops over the groups that intersect it (usually one or two; the first and last group
of every tile are found in XLA beforehand), masking the rows of other groups to zero before each
dot, and over K in blocks. Every output tile is written once, from a float32 accumulator.

M, K and N are padded to the tile sizes in the wrapper when they are not multiples (in practice
they are: pick tiles that divide them).

Hardware: GPU through Pallas's Triton lowering (compiler params from `_common.compiler_params`;
jax 0.10's default Mosaic GPU lowering wants warpgroup-style kernels). The lowering to Triton IR
is checked on CPU by exporting for "cuda" (tests/test_pallas_lowering.py); on an H200 (jax 0.11.2)
the tests passed with the kernel compiled for the GPU (benchmarks/h200/kernel_tests.log). TPU: `grouped_matmul` hands over to `grouped_matmul_tpu`,
which wraps JAX's own TPU kernel (`jax.experimental.pallas.ops.tpu.megablox.gmm`) and zeroes the
rows past sum(group_sizes) that it leaves unwritten; tested in interpret mode on CPU, not run on
a TPU. Correctness was checked in interpret mode on CPU only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (KernelArgumentError, cdiv, check_positive, check_rank,
                                     compiler_params, default_interpret, tpu_route)


def grouped_matmul_reference(lhs_mk: jax.Array, rhs_gkn: jax.Array, group_sizes_g: jax.Array) -> jax.Array:
    """`jax.lax.ragged_dot` with float32 accumulation, cast to lhs's dtype."""
    out = lax.ragged_dot(lhs_mk, rhs_gkn, group_sizes_g.astype(jnp.int32), preferred_element_type=jnp.float32)
    return out.astype(lhs_mk.dtype)


def _grouped_kernel(first_ref, last_ref, offsets_ref, lhs_ref, rhs_ref, out_ref, *, bm, bk, num_k_blocks):
    row_m = pl.program_id(0) * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)

    def visit_group(g, acc):
        begin, end = offsets_ref[g], offsets_ref[g + 1]
        in_group = (row_m >= begin) & (row_m < end)

        def visit_k(kb, acc):
            start = pl.multiple_of(kb * bk, bk)
            lhs = lhs_ref[:, pl.ds(start, bk)]
            lhs = jnp.where(in_group, lhs, jnp.zeros_like(lhs))
            rhs = rhs_ref[g, pl.ds(start, bk), :]
            return acc + jnp.dot(lhs, rhs, preferred_element_type=jnp.float32)

        return lax.fori_loop(0, num_k_blocks, visit_k, acc)

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    acc = lax.fori_loop(first_ref[0], last_ref[0] + 1, visit_group, acc)
    out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_m", "block_k", "block_n", "interpret"))
def _grouped_matmul(lhs_mk, rhs_gkn, group_sizes_g, *, block_m, block_k, block_n, interpret):
    m, k = lhs_mk.shape
    g, _, n = rhs_gkn.shape
    bm, bk, bn = min(block_m, m), min(block_k, k), min(block_n, n)
    m_pad, k_pad, n_pad = cdiv(m, bm) * bm, cdiv(k, bk) * bk, cdiv(n, bn) * bn
    lhs = jnp.pad(lhs_mk, ((0, m_pad - m), (0, k_pad - k)))
    rhs = jnp.pad(rhs_gkn, ((0, 0), (0, k_pad - k), (0, n_pad - n)))
    sizes = jnp.maximum(group_sizes_g.astype(jnp.int32), 0)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(sizes)])  # [G + 1]
    # group of a row = number of group ends at or before it; rows past the total get group G - 1
    # and are masked off inside (they lie in no group's [begin, end))
    tile_first = jnp.arange(m_pad // bm, dtype=jnp.int32) * bm
    group_of = lambda row: jnp.minimum(jnp.searchsorted(offsets[1:], row, side="right"), g - 1).astype(jnp.int32)
    first_group = group_of(tile_first)
    last_group = group_of(tile_first + bm - 1)
    kernel = functools.partial(_grouped_kernel, bm=bm, bk=bk, num_k_blocks=k_pad // bk)
    out = pl.pallas_call(
        kernel,
        grid=(m_pad // bm, n_pad // bn),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (i,)),
                  pl.BlockSpec((1,), lambda i, j: (i,)),
                  pl.BlockSpec((g + 1,), lambda i, j: (0,)),
                  pl.BlockSpec((bm, k_pad), lambda i, j: (i, 0)),
                  pl.BlockSpec((g, k_pad, bn), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), lhs_mk.dtype),
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="grouped_matmul",
    )(first_group, last_group, offsets, lhs, rhs)
    return out[:m, :n]


def grouped_matmul(lhs_mk: jax.Array, rhs_gkn: jax.Array, group_sizes_g: jax.Array, *, block_m: int = 128,
                   block_k: int = 128, block_n: int = 128, interpret: bool | None = None) -> jax.Array:
    """lhs_mk [M, K] (rows sorted by group) times rhs_gkn [G, K, N] per group -> [M, N] in lhs's dtype.

    group_sizes_g [G] ints with sum <= M; equals `grouped_matmul_reference` (lax.ragged_dot).
    Differentiable: the backward pass is the reference's (ragged_dot's), not a kernel.
    `interpret` defaults to True on CPU.
    """
    check_rank("lhs_mk", lhs_mk, 2, "[M, K]")
    check_rank("rhs_gkn", rhs_gkn, 3, "[G, K, N]")
    check_rank("group_sizes_g", group_sizes_g, 1, "[G]")
    for name, value in (("block_m", block_m), ("block_k", block_k), ("block_n", block_n)):
        check_positive(name, value)
    if lhs_mk.shape[1] != rhs_gkn.shape[1]:
        raise KernelArgumentError(f"lhs K ({lhs_mk.shape[1]}) differs from rhs K ({rhs_gkn.shape[1]})")
    if group_sizes_g.shape[0] != rhs_gkn.shape[0]:
        raise KernelArgumentError(f"{group_sizes_g.shape[0]} group sizes for {rhs_gkn.shape[0]} groups")
    if not jnp.issubdtype(group_sizes_g.dtype, jnp.integer):
        raise KernelArgumentError(f"group_sizes_g must be integers, got {group_sizes_g.dtype}")
    interpret = default_interpret() if interpret is None else interpret
    return _grouped_matmul_vjp(lhs_mk, rhs_gkn, group_sizes_g, (block_m, block_k, block_n), interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul_vjp(lhs_mk, rhs_gkn, group_sizes_g, tiling, interpret):
    if tpu_route(interpret):
        return grouped_matmul_tpu(lhs_mk, rhs_gkn, group_sizes_g, tiling=tiling, interpret=interpret)
    block_m, block_k, block_n = tiling
    return _grouped_matmul(lhs_mk, rhs_gkn, group_sizes_g, block_m=block_m, block_k=block_k, block_n=block_n,
                           interpret=interpret)


def _grouped_matmul_fwd(lhs_mk, rhs_gkn, group_sizes_g, tiling, interpret):
    return _grouped_matmul_vjp(lhs_mk, rhs_gkn, group_sizes_g, tiling, interpret), (lhs_mk, rhs_gkn, group_sizes_g)


def _grouped_matmul_bwd(tiling, interpret, residuals, d_out_mn):
    lhs_mk, rhs_gkn, group_sizes_g = residuals
    _, pullback = jax.vjp(lambda lhs, rhs: grouped_matmul_reference(lhs, rhs, group_sizes_g), lhs_mk, rhs_gkn)
    return (*pullback(d_out_mn), None)  # group sizes are integers: no cotangent


_grouped_matmul_vjp.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def grouped_matmul_tpu(lhs_mk: jax.Array, rhs_gkn: jax.Array, group_sizes_g: jax.Array, *,
                       tiling: tuple[int, int, int] = (128, 128, 128), interpret: bool = False) -> jax.Array:
    """TPU: megablox's grouped matmul, with `grouped_matmul_reference`'s meaning (rows past the
    total are zero; megablox leaves them unwritten). M is padded to the row tile."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    m, k = lhs_mk.shape
    n = rhs_gkn.shape[2]
    tiling = (min(tiling[0], m), min(tiling[1], k), min(tiling[2], n))
    for name, tile, full, unit in (("block_m", tiling[0], m, 8), ("block_k", tiling[1], k, 128),
                                   ("block_n", tiling[2], n, 128)):
        if tile % unit and tile != full:  # Mosaic's (8, 128) tiles
            raise KernelArgumentError(f"{name} must be a multiple of {unit} on TPU (or the whole dimension, "
                                      f"{full}), got {tile}")
    lhs = jnp.pad(lhs_mk, ((0, cdiv(m, tiling[0]) * tiling[0] - m), (0, 0)))
    sizes = jnp.maximum(group_sizes_g.astype(jnp.int32), 0)
    out = gmm(lhs, rhs_gkn, sizes, preferred_element_type=jnp.float32, tiling=tiling, interpret=interpret)[:m]
    written = jnp.arange(m)[:, None] < jnp.sum(sizes)
    return jnp.where(written, out, 0.0).astype(lhs_mk.dtype)
