"""Token Recycling (training-free): the base's own top-k candidates, kept per token and reused.

State: a table [B, V, k] (k = the tree's widest rank): row v holds the k tokens the base ranked
highest the last time it verified a node whose token was v. Every verify pass refreshes it from
the logits at every tree node (accepted or not: each is the base's real next-token ranking after
that node's path). Drafting walks a static tree of rank paths from the root: node (r1, ..., rd)
takes rank r_d of its parent's token's row. Seeded from the prompt's bigrams (rank 0); unseen
tokens draft token 0, which is simply rejected.
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


@dataclass(frozen=True)
class TokenRecycling:
    """Drafts `tree` by walking the table of recycled candidates."""

    tree: Tree
    module: None = field(default=None, compare=False, repr=False)

    def start(self, base, module, prefill: Prefill) -> RecyclingState:
        tokens_bs, lengths_b = prefill.tokens_bs, prefill.lengths_b
        b, s = tokens_bs.shape
        vocab = base.config.vocab_size
        table_bvk = jnp.zeros((b, vocab, self.tree.max_rank), jnp.int32)
        # Rank 0 of each prompt token: a token that followed it (for a repeated token, one of them).
        next_bs = jnp.concatenate([tokens_bs[:, 1:], prefill.first_b[:, None]], axis=1)
        next_bs = jnp.where(jnp.arange(s) == lengths_b[:, None] - 1, prefill.first_b[:, None], next_bs)
        keys_bs = jnp.where(jnp.arange(s) < lengths_b[:, None], tokens_bs, vocab)  # padding: dropped
        table_bvk = table_bvk.at[jnp.arange(b)[:, None], keys_bs, 0].set(next_bs.astype(jnp.int32), mode="drop")
        return RecyclingState(table_bvk=table_bvk)

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
        return RecyclingState(table_bvk=state.table_bvk.at[rows_b1, verified.draft.tokens_bn].set(top_bnk))


# The tree with the most expected accepted tokens for 24 nodes if rank r at any depth is accepted
# with probability 0.6 * 0.5**r (a guess: tune it like any rank tree).
DEFAULT_TREE = Tree.from_acceptance(0.6 * 0.5 ** np.arange(4)[None].repeat(6, axis=0), 24)

RECORD = DrafterRecord(
    name="recycling", summary="Token Recycling: walk a table of the base's own past top-k candidates (training-free)",
    make=lambda tree, module: TokenRecycling(tree), default_tree=DEFAULT_TREE)
