"""Every kernel lowers for GPU through Pallas's Triton lowering and for TPU through Mosaic, checked
on CPU by exporting for the "cuda" and "tpu" platforms: the result holds one Triton (Triton IR) or
Mosaic (tpu_custom_call) custom call per pallas_call. Exporting runs Pallas's own lowering, with its
block-shape and primitive checks; it does not compile the kernels (Triton IR to PTX, Mosaic to TPU
code) nor run them: that needs the device."""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels import (KernelArgumentError, chunked_linear_attention, decode_attention, flash_attention,
                            grouped_matmul)

TRITON_CALL = "__gpu$xla.gpu.triton"
S, BF16, F32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
QKV = (S((1, 256, 8, 128), BF16), S((1, 256, 2, 128), BF16), S((1, 256, 2, 128), BF16))
CASES = {
    "decode_attention": (1, lambda q, k, v, m: decode_attention(q, k, v, m, block_t=64, interpret=False),
                         (S((2, 4, 8, 128), BF16), S((2, 1000, 2, 128), BF16), S((2, 1000, 2, 128), BF16),
                          S((2, 4, 1000), jnp.bool_))),
    "flash_attention": (1, lambda q, k, v: flash_attention(q, k, v, block_q=64, block_k=64, interpret=False), QKV),
    "flash_attention_backward": (3, lambda q, k, v: jax.grad(
        lambda *a: flash_attention(*a, block_q=64, block_k=64, interpret=False).astype(F32).sum(),
        argnums=(0, 1, 2))(q, k, v), QKV),
    "chunked_linear_attention": (1, lambda q, k, v, g: chunked_linear_attention(q, k, v, g, 64, interpret=False),
                                 (S((1, 256, 2, 64), F32),) * 3 + (S((1, 256, 2), F32),)),
    "grouped_matmul": (1, lambda a, b, g: grouped_matmul(a, b, g, block_m=64, block_k=64, block_n=64, interpret=False),
                       (S((256, 128), BF16), S((4, 128, 128), BF16), S((4,), jnp.int32))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_lowers_to_triton_for_cuda(name):
    num_calls, fn, args = CASES[name]
    exported = export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    assert exported.mlir_module().count(f"@{TRITON_CALL}(") == num_calls


# flash attention goes to splash attention and the grouped matmul to megablox on TPU (JAX's kernels)
TPU_CASES = {name: case for name, case in CASES.items()}
TPU_CASES["flash_attention"] = (1, lambda q, k, v: flash_attention(q, k, v, interpret=False), QKV)
TPU_CASES["flash_attention_backward"] = (3, lambda q, k, v: jax.grad(
    lambda *a: flash_attention(*a, interpret=False).astype(F32).sum(), argnums=(0, 1, 2))(q, k, v), QKV)
TPU_CASES["grouped_matmul"] = (1, lambda a, b, g: grouped_matmul(a, b, g, interpret=False), CASES["grouped_matmul"][2])
TPU_CASES["decode_attention"] = (1, lambda q, k, v, m: decode_attention(q, k, v, m, block_t=256, interpret=False),
                                 CASES["decode_attention"][2])


@pytest.mark.parametrize("name", sorted(TPU_CASES))
def test_lowers_to_mosaic_for_tpu(name, as_if_on_tpu):
    num_calls, fn, args = TPU_CASES[name]
    exported = export.export(jax.jit(fn), platforms=["tpu"])(*args)
    assert exported.mlir_module().count("stablehlo.custom_call @tpu_custom_call(") == num_calls


def test_auto_is_pallas_on_tpu_for_every_head_size(as_if_on_tpu):
    from jaxaccel.config import resolve_attention_impl
    from jaxaccel.layers.attention import dot_product_attention

    assert resolve_attention_impl("auto") == "pallas"
    for kernel in ("decode_attention", "flash_attention", "chunked_linear_attention"):
        for head_dim in (8, 64, 80, 128):
            assert resolve_attention_impl("auto", kernel=kernel, head_dim=head_dim) == "pallas"
    assert resolve_attention_impl("xla", kernel="decode_attention", head_dim=128) == "xla"
    q, kv, visible = jnp.zeros((1, 1, 4, 64)), jnp.zeros((1, 8, 2, 64)), jnp.ones((1, 1, 8), bool)
    jaxpr = str(jax.make_jaxpr(lambda q: dot_product_attention(q, kv, kv, visible, impl="auto"))(q))
    assert "decode_attention_tpu" in jaxpr


def test_auto_is_pallas_on_gpu_unless_triton_cannot_tile_the_heads(monkeypatch):
    """No silent fallback: Triton wants power-of-two tiles, so head_dim 80 (or a flash head below 16)
    stays on XLA under "auto" and is named by an explicit "pallas"; every kernel checks before lowering."""
    from jaxaccel.config import resolve_attention_impl

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_attention_impl("auto") == "pallas"
    assert resolve_attention_impl("auto", kernel="decode_attention", head_dim=128) == "pallas"
    assert resolve_attention_impl("auto", kernel="decode_attention", head_dim=8) == "pallas"
    assert resolve_attention_impl("auto", kernel="decode_attention", head_dim=80) == "xla"
    assert resolve_attention_impl("auto", kernel="flash_attention", head_dim=8) == "xla"
    assert resolve_attention_impl("pallas", kernel="flash_attention", head_dim=8) == "pallas"
    monkeypatch.undo()  # exporting for "cuda" from the CPU backend
    q, kv = jnp.zeros((1, 16, 4, 80)), jnp.zeros((1, 16, 2, 80))
    message = r"on GPU \(Triton\) needs a power-of-two head_dim of at least 16, got 80; use attention_impl='xla'"
    with pytest.raises(KernelArgumentError, match="decode_attention " + message):
        decode_attention(q, kv, kv, jnp.ones((1, 16, 16), bool), interpret=False)
    with pytest.raises(KernelArgumentError, match="flash_attention " + message):
        flash_attention(q, kv, kv, interpret=False)
    with pytest.raises(KernelArgumentError, match="chunked_linear_attention " + message):
        chunked_linear_attention(q, q, q, jnp.zeros((1, 16, 4)), 8, interpret=False)


def test_gpu_tiles_that_tpu_cannot_take_are_named(as_if_on_tpu):
    lhs, rhs = jnp.zeros((256, 256), BF16), jnp.zeros((4, 256, 256), BF16)
    with pytest.raises(KernelArgumentError, match="block_k must be a multiple of 128 on TPU .*got 64"):
        grouped_matmul(lhs, rhs, jnp.full((4,), 64, jnp.int32), block_m=64, block_k=64, block_n=64, interpret=False)
