"""pallas_kernels.grouped_matmul equals jax.lax.ragged_dot (interpret mode on CPU).

Outputs are NaN-poisoned by the interpreter, so finite matching results prove every element was
written — including rows past sum(group_sizes), which must be zero. Tolerances: float32 atol 1e-4
(K <= 40 products of O(1) terms); bfloat16 atol 0.1 relative to outputs of size ~sqrt(K) ~ 5.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import KernelArgumentError, grouped_matmul, grouped_matmul_reference


def operands(seed, m, k, n, g, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((m, k), np.float32), dtype),
            jnp.asarray(rng.standard_normal((g, k, n), np.float32), dtype))


# group sizes with empty groups, a group spanning several row tiles, tiles straddling groups,
# rows left over past the total, M/K/N not multiples of the tiles
CASES = [
    (40, 24, 20, [5, 0, 17, 10], (16, 16, 8)),
    (32, 16, 16, [0, 32, 0], (8, 8, 16)),
    (24, 8, 8, [3, 4], (8, 8, 8)),
    (48, 40, 24, [1, 1, 1, 30, 15], (16, 16, 16)),
]


@pytest.mark.parametrize("m,k,n,sizes,tiles", CASES)
def test_matches_ragged_dot_float32(m, k, n, sizes, tiles):
    lhs, rhs = operands(m + k, m, k, n, len(sizes))
    group_sizes = jnp.asarray(sizes, jnp.int32)
    got = grouped_matmul(lhs, rhs, group_sizes, block_m=tiles[0], block_k=tiles[1], block_n=tiles[2])
    want = grouped_matmul_reference(lhs, rhs, group_sizes)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.all(np.asarray(got)[sum(sizes):] == 0)


@pytest.mark.parametrize("m,k,n,sizes,tiling", [(40, 32, 32, [5, 0, 17, 10], (16, 32, 32)),
                                              (64, 32, 16, [30, 2, 32], (32, 32, 16))])
def test_tpu_path_megablox_matches_ragged_dot(m, k, n, sizes, tiling):
    """The TPU route (megablox gmm under the TPU interpreter) after zeroing the rows it leaves
    unwritten; tiles a TPU takes (K and N whole here, M in multiples of 8)."""
    lhs, rhs = operands(m * 3 + k, m, k, n, len(sizes))
    group_sizes = jnp.asarray(sizes, jnp.int32)
    got = grouped_matmul(lhs, rhs, group_sizes, block_m=tiling[0], block_k=tiling[1], block_n=tiling[2],
                         interpret=pltpu.InterpretParams())
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, grouped_matmul_reference(lhs, rhs, group_sizes), atol=1e-4, rtol=0)


def test_bfloat16():
    lhs, rhs = operands(1, 32, 32, 16, 3, jnp.bfloat16)
    group_sizes = jnp.asarray([10, 6, 16], jnp.int32)
    got = grouped_matmul(lhs, rhs, group_sizes, block_m=16, block_k=16, block_n=16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), grouped_matmul_reference(lhs, rhs, group_sizes).astype(jnp.float32),
                               atol=0.1, rtol=0)


def test_bad_arguments_are_named():
    lhs, rhs = operands(0, 8, 8, 8, 2)
    with pytest.raises(KernelArgumentError, match="3 group sizes for 2 groups"):
        grouped_matmul(lhs, rhs, jnp.asarray([1, 2, 3], jnp.int32))
    with pytest.raises(KernelArgumentError, match="lhs K"):
        grouped_matmul(lhs[:, :4], rhs, jnp.asarray([1, 2], jnp.int32))
    with pytest.raises(KernelArgumentError, match="integers"):
        grouped_matmul(lhs, rhs, jnp.asarray([1.0, 2.0]))
