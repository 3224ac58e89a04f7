"""`duo` attention kind (DuoAttention): per KV head, retrieval heads attend to the whole context
(dense cache) and streaming heads to the first `sink_size` tokens plus the last `recent_size`
(the query itself included), kept in a constant-size ring (jaxaccel.caches.streaming).

The same masks hold in every mode, so training, prefill, decoding and tree verification agree:
a streaming head's query at position p sees key position s <= p iff s < sink_size or
p - s < recent_size (and the tree/causal mask among the new tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel.caches.dense import DenseEntry
from jaxaccel.caches.duo import DuoEntry
from jaxaccel.caches.rows import write_rows
from jaxaccel.caches.streaming import StreamingEntry
from jaxaccel.config import AttentionSpec, ModelConfig
from jaxaccel.layers.attention import Attention
from jaxaccel.layers.context import ForwardContext
from jaxaccel.layers.heads_split import attend, merge_groups, query_heads


def streaming_visible(query_pos_bn: jax.Array, key_pos_bt: jax.Array, sink: int, recent: int) -> jax.Array:
    """[B, n, t]: a streaming head's rule (sink or recent), causality left to the caller's mask."""
    key = key_pos_bt[:, None, :]
    return (key < sink) | (query_pos_bn[:, :, None] - key < recent)


class DuoAttention(Attention):
    """`duo` attention (module doc): retrieval heads see the whole context, streaming heads sink + recent."""
    def __init__(self, config: ModelConfig, layer_index: int = 0, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs, layer_index=layer_index)
        spec = config.attention or AttentionSpec(kinds=("duo",))
        retrieval = spec.retrieval_mask(layer_index, config.num_kv_heads)
        self.retrieval_kv = tuple(h for h, r in enumerate(retrieval) if r)
        self.streaming_kv = tuple(h for h, r in enumerate(retrieval) if not r)
        self.sink, self.recent = spec.sink_size, spec.recent_size

    def __call__(self, x_bnd: jax.Array, ctx: ForwardContext, entry: DuoEntry | None = None):
        b, n, _ = x_bnd.shape
        q, k, v = self.project_qkv(x_bnd, ctx.positions_bn)
        group = self.num_heads // self.num_kv_heads
        if ctx.duo_gates is not None:
            if entry is not None:
                raise ValueError("duo gates are for training without a cache")
            return self.gated(q, k, v, ctx, ctx.duo_gates[self.layer_index]), None
        outputs, retrieval, streaming = [], None, None
        impl = self.config.attention_impl
        pos_bn = ctx.positions_bn
        if self.retrieval_kv:
            heads, kv = query_heads(self.retrieval_kv, group), list(self.retrieval_kv)
            k_r, v_r = k[:, :, kv], v[:, :, kv]
            if entry is None:
                outputs.append((heads, attend(q[:, :, heads], k_r, v_r, ctx.visible(None, self.sliding_window), impl)))
            else:
                retrieval = DenseEntry(keys=write_rows(entry.retrieval.keys, k_r, ctx.lengths_b),
                                       values=write_rows(entry.retrieval.values, v_r, ctx.lengths_b))
                outputs.append((heads, attend(q[:, :, heads], retrieval.keys, retrieval.values,
                                              ctx.visible(retrieval.max_len, self.sliding_window), impl)))
        if self.streaming_kv:
            heads, kv = query_heads(self.streaming_kv, group), list(self.streaming_kv)
            k_s, v_s = k[:, :, kv], v[:, :, kv]
            new_visible = (ctx.visible(None, self.sliding_window)
                           & streaming_visible(pos_bn, pos_bn, self.sink, self.recent))
            if entry is None:
                outputs.append((heads, attend(q[:, :, heads], k_s, v_s, new_visible, impl)))
            else:  # the committed ring, then the new tokens (left pending until commit)
                ring = entry.streaming
                slot_pos_bs, held_bs = ring.held(ctx.lengths_b)
                ring_visible = held_bs[:, None, :] & streaming_visible(pos_bn, slot_pos_bs, self.sink, self.recent)
                keys = jnp.concatenate([ring.keys, k_s.astype(ring.keys.dtype)], axis=1)
                values = jnp.concatenate([ring.values, v_s.astype(ring.values.dtype)], axis=1)
                visible = jnp.concatenate([ring_visible, new_visible], axis=2)
                outputs.append((heads, attend(q[:, :, heads], keys, values, visible, impl)))
                streaming = ring.with_pending(k_s, v_s)
        out = merge_groups(outputs, self.num_heads)
        new_entry = None if entry is None else DuoEntry(retrieval=retrieval, streaming=streaming)
        return self.o_proj(out.reshape(b, n, self.num_heads * self.head_dim)), new_entry


    def gated(self, q, k, v, ctx: ForwardContext, gate_k: jax.Array) -> jax.Array:
        """DuoAttention's training form: per KV head, gate * full + (1 - gate) * streaming attention."""
        b, n = q.shape[:2]
        full_visible = ctx.visible(None, self.sliding_window)
        pos_bn = ctx.positions_bn
        impl = self.config.attention_impl
        full = attend(q, k, v, full_visible, impl)
        streaming = attend(q, k, v, full_visible & streaming_visible(pos_bn, pos_bn, self.sink, self.recent), impl)
        gate_h = jnp.repeat(gate_k.astype(full.dtype), self.num_heads // self.num_kv_heads)[:, None]
        out = gate_h * full + (1 - gate_h) * streaming
        return self.o_proj(out.reshape(b, n, self.num_heads * self.head_dim))


def create_duo_entry(config: ModelConfig, layer_index: int, batch_size: int, max_len: int, dtype) -> DuoEntry:
    """The empty cache entry of a duo layer: dense for its retrieval heads, a ring for its streaming heads."""
    spec = config.attention or AttentionSpec(kinds=("duo",))
    retrieval = spec.retrieval_mask(layer_index, config.num_kv_heads)
    num_retrieval, d = sum(retrieval), config.resolved_head_dim
    num_streaming = len(retrieval) - num_retrieval
    dense = None
    if num_retrieval:
        shape = (batch_size, max_len, num_retrieval, d)
        dense = DenseEntry(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype))
    ring = None
    if num_streaming:
        ring = StreamingEntry.create(batch_size, num_streaming, d, spec.sink_size, spec.recent_size, max_len, dtype)
    return DuoEntry(retrieval=dense, streaming=ring)
