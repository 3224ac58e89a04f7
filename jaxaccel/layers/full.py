"""`full` attention kind: every query sees every earlier key (the house Attention), dense KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel.caches.dense import DenseEntry
from jaxaccel.config import ModelConfig
from jaxaccel.layers.attention import Attention
from jaxaccel.layers.context import ForwardContext


class FullAttention(Attention):
    """Attention with the kinds' calling convention: (x, context, cache entry) -> (out, entry)."""

    def __init__(self, config: ModelConfig, layer_index: int = 0, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)

    def __call__(self, x_bnd: jax.Array, ctx: ForwardContext, entry: DenseEntry | None = None):
        if entry is None:
            # The default causal mask without a sliding window is plain causal attention (flash).
            causal = ctx.causal and ctx.sliding_window is None
            out, _ = super().__call__(x_bnd, ctx.positions_bn, ctx.visible(None), causal=causal)
            return out, None
        out, (k, v) = super().__call__(x_bnd, ctx.positions_bn, ctx.visible(entry.max_len),
                                       (entry.keys, entry.values), ctx.lengths_b)
        return out, DenseEntry(keys=k, values=v)


def create_dense_entry(config: ModelConfig, layer_index: int, batch_size: int, max_len: int, dtype) -> DenseEntry:
    """The empty dense cache entry of a full-attention layer."""
    shape = (batch_size, max_len, config.num_kv_heads, config.resolved_head_dim)
    return DenseEntry(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype))
