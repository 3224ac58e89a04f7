"""Every kernel lowers for GPU through Pallas's Triton lowering, checked on CPU by exporting for
the "cuda" platform: the result holds a Triton custom call (Triton IR), one per pallas_call.
This does not compile the Triton IR to PTX nor run it: that needs a GPU."""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels import chunked_linear_attention, decode_attention, flash_attention, grouped_matmul

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


def test_kernels_without_a_tpu_version_say_so_on_tpu(monkeypatch):
    """No silent fallback: on TPU the kernels without TPU blocks raise, and "auto" picks XLA there."""
    from jaxaccel.config import resolve_attention_impl

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_attention_impl("auto") == "xla"
    q = jnp.zeros((1, 1, 2, 16))
    kv = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(NotImplementedError, match="decode_attention has no TPU version"):
        decode_attention(q, kv, kv, jnp.ones((1, 1, 8), bool), interpret=False)
    x = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(NotImplementedError, match="chunked_linear_attention has no TPU version"):
        chunked_linear_attention(x, x, x, jnp.zeros((1, 8, 1)), 8, interpret=False)
