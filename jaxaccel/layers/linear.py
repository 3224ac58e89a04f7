"""Dense projections whose weights name their logical axes (see jaxaccel.sharding)."""

import jax.numpy as jnp
from flax import nnx

from jaxaccel.config import ModelConfig

INIT_STD = 0.02


def dense(config: ModelConfig, d_in: int, d_out: int, axes: tuple[str, str], bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    """nnx.Linear with kernel [d_in, d_out] annotated with logical `axes` (the bias takes the output axis)."""
    return nnx.Linear(
        d_in, d_out, use_bias=bias, rngs=rngs,
        dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(INIT_STD), axes, eager_sharding=False),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:], eager_sharding=False),
    )
