"""`block_sparse` attention kind (LServe-style): static Λ block masks plus Quest page selection.

Per KV head (AttentionSpec.retrieval_heads):
  Λ heads — in every mode, key block kb is visible from query block qb (blocks of block_size
      positions) iff kb < sink_blocks or qb - kb < local_blocks (and causal / the tree mask);
  dense heads — among the new tokens of a pass, the causal / tree mask (training and prefill
      are dense); over the committed cache (decoding, verification) a key at position s is
      visible iff s < sink_blocks * block_size, or p - s < local_blocks * block_size, or its page
      is among the query's top pages (Quest): complete pages of page_size committed keys with
      keys before the local window (and past the sink) are ranked by the upper bound of q · k from the page's key min / max,
      summed over the KV head's query heads, and the best token_budget / page_size are kept.
Verification equals step-by-step decoding while the tree's depth is at most
local_blocks * block_size - page_size (a page a path completes is not ranked by its own nodes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel.caches.block_pages import PagedEntry
from jaxaccel.caches.rows import write_rows
from jaxaccel.config import AttentionSpec, ModelConfig
from jaxaccel.layers.attention import Attention
from jaxaccel.layers.context import ForwardContext
from jaxaccel.layers.heads_split import attend, masked_attention_per_head, merge_groups, query_heads
from jaxaccel.layers.sparse_decode import gathered_attention, segment_slots, top_pages

SPARSE_DECODE_MAX_NEW = 64  # passes of at most this many new tokens (decode, tree verify) gather their keys


def lambda_visible(query_pos_bn: jax.Array, key_pos_bt: jax.Array, block_size: int, sink_blocks: int,
                   local_blocks: int) -> jax.Array:
    """[B, n, t]: the Λ block mask (sink blocks + local blocks); causality left to the caller."""
    key_block = key_pos_bt[:, None, :] // block_size
    return (key_block < sink_blocks) | (query_pos_bn[:, :, None] // block_size - key_block < local_blocks)


def page_upper_bounds(q_bnkgd: jax.Array, page_min_bpkd: jax.Array, page_max_bpkd: jax.Array) -> jax.Array:
    """Quest's bound on max_k q · k over each page, summed over a KV head's query heads: [B, Hkv, n, P].
    sum_d max(q_d lo_d, q_d hi_d) = q · (lo + hi) / 2 + |q| · (hi - lo) / 2."""
    mid = (page_min_bpkd + page_max_bpkd).astype(jnp.float32) / 2
    radius = (page_max_bpkd - page_min_bpkd).astype(jnp.float32) / 2
    q = q_bnkgd.astype(jnp.float32)
    return (jnp.einsum("bnkgd,bpkd->bknp", q, mid) + jnp.einsum("bnkgd,bpkd->bknp", jnp.abs(q), radius))


def quest_candidates(num_pages: int, lengths_b, query_pos_bn, page_size: int, sink_tokens: int,
                     local_tokens: int) -> jax.Array:
    """[B, n, P]: complete committed pages with keys past the sink and before the local window."""
    start_p = jnp.arange(num_pages) * page_size
    end_p = start_p + page_size
    return ((end_p[None, None, :] <= lengths_b[:, None, None]) & (end_p[None, None, :] > sink_tokens)
            & (start_p[None, None, :] <= query_pos_bn[:, :, None] - local_tokens))


def quest_pages(bounds_bknp: jax.Array, lengths_b: jax.Array, query_pos_bn: jax.Array, page_size: int,
                sink_tokens: int, local_tokens: int, budget_pages: int) -> jax.Array:
    """[B, Hkv, n, P] pages selected per query: the top `budget_pages` bounds among the committed,
    complete pages with keys past the sink and before the query's local window. With a budget
    of every page, every key is visible (local_window >= page_size leaves no gap)."""
    candidate_bnp = quest_candidates(bounds_bknp.shape[-1], lengths_b, query_pos_bn, page_size, sink_tokens,
                                     local_tokens)
    scores = jnp.where(candidate_bnp[:, None], bounds_bknp, -jnp.inf)
    k = min(budget_pages, bounds_bknp.shape[-1])
    kth_best = jax.lax.top_k(scores, k)[0][..., -1:]
    return candidate_bnp[:, None] & (scores >= kth_best)


class BlockSparseAttention(Attention):
    """`block_sparse` attention (module doc): Λ heads with the block mask, dense heads with Quest decoding."""
    def __init__(self, config: ModelConfig, layer_index: int = 0, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs, layer_index=layer_index)
        spec = config.attention or AttentionSpec(kinds=("block_sparse",))
        dense = spec.retrieval_mask(layer_index, config.num_kv_heads)
        self.dense_kv = tuple(h for h, r in enumerate(dense) if r)
        self.lambda_kv = tuple(h for h, r in enumerate(dense) if not r)
        self.block_size, self.sink_blocks, self.local_blocks = spec.block_size, spec.sink_blocks, spec.local_blocks
        self.page_size, self.budget_pages = spec.page_size, spec.token_budget // spec.page_size

    def _lambda(self, query_pos_bn, key_pos_bt):
        return lambda_visible(query_pos_bn, key_pos_bt, self.block_size, self.sink_blocks, self.local_blocks)

    def __call__(self, x_bnd: jax.Array, ctx: ForwardContext, entry: PagedEntry | None = None):
        b, n, _ = x_bnd.shape
        q, k, v = self.project_qkv(x_bnd, ctx.positions_bn)
        group = self.num_heads // self.num_kv_heads
        pos_bn = ctx.positions_bn
        if entry is None:
            keys, values, t = k, v, None
        else:
            keys, values = write_rows(entry.keys, k, ctx.lengths_b), write_rows(entry.values, v, ctx.lengths_b)
            t = keys.shape[1]
        if entry is not None and n <= SPARSE_DECODE_MAX_NEW:
            out = self._sparse_decode(q, keys, values, ctx, entry)
            new_entry = entry.with_written(keys, values, n)
            return self.o_proj(out.reshape(b, n, self.num_heads * self.head_dim)), new_entry
        visible_bnt, key_pos_bt = ctx.visible(t, self.sliding_window), ctx.key_positions(t)
        outputs = []
        if self.lambda_kv:
            heads, kv = query_heads(self.lambda_kv, group), list(self.lambda_kv)
            outputs.append((heads, attend(q[:, :, heads], keys[:, :, kv], values[:, :, kv],
                                          visible_bnt & self._lambda(pos_bn, key_pos_bt),
                                          self.config.attention_impl)))
        if self.dense_kv:
            heads, kv = query_heads(self.dense_kv, group), list(self.dense_kv)
            q_d = q[:, :, heads]
            if entry is None:
                outputs.append((heads, attend(q_d, keys[:, :, kv], values[:, :, kv], visible_bnt,
                                              self.config.attention_impl)))
            else:
                q_bnkgd = q_d.reshape(b, n, len(kv), group, self.head_dim)
                bounds = page_upper_bounds(q_bnkgd, entry.page_min[:, :, kv], entry.page_max[:, :, kv])
                sink_tokens, local_tokens = self.sink_blocks * self.block_size, self.local_blocks * self.block_size
                pages_bknp = quest_pages(bounds, ctx.lengths_b, pos_bn, self.page_size, sink_tokens, local_tokens,
                                         self.budget_pages)
                picked_bknt = jnp.repeat(pages_bknp, self.page_size, axis=-1)
                committed_bt = jnp.arange(t)[None, :] < ctx.lengths_b[:, None]
                near_bnt = ((key_pos_bt[:, None, :] < sink_tokens)
                            | (pos_bn[:, :, None] - key_pos_bt[:, None, :] < local_tokens))
                visible_bknt = visible_bnt[:, None] & (~committed_bt[:, None, None] | near_bnt[:, None] | picked_bknt)
                outputs.append((heads, masked_attention_per_head(q_d, keys[:, :, kv], values[:, :, kv], visible_bknt)))
        out = merge_groups(outputs, self.num_heads)
        new_entry = None if entry is None else entry.with_written(keys, values, n)
        return self.o_proj(out.reshape(b, n, self.num_heads * self.head_dim)), new_entry


    def _sparse_decode(self, q, keys, values, ctx: ForwardContext, entry: PagedEntry):
        """Decoding / verification: each query gathers only the slots it sees (same result as the
        masked path, cost independent of the context length)."""
        b, n = q.shape[:2]
        group = self.num_heads // self.num_kv_heads
        pos_bn, lengths_b = ctx.positions_bn, ctx.lengths_b
        among_new_bnn = ctx.visible(None, self.sliding_window)
        sink_tokens = self.sink_blocks * self.block_size
        outputs = []
        if self.lambda_kv:
            heads, kv = query_heads(self.lambda_kv, group), list(self.lambda_kv)
            local_start = (pos_bn // self.block_size - self.local_blocks + 1) * self.block_size
            slots, real = segment_slots(lengths_b, pos_bn, len(kv), sink_tokens, local_start,
                                        self.local_blocks * self.block_size)
            new_visible = among_new_bnn & self._lambda(pos_bn, pos_bn)
            q_bnkgd = q[:, :, heads].reshape(b, n, len(kv), group, self.head_dim)
            outputs.append((heads, gathered_attention(q_bnkgd, keys[:, :, kv], values[:, :, kv], slots, real, lengths_b,
                                                      jnp.broadcast_to(new_visible[:, None], (b, len(kv), n, n)))))
        if self.dense_kv:
            heads, kv = query_heads(self.dense_kv, group), list(self.dense_kv)
            local_tokens = self.local_blocks * self.block_size
            q_bnkgd = q[:, :, heads].reshape(b, n, len(kv), group, self.head_dim)
            bounds = page_upper_bounds(q_bnkgd, entry.page_min[:, :, kv], entry.page_max[:, :, kv])
            index, chosen = top_pages(bounds, quest_candidates(bounds.shape[-1], lengths_b, pos_bn, self.page_size,
                                                               sink_tokens, local_tokens), self.budget_pages)
            slots, real = segment_slots(lengths_b, pos_bn, len(kv), sink_tokens, pos_bn - local_tokens + 1,
                                        local_tokens, index, chosen, self.page_size)
            outputs.append((heads, gathered_attention(q_bnkgd, keys[:, :, kv], values[:, :, kv], slots, real, lengths_b,
                                                      jnp.broadcast_to(among_new_bnn[:, None], (b, len(kv), n, n)))))
        return merge_groups(outputs, self.num_heads)


def create_paged_entry(config: ModelConfig, layer_index: int, batch_size: int, max_len: int, dtype) -> PagedEntry:
    """The empty paged cache entry of a block_sparse layer."""
    spec = config.attention or AttentionSpec(kinds=("block_sparse",))
    return PagedEntry.create(batch_size, config.num_kv_heads, config.resolved_head_dim, spec.page_size, max_len, dtype)
