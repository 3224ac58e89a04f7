"""pallas_kernels.decode_attention equals the model's XLA attention (interpret mode on CPU): the
GPU kernel under the Pallas interpreter, the TPU kernel under the TPU interpreter.

Outputs are NaN-poisoned by the interpreters (tests/test_pallas_interpret_poison.py), so a finite
result that matches proves every element was written. Tolerances: float32 atol 2e-5; bfloat16
inputs atol 3e-2 against the reference run on the same bfloat16 inputs (outputs are O(1)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxaccel.layers.attention import dot_product_attention, visible_keys
from pallas_kernels import KernelArgumentError, decode_attention, decode_attention_reference

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def random_case(seed, b, n, hq, hkv, d, t, dtype=jnp.float32, sliding_window=None):
    """Cache rows of ragged lengths, n new tokens under a random tree (ancestor) mask; the
    visibility is the model's own `visible_keys`. Built in numpy: eager jnp ops compile one by one."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
               for shape in ((b, n, hq, d), (b, t, hkv, d), (b, t, hkv, d)))
    lengths = rng.integers(0, t - n + 1, b).astype(np.int32)
    tree = np.eye(n, dtype=bool)
    for i in range(1, n):
        tree[i] |= tree[rng.integers(0, i)]  # a random parent before it: ancestors are visible
    positions = lengths[:, None] + (tree.sum(1) - 1)[None, :]
    visible = jax.jit(visible_keys, static_argnums=(3, 4))(
        jnp.asarray(np.broadcast_to(tree, (b, n, n))), jnp.asarray(positions), jnp.asarray(lengths), t, sliding_window)
    return q, k, v, visible, jnp.asarray(lengths)


# (b, n, hq, hkv, d, t, block_t, num_splits): n = 1 decoding, n = tree size, GQA 1/2/4,
# T not a multiple of the block, more splits than blocks, one split, more rows (n * g) than one program takes
SHAPES = [
    (3, 1, 4, 2, 16, 37, 8, 3),
    (2, 6, 8, 2, 16, 50, 16, 2),
    (2, 4, 4, 4, 8, 29, 32, 4),
    (1, 3, 4, 1, 16, 64, 8, 1),
    (1, 40, 4, 2, 16, 90, 16, 2),
]


@pytest.mark.parametrize("b,n,hq,hkv,d,t,block_t,num_splits", SHAPES)
def test_matches_reference_float32(b, n, hq, hkv, d, t, block_t, num_splits):
    q, k, v, visible, lengths = random_case(b * 100 + t, b, n, hq, hkv, d, t)
    want = decode_attention_reference(q, k, v, visible)
    for kv_end in (None, lengths + n):  # read off the mask, or given by the model
        got = decode_attention(q, k, v, visible, kv_end, block_t=block_t, num_splits=num_splits)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, atol=TOLERANCE[jnp.float32], rtol=0)


def test_matches_reference_bfloat16_with_sliding_window():
    q, k, v, visible, _ = random_case(7, 2, 5, 4, 2, 16, 45, jnp.bfloat16, sliding_window=9)
    got = decode_attention(q, k, v, visible, block_t=16, num_splits=2)
    want = decode_attention_reference(q, k, v, visible)
    assert got.dtype == jnp.bfloat16 and np.all(np.isfinite(got.astype(jnp.float32)))
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=TOLERANCE[jnp.bfloat16], rtol=0)


def test_streaming_cache_general_mask():
    """A streaming (sink + recent) cache is a short T with its own mask: here random visibility
    (each query sees at least one slot), which no length bound describes."""
    rng = np.random.default_rng(3)
    b, n, hq, hkv, d, t = 2, 3, 4, 2, 16, 24
    q = jnp.asarray(rng.standard_normal((b, n, hq, d), np.float32))
    k, v = jnp.asarray(rng.standard_normal((2, b, t, hkv, d), np.float32))
    visible_np = rng.random((b, n, t)) < 0.4
    visible_np[:, :, 5] = True
    visible = jnp.asarray(visible_np)
    got = decode_attention(q, k, v, visible, block_t=8, num_splits=2)
    np.testing.assert_allclose(got, decode_attention_reference(q, k, v, visible), atol=TOLERANCE[jnp.float32], rtol=0)


def test_mask_per_kv_head():
    """[B, Hkv, n, T]: each kv head (and its query group) has its own visibility, as DuoAttention's
    streaming heads and the Λ heads of jaxaccel.layers.heads_split do."""
    from jaxaccel.layers.heads_split import masked_attention_per_head

    q, k, v, visible, lengths = random_case(5, 2, 3, 8, 4, 16, 40)
    rng = np.random.default_rng(5)
    keep = rng.random((2, 4, 3, 40)) < 0.5
    keep[..., 0] = True  # every query sees slot 0: no query is left with nothing to see
    per_head = jnp.asarray(np.asarray(visible)[:, None] & keep)
    per_head = per_head.at[..., 0].set(True)
    got = decode_attention(q, k, v, per_head, lengths + 3, block_t=8, num_splits=3)
    want = decode_attention_reference(q, k, v, per_head)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=TOLERANCE[jnp.float32], rtol=0)
    np.testing.assert_allclose(want, masked_attention_per_head(q, k, v, per_head), atol=1e-6, rtol=0)


def test_model_dispatch_and_gradient():
    q, k, v, visible, _ = random_case(11, 2, 2, 4, 2, 16, 20)
    xla = dot_product_attention(q, k, v, visible, impl="xla")
    np.testing.assert_allclose(dot_product_attention(q, k, v, visible, impl="pallas"), xla, atol=2e-5, rtol=0)
    assert "pallas_call" in str(jax.make_jaxpr(lambda q: dot_product_attention(q, k, v, visible, impl="pallas"))(q))
    grad = jax.grad(lambda q: jnp.sum(decode_attention(q, k, v, visible) ** 2))(q)
    grad_ref = jax.grad(lambda q: jnp.sum(decode_attention_reference(q, k, v, visible) ** 2))(q)
    np.testing.assert_allclose(grad, grad_ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="unknown attention_impl 'triton'"):
        dot_product_attention(q, k, v, visible, impl="triton")


def test_bad_shapes_are_named():
    q, k, v, visible, _ = random_case(0, 1, 2, 4, 2, 8, 16)
    with pytest.raises(KernelArgumentError, match="multiple of kv heads"):
        decode_attention(q[:, :, :3], k, v, visible)
    with pytest.raises(KernelArgumentError, match=r"visible_bnt must be \[B, n, T\] = \(1, 2, 16\) or per kv head"):
        decode_attention(q, k, v, visible[:, :, :-1])
    with pytest.raises(KernelArgumentError, match="kv_end_b"):
        decode_attention(q, k, v, visible, jnp.zeros((3,), jnp.int32))


# The TPU kernel (decode_attention_tpu), simulated: (b, n, hq, hkv, d, t, block_t) with n = 1 and
# tree sizes, GQA 2/8/4/1, one kv head per 128-lane block (D = 128), two (D = 64, as in the small
# preset), all heads of the row in one block (D = 80, D = 48 with one kv head), T not a multiple of
# the block, a cache shorter than one block (streaming), ragged rows (short rows skip their later
# blocks).
TPU = pltpu.InterpretParams()
TPU_SHAPES = [(3, 1, 4, 2, 128, 300, 128), (2, 6, 8, 1, 48, 500, 256), (2, 3, 8, 2, 128, 129, 128),
              (2, 2, 4, 2, 128, 72, 128), (2, 4, 8, 4, 64, 260, 128), (1, 1, 2, 2, 80, 150, 128),
              (1, 5, 8, 8, 64, 140, 128)]


@pytest.mark.parametrize("b,n,hq,hkv,d,t,block_t", TPU_SHAPES)
def test_tpu_kernel_matches_reference(b, n, hq, hkv, d, t, block_t):
    q, k, v, visible, lengths = random_case(b * 1000 + t, b, n, hq, hkv, d, t)
    want = decode_attention_reference(q, k, v, visible)
    for kv_end in (None, lengths + n):
        got = decode_attention(q, k, v, visible, kv_end, block_t=block_t, interpret=TPU)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, atol=TOLERANCE[jnp.float32], rtol=0)


def test_tpu_kernel_bfloat16_sliding_window_and_mask_per_kv_head():
    """Per-kv-head masks with two kv heads in each 128-lane block (D = 64)."""
    q, k, v, visible, lengths = random_case(13, 2, 4, 8, 4, 64, 260, jnp.bfloat16, sliding_window=70)
    got = decode_attention(q, k, v, visible, block_t=128, interpret=TPU)
    want = decode_attention_reference(q, k, v, visible)
    assert got.dtype == jnp.bfloat16 and np.all(np.isfinite(got.astype(jnp.float32)))
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=TOLERANCE[jnp.bfloat16], rtol=0)
    keep = np.random.default_rng(13).random((2, 4, 4, 260)) < 0.5
    per_head = jnp.asarray(np.asarray(visible)[:, None] & keep).at[..., 0].set(True)
    got = decode_attention(q, k, v, per_head, lengths + 4, block_t=128, interpret=TPU)
    want = decode_attention_reference(q, k, v, per_head)
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=TOLERANCE[jnp.bfloat16], rtol=0)


def test_tpu_kernel_names_a_block_it_cannot_tile():
    q, k, v, visible, _ = random_case(1, 1, 1, 2, 1, 128, 40)
    with pytest.raises(KernelArgumentError, match="block_t must be a multiple of 128 on TPU, got 64"):
        decode_attention(q, k, v, visible, block_t=64, interpret=TPU)
