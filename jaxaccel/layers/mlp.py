"""SwiGLU feed-forward block."""

import jax
from flax import nnx

from jaxaccel.config import ModelConfig
from jaxaccel.layers.linear import dense


class MLP(nnx.Module):
    """The SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = dense(config, d, f, ("embed", "mlp"), bias, rngs)
        self.up_proj = dense(config, d, f, ("embed", "mlp"), bias, rngs)
        self.down_proj = dense(config, f, d, ("mlp", "embed"), bias, rngs)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.down_proj(nnx.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd))
