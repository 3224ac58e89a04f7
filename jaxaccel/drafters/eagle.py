"""EAGLE: one decoder layer drafting autoregressively over features (jaxaccel.heads.eagle).

State: HeadsState whose cache holds the draft layer's entries for positions 0 .. L - 2 (entry i
fuses the base feature at i with the token at i + 1), L the base cache's length, and
head_input_bd = the base feature at L - 1. `EagleDrafter` drafts a static tree; with a
DynamicTree the record builds `DynamicEagleDrafter` (EAGLE-2: each row grows its own tree).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.decoding.tree import DynamicTree, Tree, TreeBatch
from jaxaccel.drafters.common import (HeadsState, at_last_accepted, last_prompt_state, place_children, root_only,
                                      sample_children, top_ranks)
from jaxaccel.drafters.protocol import Draft, Prefill, Verified
from jaxaccel.drafters.record import DrafterRecord
from jaxaccel.heads.eagle import EagleHeads


@dataclass(frozen=True)
class EagleDrafter:
    """Depth by depth over the draft layer: every node drafted so far is an entry (its parent's
    predicted feature fused with its token) under the tree's ancestor mask; the entries of the
    deepest level give the next level's top-r tokens."""

    tree: Tree
    module: EagleHeads | None = field(default=None, compare=False, repr=False)

    def start(self, base, heads, prefill: Prefill) -> HeadsState:
        # Entries 0 .. len-2: the prompt's features with the following prompt token.
        tokens_bs, lengths_b = prefill.tokens_bs, prefill.lengths_b
        next_bs = jnp.concatenate([tokens_bs[:, 1:], tokens_bs[:, :1]], axis=1)
        cache = heads.init_cache(tokens_bs.shape[0], prefill.cache_len)
        cache = heads.forward(base, prefill.hidden_bsd, next_bs, cache=cache).cache.advance(lengths_b - 1)
        return HeadsState(cache=cache, head_input_bd=last_prompt_state(prefill.hidden_bsd, lengths_b))

    def draft(self, base, heads, state: HeadsState, root_b: jax.Array, cache) -> Draft:
        return self._draft(base, heads, state, root_b)

    def sample_draft(self, base, heads, state: HeadsState, root_b: jax.Array, cache, policy, key) -> Draft:
        """The same tree, each node's token drawn from the head's distribution after its parent
        (at the policy's temperature and filters; siblings independently)."""
        return self._draft(base, heads, state, root_b, policy, key)

    def _draft(self, base, heads, state: HeadsState, root_b: jax.Array, policy=None, key=None) -> Draft:
        tree = self.tree
        b, d = state.head_input_bd.shape
        draft_bn = root_only(tree, root_b)
        q_bnv = None
        predicted_bnd = jnp.zeros((b, 0, d), state.head_input_bd.dtype)
        for k in range(tree.depth):
            n = int(np.sum(tree.depth_n <= k))  # nodes are sorted by depth: entries 0 .. n-1
            feats_bnd = jnp.concatenate([state.head_input_bd[:, None], predicted_bnd[:, tree.parent_n[1:n]]], axis=1)
            positions_bn = state.cache.lengths[:, None] + tree.depth_n[:n]
            predicted_bnd, _ = heads.features(base, feats_bnd, draft_bn[:, :n], positions_bn, cache=state.cache,
                                              mask=tree.mask_nn[:n, :n])
            parents = tree.parents_at(k)
            if policy is None:
                top_bpr = self.top_tokens(base, heads, predicted_bnd[:, parents], tree.max_rank)
            else:
                top_bpr, q_bpv = self.sampled_tokens(base, heads, predicted_bnd[:, parents], tree.max_rank, policy,
                                                     jax.random.fold_in(key, k))
                if q_bnv is None:
                    q_bnv = jnp.zeros((b, tree.num_nodes, q_bpv.shape[-1]), q_bpv.dtype)
                q_bnv = place_children(tree, q_bnv, k + 1, q_bpv[:, :, None], parents, by_rank=False)
            draft_bn = place_children(tree, draft_bn, k + 1, top_bpr, parents)
        return Draft(draft_bn, tree.batch(b), q_bnv)

    def top_tokens(self, base, heads, states_bnd: jax.Array, max_rank: int) -> jax.Array:
        """[B, n, max_rank] the best draft tokens after each state (through the base's LM head)."""
        return top_ranks(base.logits(states_bnd), max_rank)

    def sampled_tokens(self, base, heads, states_bnd: jax.Array, max_rank: int, policy, key):
        """([B, n, max_rank] tokens drawn independently from q after each state, [B, n, V] q): q is
        the head's distribution (through the base's LM head) at `policy`'s temperature and filters."""
        return sample_children(base.logits(states_bnd), max_rank, policy, key)

    def commit(self, base, heads, state: HeadsState, verified: Verified) -> HeadsState:
        # Entry j (position L-1+j) fuses the base feature at L-1+j with the accepted token at L+j.
        verdict, draft_bn = verified.verdict, verified.draft.tokens_bn
        path_hidden_bdd = jnp.take_along_axis(verified.hidden_bnd, verdict.path_bd[:, :, None], axis=1)
        feats_bdd = jnp.concatenate([state.head_input_bd[:, None], path_hidden_bdd[:, :-1]], axis=1)
        tokens_bd = jnp.take_along_axis(draft_bn, verdict.path_bd, axis=1)
        cache = heads.forward(base, feats_bdd, tokens_bd, cache=state.cache).cache.advance(verdict.num_nodes_b)
        return HeadsState(cache=cache, head_input_bd=at_last_accepted(path_hidden_bdd, verdict, True))


@dataclass(frozen=True)
class DynamicEagleDrafter(EagleDrafter):
    """EAGLE-2: each row grows its own tree. Level by level, the draft layer runs over every node
    expanded so far (under their ancestor mask) and the `topk` best nodes of the newest level
    (by cumulative draft log-probability) each propose their top-`topk` children; of all nodes
    proposed, the `num_nodes - 1` best join the root. Candidates are numbered level by level, so
    a parent's number is below its children's and its score at least theirs: `top_k`, which
    breaks ties towards the lower index, never keeps a child without its parent."""

    tree: DynamicTree
    sample_draft = None  # the tree grows by draft score: its drafts are point masses

    def draft(self, base, heads, state: HeadsState, root_b: jax.Array, cache) -> Draft:
        k, depth = self.tree.topk, self.tree.depth
        b = root_b.shape[0]
        rows_b1 = jnp.arange(b)[:, None]
        # Draft-layer entries (one per expanded node; the root first): input feature, token, level, mask.
        feats_in_bed = state.head_input_bd[:, None]
        tokens_be, level_e, mask_bee = root_b[:, None], np.zeros(1, np.int32), jnp.ones((b, 1, 1), bool)
        # Candidates (number 0 is the root): token, cumulative log-probability, parent's number, depth.
        tokens_c, scores_c, parents_c, depth_c = [root_b[:, None]], [jnp.zeros((b, 1))], [jnp.full((b, 1), -1)], [0]
        frontier_entry_bf = jnp.zeros((b, 1), jnp.int32)  # the newest level's entries, and their candidates
        frontier_cand_bf, frontier_score_bf = jnp.zeros((b, 1), jnp.int32), jnp.zeros((b, 1))
        for level in range(depth):
            f = frontier_entry_bf.shape[1]
            feats_out_bed, _ = heads.features(base, feats_in_bed, tokens_be, state.cache.lengths[:, None] + level_e,
                                              cache=state.cache, mask=mask_bee)
            logp_bfv = jax.nn.log_softmax(base.logits(feats_out_bed[:, -f:]), axis=-1)
            logp_bfk, child_bfk = jax.lax.top_k(logp_bfv, k)
            score_bx = (frontier_score_bf[:, :, None] + logp_bfk).reshape(b, f * k)
            child_bx = child_bfk.reshape(b, f * k).astype(jnp.int32)
            first = sum(x.shape[1] for x in tokens_c)
            tokens_c.append(child_bx)
            scores_c.append(score_bx)
            parents_c.append(jnp.repeat(frontier_cand_bf, k, axis=1))
            depth_c += [level + 1] * (f * k)
            if level + 1 == depth:
                break
            frontier_score_bf, best_bk = jax.lax.top_k(score_bx, k)
            parent_entry_bk = jnp.take_along_axis(frontier_entry_bf, best_bk // k, axis=1)
            e = tokens_be.shape[1]
            feats_in_bed = jnp.concatenate([feats_in_bed, feats_out_bed[rows_b1, parent_entry_bk]], axis=1)
            tokens_be = jnp.concatenate([tokens_be, jnp.take_along_axis(child_bx, best_bk, axis=1)], axis=1)
            level_e = np.concatenate([level_e, np.full(k, level + 1, np.int32)])
            new_rows_bke = jnp.concatenate([mask_bee[rows_b1, parent_entry_bk], jnp.broadcast_to(np.eye(k, dtype=bool), (b, k, k))], axis=2)
            mask_bee = jnp.concatenate([jnp.pad(mask_bee, ((0, 0), (0, 0), (0, k))), new_rows_bke], axis=1)
            frontier_entry_bf = jnp.broadcast_to(e + jnp.arange(k, dtype=jnp.int32), (b, k))
            frontier_cand_bf = first + best_bk.astype(jnp.int32)
        tokens_bc, scores_bc = jnp.concatenate(tokens_c, axis=1), jnp.concatenate(scores_c, axis=1)
        parents_bc, depth_c = jnp.concatenate(parents_c, axis=1), np.asarray(depth_c, np.int32)
        # Rerank: the best num_nodes - 1 candidates below the root, in score order.
        _, chosen_bs = jax.lax.top_k(scores_bc[:, 1:], self.tree.num_nodes - 1)
        chosen_bn = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), chosen_bs.astype(jnp.int32) + 1], axis=1)
        node_of_cand_bc = jnp.full(tokens_bc.shape, -1, jnp.int32).at[rows_b1, chosen_bn].set(
            jnp.arange(self.tree.num_nodes, dtype=jnp.int32))
        parent_cand_bn = jnp.take_along_axis(parents_bc, chosen_bn, axis=1)
        parent_bn = jnp.where(parent_cand_bn < 0, -1, jnp.take_along_axis(node_of_cand_bc, jnp.maximum(parent_cand_bn, 0), axis=1))
        layout = TreeBatch(parent_bn=parent_bn, depth_bn=jnp.asarray(depth_c)[chosen_bn], max_depth=depth, max_children=k)
        return Draft(jnp.take_along_axis(tokens_bc, chosen_bn, axis=1), layout)


def make(tree: Tree | DynamicTree, module: EagleHeads) -> EagleDrafter:
    return (DynamicEagleDrafter if isinstance(tree, DynamicTree) else EagleDrafter)(tree, module)


RECORD = DrafterRecord(
    name="eagle", summary="EAGLE: a draft decoder layer over the base's features, static or EAGLE-2 dynamic trees (trained)",
    make=make, module=EagleHeads,
    # Autoregressive drafting: any depth; its top-1 is usually right, so the tree runs deep.
    default_tree=Tree(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0),
                       (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0))),
    train_depth=lambda heads_config, distill_config: distill_config.unroll, dynamic_trees=True)
