"""The premise of the kernel tests' poisoning: in interpret mode Pallas starts every float output
(and every padded edge block) as NaN, so a kernel that skips an element returns NaN there, and a
finite result equal to the reference proves that every output element was written."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl


def test_unwritten_output_elements_come_back_nan():
    def write_first_row_only(x_ref, o_ref):
        o_ref[0, :] = x_ref[0, :]

    out = pl.pallas_call(write_first_row_only, out_shape=jax.ShapeDtypeStruct((2, 8), jnp.float32),
                         interpret=True)(jnp.ones((2, 8), jnp.float32))
    out = np.asarray(out)
    assert np.all(out[0] == 1.0) and np.all(np.isnan(out[1]))


def test_edge_blocks_are_padded_with_nan():
    def copy(x_ref, o_ref):
        o_ref[...] = jnp.where(jnp.isnan(x_ref[...]), -1.0, x_ref[...])

    out = pl.pallas_call(copy, grid=(2,), in_specs=[pl.BlockSpec((4,), lambda i: (0,))],
                         out_specs=pl.BlockSpec((4,), lambda i: (i,)),
                         out_shape=jax.ShapeDtypeStruct((6,), jnp.float32),
                         interpret=True)(jnp.arange(3, dtype=jnp.float32))
    # the (4,) block over a (3,) input reads one padded element: NaN
    np.testing.assert_array_equal(np.asarray(out), [0, 1, 2, -1, 0, 1])



def test_the_tpu_interpreter_poisons_too():
    """The TPU kernels are tested under pltpu.InterpretParams(): an output buffer starts NaN and the
    padded tail of an edge block reads NaN there as well. (A later grid step that skips its write
    leaves the previous block's values, as the reused VMEM buffer does on a TPU: a skipped write
    shows as a mismatch with the reference on random inputs.)"""
    from jax.experimental.pallas import tpu as pltpu

    def copy_top_half(x_ref, o_ref):
        o_ref[0:8, :] = jnp.where(jnp.isnan(x_ref[0:8, :]), -1.0, x_ref[0:8, :])

    out = pl.pallas_call(copy_top_half, grid=(1,), in_specs=[pl.BlockSpec((16, 128), lambda i: (1, 0))],
                         out_specs=pl.BlockSpec((16, 128), lambda i: (0, 0)),
                         out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32),
                         interpret=pltpu.InterpretParams())(jnp.ones((20, 128), jnp.float32))
    out = np.asarray(out)
    # the block read input rows 16..31, of which 20..31 lie past the input; rows 8..15 were never written
    np.testing.assert_array_equal(out[:8, 0], [1, 1, 1, 1, -1, -1, -1, -1])
    assert np.all(np.isnan(out[8:]))
