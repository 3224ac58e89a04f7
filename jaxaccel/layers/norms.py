"""RMSNorm, computed in float32 as the reference implementations do."""

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """x / rms(x) * (offset + scale), in float32. Llama stores the factor (offset 0, scale from 1);
    Gemma stores w and scales by 1 + w (offset 1, scale from 0)."""
    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, axis_name: str = "norm", offset: float = 0.0):
        self.eps, self.offset = eps, offset
        init = jnp.zeros if offset else jnp.ones
        self.scale = nnx.Param(init((dim,), param_dtype), out_sharding=(axis_name,), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        factor = self.scale[...].astype(jnp.float32)
        if self.offset:
            factor = self.offset + factor
        return (factor * x32).astype(x.dtype)
