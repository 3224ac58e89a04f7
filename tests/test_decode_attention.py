"""The CPU decode-attention kernel (jaxaccel.cpu_kernels.decode_attention) against the house
attention function (XLA) on fresh random shapes and masks."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxaccel.cpu_kernels import decode_attention as da
from jaxaccel.layers.attention import dot_product_attention

pytestmark = pytest.mark.skipif(not da.available(), reason="the decode-attention kernel does not run on this machine")


def operands(rng, b, n, hkv, g, d, t, p_visible=0.6):
    q = rng.standard_normal((b, n, hkv * g, d)).astype(np.float32) * 2
    k = rng.standard_normal((b, t, hkv, d)).astype(np.float32) * 2
    v = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    visible = rng.random((b, n, t)) < p_visible
    return q, k, v, visible


@pytest.mark.parametrize("seed", range(4))
def test_decode_attention_equals_the_reference(seed):
    rng = np.random.default_rng(seed)
    kernel = jax.jit(da.decode_attention)
    reference = jax.jit(lambda *operands: dot_product_attention(*operands, impl="xla"))  # one compile a shape
    for _ in range(6):
        b, n, hkv, g = int(rng.integers(1, 3)), int(rng.integers(1, 17)), int(rng.integers(1, 4)), int(rng.integers(1, 5))
        d, t = int(rng.choice([8, 12, 16, 64])), int(rng.integers(1, 300))
        q, k, v, visible = operands(rng, b, n, hkv, g, d, t, p_visible=rng.random())
        visible[0, 0] = False  # a query that sees nothing: the mean of the values, as the reference gives
        got = np.asarray(kernel(*map(jnp.asarray, (q, k, v, visible))))
        want = np.asarray(reference(*map(jnp.asarray, (q, k, v, visible))))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_a_querys_result_depends_only_on_the_keys_it_sees_in_order():
    # A token verified in a tree gets the bits of its AR step: the other queries, and where the
    # unseen slots lie between its keys, do not change its result.
    rng = np.random.default_rng(5)
    q, k, v, visible = operands(rng, 1, 9, 3, 3, 64, 200)
    whole = np.asarray(da.decode_attention(*map(jnp.asarray, (q, k, v, visible))))
    np.testing.assert_array_equal(np.asarray(da.decode_attention(*map(jnp.asarray, (q[:, 4:5], k, v, visible[:, 4:5])))),
                                  whole[:, 4:5])
    seen = np.flatnonzero(visible[0, 4])
    moved = np.zeros((1, 1, 260), bool)
    slots = np.sort(rng.choice(260, len(seen), replace=False))  # the same keys, in order, at other slots
    moved[0, 0, slots] = True
    k2, v2 = (rng.standard_normal((1, 260, 3, 64)).astype(np.float32) for _ in range(2))
    k2[0, slots], v2[0, slots] = k[0, seen], v[0, seen]
    np.testing.assert_array_equal(np.asarray(da.decode_attention(*map(jnp.asarray, (q[:, 4:5], k2, v2, moved)))),
                                  whole[:, 4:5])


def test_bad_operands_are_named():
    q, k, v, visible = (jnp.asarray(a) for a in operands(np.random.default_rng(0), 1, 2, 2, 2, 8, 10))
    with pytest.raises(ValueError, match="decode_attention takes float32 q"):
        da.decode_attention(q, k[:, :, :1], v, visible)
    with pytest.raises(ValueError, match="n<=16"):
        da.decode_attention(jnp.zeros((1, 17, 4, 8), jnp.float32), k, v, jnp.ones((1, 17, 10), bool))
    with pytest.raises(ValueError, match="bfloat16"):
        da.decode_attention(q.astype(jnp.bfloat16), k, v, visible)
