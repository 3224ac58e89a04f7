"""`full` attention kind: every query sees every earlier key (the house Attention), or, in a
sliding layer (ModelConfig.layer_window), the last `sliding_window` keys (its own included).

A full layer's cache is dense. A sliding layer's is a ring of `sliding_window` slots
(jaxaccel.caches.streaming, with no sink) unless the cache was made dense on every layer
(`KVCache.create(..., sliding="dense")`); both give the same output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel.caches.dense import DenseEntry
from jaxaccel.caches.streaming import StreamingEntry
from jaxaccel.config import ModelConfig
from jaxaccel.layers.attention import Attention
from jaxaccel.layers.context import ForwardContext


class FullAttention(Attention):
    """Attention with the kinds' calling convention: (x, context, cache entry) -> (out, entry)."""

    def __init__(self, config: ModelConfig, layer_index: int = 0, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs, layer_index=layer_index)

    def __call__(self, x_bnd: jax.Array, ctx: ForwardContext, entry: DenseEntry | StreamingEntry | None = None):
        window = self.sliding_window
        if entry is None:
            # The default causal mask without a sliding window is plain causal attention (flash).
            causal = ctx.causal and window is None
            out, _ = super().__call__(x_bnd, ctx.positions_bn, ctx.visible(None, window), causal=causal)
            return out, None
        if isinstance(entry, StreamingEntry):
            return self.over_ring(x_bnd, ctx, entry)
        # A prefill (nothing cached yet) attends among its own tokens, not over the empty slots after them.
        among_new = ctx.empty_cache and window is None
        visible = ctx.visible(None) if among_new else ctx.visible(entry.max_len, window)
        out, (k, v) = super().__call__(x_bnd, ctx.positions_bn, visible, (entry.keys, entry.values), ctx.lengths_b,
                                       causal=ctx.causal and among_new, among_new=among_new)
        return out, DenseEntry(keys=k, values=v)

    def over_ring(self, x_bnd: jax.Array, ctx: ForwardContext, ring: StreamingEntry):
        """A sliding layer over its ring: the committed slots still inside each query's window, then
        the new tokens under the pass's mask (their K/V left pending until commit)."""
        b, n, _ = x_bnd.shape
        q, k, v = self.project_qkv(x_bnd, ctx.positions_bn)
        slot_pos_bs, held_bs = ring.held(ctx.lengths_b)
        in_window_bns = ctx.positions_bn[:, :, None] - slot_pos_bs[:, None, :] < self.sliding_window
        visible = jnp.concatenate([held_bs[:, None, :] & in_window_bns, ctx.visible(None, self.sliding_window)], axis=2)
        keys = jnp.concatenate([ring.keys, k.astype(ring.keys.dtype)], axis=1)
        values = jnp.concatenate([ring.values, v.astype(ring.values.dtype)], axis=1)
        out = self.attend(q, keys, values, visible)
        return self.o_proj(out.reshape(b, n, self.num_heads * self.head_dim)), ring.with_pending(k, v)


def create_dense_entry(config: ModelConfig, layer_index: int, batch_size: int, max_len: int, dtype,
                       sliding: str = "ring") -> DenseEntry | StreamingEntry:
    """The empty cache entry of a full-attention layer: dense, or a ring of `sliding_window` slots
    in a sliding layer (sliding="ring") where that is smaller than max_len."""
    window, d = config.layer_window(layer_index), config.resolved_head_dim
    if sliding == "ring" and window is not None and window < max_len:
        return StreamingEntry.create(batch_size, config.num_kv_heads, d, 0, window, max_len, dtype)
    shape = (batch_size, max_len, config.num_kv_heads, d)
    return DenseEntry(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype))
