"""Gated feed-forward block: SwiGLU, or GeGLU with the tanh-approximated GELU (Gemma)."""

import jax
from flax import nnx

from jaxaccel.config import ModelConfig
from jaxaccel.layers.linear import dense


def activation(name: str):
    """The gate's activation for ModelConfig.hidden_act."""
    return {"silu": nnx.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}[name]


class MLP(nnx.Module):
    """The gated feed-forward block: down(act(gate(x)) * up(x))."""
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.act = config.hidden_act
        self.gate_proj = dense(config, d, f, ("embed", "mlp"), bias, rngs)
        self.up_proj = dense(config, d, f, ("embed", "mlp"), bias, rngs)
        self.down_proj = dense(config, f, d, ("mlp", "embed"), bias, rngs)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.down_proj(activation(self.act)(self.gate_proj(x_btd)) * self.up_proj(x_btd))
