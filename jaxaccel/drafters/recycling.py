"""Token Recycling (training-free): the base's own top-k candidates, kept per token and reused.

State: a table [B, V, k] (k = the tree's widest rank): row v holds the k tokens the base ranked
highest the last time it verified a node whose token was v. Every verify pass refreshes it from
the logits at every tree node (accepted or not: each is the base's real next-token ranking after
that node's path). Drafting walks a static tree of rank paths from the root: node (r1, ..., rd)
takes rank r_d of its parent's token's row. Unseen tokens draft token 0, which is simply rejected.

The table outlives the call (as in the paper, which keeps it across queries): `carry` hands the
decoder a batch-free copy (per token, the row that refreshed it last; stamps say when), and the
next call's `start` begins from it. Prompt tokens the base has never ranked get their successor
in the prompt as rank 0 (the prompt's bigrams), which is all a first call starts from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxaccel.decoding.tree import Tree
from jaxaccel.drafters.common import root_only, top_ranks
from jaxaccel.drafters.protocol import Draft, Prefill, Verified
from jaxaccel.drafters.record import DrafterRecord


@struct.dataclass
class RecyclingState:
    table_bvk: jax.Array  # [B, V, k] int32: the base's top-k after each token, last seen
    stamp_bv: jax.Array  # [B, V] int32: the clock when the base last ranked each token (0: never)
    clock: jax.Array  # [] int32: verify passes so far, counting those of carried calls


@struct.dataclass
class RecyclingCarry:
    """The table one call leaves the next (no batch axis: a call may have another batch size)."""
    table_vk: jax.Array  # [V, k] int32
    stamp_v: jax.Array  # [V] int32
    clock: jax.Array  # [] int32


@dataclass(frozen=True)
class TokenRecycling:
    """Drafts `tree` by walking the table of recycled candidates."""

    tree: Tree
    module: None = field(default=None, compare=False, repr=False)

    def empty_carry(self, base) -> RecyclingCarry:
        """What a decoder's first call starts from: nothing ranked yet."""
        vocab = base.config.vocab_size
        return RecyclingCarry(table_vk=jnp.zeros((vocab, self.tree.max_rank), jnp.int32),
                              stamp_v=jnp.zeros((vocab,), jnp.int32), clock=jnp.int32(0))

    def carry(self, state: RecyclingState) -> RecyclingCarry:
        """The table for the next call: each token's entry from the row that refreshed it last."""
        latest_v = jnp.argmax(state.stamp_bv, axis=0)
        table_vk = jnp.take_along_axis(state.table_bvk, latest_v[None, :, None], axis=0)[0]
        return RecyclingCarry(table_vk=table_vk, stamp_v=jnp.max(state.stamp_bv, axis=0), clock=state.clock)

    def start(self, base, module, prefill: Prefill, carried: RecyclingCarry | None = None) -> RecyclingState:
        carried = self.empty_carry(base) if carried is None else carried
        tokens_bs, lengths_b = prefill.tokens_bs, prefill.lengths_b
        b, s = tokens_bs.shape
        vocab, k = carried.table_vk.shape
        if k != self.tree.max_rank:
            raise ValueError(f"the carried table keeps {k} ranks per token, this tree needs {self.tree.max_rank}")
        rows_b1 = jnp.arange(b)[:, None]
        table_bvk = jnp.broadcast_to(carried.table_vk, (b, vocab, k))
        stamp_bv = jnp.broadcast_to(carried.stamp_v, (b, vocab))
        # Rank 0 of each prompt token the base never ranked: a token that followed it (for a
        # repeated token, one of them).
        next_bs = jnp.concatenate([tokens_bs[:, 1:], prefill.first_b[:, None]], axis=1)
        next_bs = jnp.where(jnp.arange(s) == lengths_b[:, None] - 1, prefill.first_b[:, None], next_bs)
        unranked_bs = (jnp.arange(s) < lengths_b[:, None]) & (stamp_bv[rows_b1, tokens_bs] == 0)  # padding: dropped
        keys_bs = jnp.where(unranked_bs, tokens_bs, vocab)
        table_bvk = table_bvk.at[rows_b1, keys_bs, 0].set(next_bs.astype(jnp.int32), mode="drop")
        return RecyclingState(table_bvk=table_bvk, stamp_bv=stamp_bv, clock=carried.clock)

    def draft(self, base, module, state: RecyclingState, root_b, cache) -> Draft:
        tree = self.tree
        rows_b1 = jnp.arange(root_b.shape[0])[:, None]
        tokens_bn = root_only(tree, root_b)
        for depth in range(1, tree.depth + 1):
            nodes = np.flatnonzero(tree.depth_n == depth)
            parent_tokens_bp = tokens_bn[:, tree.parent_n[nodes]]
            tokens_bn = tokens_bn.at[:, nodes].set(state.table_bvk[rows_b1, parent_tokens_bp, tree.rank_n[nodes]])
        return Draft(tokens_bn, tree.batch(root_b.shape[0]))

    def commit(self, base, module, state: RecyclingState, verified: Verified) -> RecyclingState:
        top_bnk = top_ranks(verified.logits_bnv, self.tree.max_rank)
        rows_b1 = jnp.arange(top_bnk.shape[0])[:, None]
        nodes_bn, clock = verified.draft.tokens_bn, state.clock + 1
        return RecyclingState(table_bvk=state.table_bvk.at[rows_b1, nodes_bn].set(top_bnk),
                              stamp_bv=state.stamp_bv.at[rows_b1, nodes_bn].set(clock), clock=clock)


DEFAULT_NODES = 24


def default_tree(nodes: int = DEFAULT_NODES) -> Tree:
    """The tree with the most expected accepted tokens for `nodes` nodes if rank r at any depth is
    accepted with probability 0.6 * 0.5**r (a guess: tune it like any rank tree)."""
    if nodes < 2:
        raise ValueError(f"recycling needs a tree of at least 2 nodes, got nodes={nodes}")
    return Tree.from_acceptance(0.6 * 0.5 ** np.arange(4)[None].repeat(6, axis=0), nodes)


def make(tree, module, nodes: int | None = None) -> TokenRecycling:
    if tree is not None and nodes is not None:
        raise ValueError("recycling takes a tree or nodes=N, not both")
    return TokenRecycling(tree if tree is not None else default_tree(DEFAULT_NODES if nodes is None else nodes))


RECORD = DrafterRecord(
    name="recycling", summary="Token Recycling: walk a table of the base's own past top-k candidates (training-free)",
    make=make, options=("nodes",))
