"""pallas_kernels.flash_attention: forward and backward equal the reference (interpret mode).

Outputs (and dq/dk/dv) are NaN-poisoned by the interpreter, so finite matching results prove that
every element was written. Tolerances: float32 atol 2e-5 (forward) and 1e-4 (gradients);
bfloat16 atol 3e-2 against the reference on the same bfloat16 inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import (KernelArgumentError, flash_attention, flash_attention_reference, flash_attention_tpu,
                            streaming_block_mask)


def qkv(seed, b, t, hq, hkv, d, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                 for shape in ((b, t, hq, d), (b, t, hkv, d), (b, t, hkv, d)))


def output_and_grads(attention, q, k, v, d_out, **kw):
    """attention(q, k, v, **kw) and the gradients of <output, d_out>, in one jit (fewer compiles)."""
    def run(q, k, v):
        out, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, **kw), q, k, v)
        return out, pullback(d_out)
    return jax.jit(run)(q, k, v)


def check_forward_and_backward(q, k, v, **kw):
    d_out = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))
    got, grads = output_and_grads(flash_attention, q, k, v, d_out, **kw)
    want, want_grads = output_and_grads(flash_attention_reference, q, k, v, d_out, **kw)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    for name, g, w in zip("qkv", grads, want_grads):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"d{name}")
    return got


def test_causal_gqa_t_not_a_multiple_of_the_blocks():
    check_forward_and_backward(*qkv(0, 2, 37, 4, 2, 16), causal=True, block_q=16, block_k=8)


def test_streaming_lambda_mask_on_some_heads():
    t, bq, bk = 40, 8, 8
    heads = np.array([True, False, True, True])
    mask = streaming_block_mask(4, t, block_q=bq, block_k=bk, sink_tokens=4, recent_tokens=12, streaming_heads=heads)
    assert mask[1].all() and not mask[0].all()  # dense head, streaming head
    assert mask[0, -1, 0] and not mask[0, -1, 1] and mask[0, -1, -2]  # sink, gap, recent: the Λ
    check_forward_and_backward(*qkv(1, 1, t, 4, 1, 16), causal=True, block_mask_hqk=mask, block_q=bq, block_k=bk)


def test_random_block_sparse_non_causal_with_empty_rows():
    """Some query blocks see no key block at all: their output and gradients are zero."""
    mask = np.random.default_rng(2).random((2, 3, 3)) < 0.5
    mask[0, 1] = False
    q, k, v = qkv(2, 1, 24, 2, 2, 16)  # head_dim 16: Triton's smallest
    out = check_forward_and_backward(q, k, v, causal=False, block_mask_hqk=mask, block_q=8, block_k=8)
    assert np.all(out[0, 8:16, 0] == 0)


def test_tpu_path_splash_attention_matches_reference():
    """The TPU route (splash attention, under the TPU interpreter here): streaming Λ on some heads, GQA,
    T = 200 not a multiple of its 128-wide blocks; forward and backward."""
    t, block = 200, 128
    mask = streaming_block_mask(4, t, block_q=block, block_k=block, sink_tokens=4, recent_tokens=20,
                                streaming_heads=np.array([True, False, True, False]))
    q, k, v = qkv(4, 1, t, 4, 2, 16)
    d_out = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))
    kw = dict(causal=True, block_mask_hqk=mask, block_q=block, block_k=block)
    got, grads = output_and_grads(lambda *a, **kw: flash_attention(*a, interpret=pltpu.InterpretParams(), **kw), q, k, v,
                                  d_out, **kw)
    want, want_grads = output_and_grads(flash_attention_reference, q, k, v, d_out, **kw)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    for name, g, w in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"d{name}")
    empty = np.ones((4, 2, 2), bool)
    empty[0, 1] = False
    with pytest.raises(KernelArgumentError, match="every query to see a key"):
        flash_attention_tpu(q, k, v, causal=True, block_mask_hqk=empty, block_q=block, block_k=block, interpret=True)


def test_bfloat16_forward():
    q, k, v = qkv(3, 1, 33, 4, 2, 16, jnp.bfloat16)
    got = flash_attention(q, k, v, block_q=16, block_k=16)
    want = flash_attention_reference(q, k, v, block_q=16, block_k=16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=3e-2, rtol=0)


def test_bad_arguments_are_named():
    q, k, v = qkv(0, 1, 16, 4, 2, 8)
    with pytest.raises(KernelArgumentError, match="block_mask_hqk must have shape"):
        flash_attention(q, k, v, block_mask_hqk=np.ones((4, 1, 1), bool), block_q=8, block_k=8)
    with pytest.raises(KernelArgumentError, match="multiple of kv heads"):
        flash_attention(q[:, :, :3], k, v)
    with pytest.raises(KernelArgumentError, match="recent_tokens"):
        streaming_block_mask(4, 16, block_q=8, block_k=8, sink_tokens=1, recent_tokens=0)


def test_model_training_runs_flash_attention_with_the_xla_loss_and_gradients():
    """attention_impl="pallas": a cache-free causal forward (training) goes through flash attention,
    and the loss and every parameter gradient equal the XLA path's."""
    from flax import nnx

    from jaxaccel import ModelConfig, Transformer

    config = ModelConfig(vocab_size=40, hidden_size=64, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=64)
    graphdef, state = nnx.split(Transformer(config.replace(attention_impl="xla"), rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 40, (2, 37)), jnp.int32)  # 37: ragged last block

    def loss_and_grads(impl):
        pallas_def = nnx.graphdef(Transformer(config.replace(attention_impl=impl), rngs=nnx.Rngs(0)))

        def loss(state):
            logits = nnx.merge(pallas_def, state)(tokens[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))
        return jax.jit(jax.value_and_grad(loss))(state), jax.make_jaxpr(loss)(state)

    (loss_pallas, grads_pallas), jaxpr = loss_and_grads("pallas")
    (loss_xla, grads_xla), _ = loss_and_grads("xla")
    assert "flash_attention_fwd" in str(jaxpr)
    np.testing.assert_allclose(loss_pallas, loss_xla, atol=1e-5, rtol=0)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads_pallas), jax.tree.leaves(grads_xla)):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=jax.tree_util.keystr(path))
