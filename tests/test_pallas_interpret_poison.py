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
