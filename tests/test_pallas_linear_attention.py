"""pallas_kernels.chunked_linear_attention equals the O(T^2) definition (interpret mode on CPU):
the GPU kernel under the Pallas interpreter, the TPU kernel under the TPU interpreter.

Outputs are NaN-poisoned by the interpreter, so finite matching results prove every element was
written. Tolerances: float32 atol 2e-4 (sums of up to T decayed products of O(1) terms);
bfloat16 inputs atol 5e-2 against the definition evaluated on the same bfloat16 inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import (KernelArgumentError, chunked_linear_attention, chunked_linear_attention_reference,
                            linear_attention_quadratic)

# jitted once per shape: eager jnp ops would each compile on their own
definition = jax.jit(linear_attention_quadratic)
kernel = jax.jit(chunked_linear_attention, static_argnums=4)
chunked_reference = jax.jit(chunked_linear_attention_reference, static_argnums=4)


def inputs(seed, b, t, h, d, dtype=jnp.float32, strongest_decay=2.0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d), np.float32), dtype) for _ in range(3))
    log_decay = jnp.asarray(-rng.uniform(0, strongest_decay, (b, t, h)).astype(np.float32))
    return q, k, v, log_decay


@pytest.mark.parametrize("b,t,h,d,chunk", [(2, 37, 2, 16, 8), (1, 32, 3, 32, 16), (1, 5, 1, 16, 8)])
def test_matches_definition_float32(b, t, h, d, chunk):
    q, k, v, g = inputs(b * 10 + t, b, t, h, d)
    want = definition(q, k, v, g)
    got = kernel(q, k, v, g, chunk)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    np.testing.assert_allclose(chunked_reference(q, k, v, g, chunk), want, atol=2e-4, rtol=0)


def test_no_decay_and_extreme_decay_stay_finite():
    """g = 0 is plain causal linear attention; g = -80 per step underflows exp, never overflows."""
    q, k, v, _ = inputs(5, 1, 20, 2, 16)
    for value in (0.0, -80.0):
        g = jnp.full((1, 20, 2), value)
        got = kernel(q, k, v, g, 8)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, definition(q, k, v, g), atol=2e-4, rtol=0)


def test_bfloat16():
    q, k, v, g = inputs(6, 1, 24, 2, 16, jnp.bfloat16)
    got = kernel(q, k, v, g, 8)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), definition(q, k, v, g).astype(jnp.float32),
                               atol=5e-2, rtol=0)


def test_gradient_is_the_reference_backward():
    q, k, v, g = inputs(7, 1, 19, 2, 16)
    d_out = jnp.asarray(np.random.default_rng(8).standard_normal(q.shape, np.float32))
    loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * d_out), argnums=(0, 1, 2, 3)))
    grads = loss(lambda *a: chunked_linear_attention(*a, chunk_size=8))(q, k, v, g)
    want = loss(linear_attention_quadratic)(q, k, v, g)
    for name, got, w in zip(("q", "k", "v", "log_decay"), grads, want):
        np.testing.assert_allclose(got, w, atol=5e-4, rtol=0, err_msg=name)


def test_bad_shapes_are_named():
    q, k, v, g = inputs(0, 1, 8, 2, 8)
    with pytest.raises(KernelArgumentError, match="log_decay_bth must be"):
        chunked_linear_attention(q, k, v, g[:, :, :1])
    with pytest.raises(KernelArgumentError, match="chunk_size"):
        chunked_linear_attention(q, k, v, g, 0)


def test_same_function_as_the_model_layer():
    """The model's linear-attention layer (jaxaccel.layers.linear_attention) uses this definition too."""
    from jaxaccel.layers.linear_attention import chunked_linear_attention as layer_chunked

    q, k, v, g = inputs(9, 2, 21, 2, 16)
    np.testing.assert_allclose(kernel(q, k, v, g, 8), layer_chunked(q, k, v, g, chunk_size=8), atol=2e-4, rtol=0)


@pytest.mark.parametrize("b,t,h,d,e,chunk", [(2, 37, 2, 16, 32, 8), (1, 64, 3, 128, 64, 64), (1, 5, 1, 8, 8, 16)])
def test_tpu_kernel_matches_definition(b, t, h, d, e, chunk):
    """The TPU kernel (chunked_linear_attention_tpu) under the TPU interpreter; Dv != D allowed."""
    q, k, _, g = inputs(b * 20 + t, b, t, h, d)
    v = jnp.asarray(np.random.default_rng(t).standard_normal((b, t, h, e), np.float32))
    got = chunked_linear_attention(q, k, v, g, chunk, interpret=pltpu.InterpretParams())
    assert got.shape == (b, t, h, e) and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, definition(q, k, v, g), atol=2e-4, rtol=0)


def test_tpu_kernel_bfloat16_and_gradient():
    q, k, v, g = inputs(16, 1, 40, 2, 16, jnp.bfloat16)
    tpu = functools.partial(chunked_linear_attention, chunk_size=16, interpret=pltpu.InterpretParams())
    got = tpu(q, k, v, g)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), definition(q, k, v, g).astype(jnp.float32),
                               atol=5e-2, rtol=0)
    q, k, v, g = inputs(17, 1, 19, 2, 8)
    grads = jax.grad(lambda *a: jnp.sum(tpu(*a) ** 2), argnums=(0, 3))(q, k, v, g)
    want = jax.grad(lambda *a: jnp.sum(linear_attention_quadratic(*a) ** 2), argnums=(0, 3))(q, k, v, g)
    for got_grad, want_grad in zip(grads, want):
        np.testing.assert_allclose(got_grad, want_grad, atol=5e-4, rtol=0)
    with pytest.raises(KernelArgumentError, match="chunk_size must be a multiple of 8 on TPU, got 12"):
        chunked_linear_attention(q, k, v, g, 12, interpret=pltpu.InterpretParams())
