"""Dense projections whose weights name their logical axes (see jaxaccel.sharding)."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel.config import ModelConfig
from jaxaccel.cpu_kernels.panel_matmul import panel_matmul, reads_panels

INIT_STD = 0.02


class DecodeCopy(nnx.Variable):
    """A weight copied into another layout for decoding: not a Param, so never trained or saved."""


def times(x: jax.Array, kernel_kn: jax.Array, panels: DecodeCopy | None) -> jax.Array:
    """x @ kernel [K, N]; through the kernel's panel-packed copy (`panels`, set only by
    `jaxaccel.model.decode_layout`) when there is one and the pass reads panels."""
    if panels is not None and reads_panels(x):
        return panel_matmul(x, panels[...])
    return x @ kernel_kn.astype(x.dtype)


class Projection(nnx.Linear):
    """nnx.Linear that, given a panel-packed copy of its kernel (`panels`, set only by
    `jaxaccel.model.decode_layout`), multiplies a few rows by that copy instead: on CPU the decode
    and tree-verify steps' products (jaxaccel.cpu_kernels.panel_matmul). Same parameters, same
    checkpoints; training and prefill (many rows) use nnx.Linear's product as before."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.panels = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.panels is None or not reads_panels(x):
            return super().__call__(x)
        y = panel_matmul(x, self.panels[...])
        return y if self.bias is None else y + self.bias[...]


def dense(config: ModelConfig, d_in: int, d_out: int, axes: tuple[str, str], bias: bool, rngs: nnx.Rngs) -> Projection:
    """A Projection with kernel [d_in, d_out] annotated with logical `axes` (the bias takes the output axis)."""
    return Projection(
        d_in, d_out, use_bias=bias, rngs=rngs,
        dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(INIT_STD), axes, eager_sharding=False),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:], eager_sharding=False),
    )
