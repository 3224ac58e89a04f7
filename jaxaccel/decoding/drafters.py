"""Drafters: turn a kind of draft heads into a token tree of static shape, inside `jit`.

A drafter is a frozen dataclass (a static `jit` argument) holding the tree. Its state, carried
by the speculative loop, is a `DraftState`: the heads' own cache where the kind has one (the
EAGLE layer, Hydra++'s prefix layer) and the vector the heads read next (`head_input_bd`).

Invariants between steps, per row, with L = the base cache's length (tokens committed through
the last accepted node) and `root` the base's next token (emitted, not yet in the base cache):
  - medusa / hydra: head_input_bd is the base's (or the prefix layer's) state at position L - 1;
  - eagle: its cache holds the entries for positions 0 .. L - 2 (entry i fuses the base feature
    at i with the token at i + 1), and head_input_bd is the base feature at L - 1.
Each method takes the base model and the heads module as arguments (from `nnx.merge` in jit).
`draft` returns the tree's tokens [B, N] and its shape per row (a TreeBatch: the static tree's,
broadcast, or each row's own for EAGLE-2's dynamic trees).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxaccel.cache import KVCache
from jaxaccel.decoding.tree import DynamicTree, Tree, TreeBatch
from jaxaccel.decoding.verify import Verdict


@struct.dataclass
class DraftState:
    """What a drafter carries between steps (see the module doc's invariants)."""
    cache: KVCache | None  # the heads' own cache (None for medusa and plain hydra)
    head_input_bd: jax.Array  # [B, d] what the heads read at the last committed position


def _top_ranks(logits_xv: jax.Array, k: int) -> jax.Array:
    return jax.lax.top_k(logits_xv, k)[1].astype(jnp.int32)


def _at_last_accepted(x_bnd: jax.Array, verdict: Verdict, along_path: bool = False) -> jax.Array:
    """x at the last accepted node; x is indexed by tree node, or (along_path) by depth on the path."""
    depth_b = verdict.num_nodes_b - 1
    node_b = depth_b if along_path else jnp.take_along_axis(verdict.path_bd, depth_b[:, None], axis=1)[:, 0]
    return jnp.take_along_axis(x_bnd, node_b[:, None, None], axis=1)[:, 0]


def _place_children(tree: Tree, draft_bn: jax.Array, depth: int, top_bpr: jax.Array, parents: np.ndarray):
    """Writes the depth-`depth` nodes' tokens: the child of rank r under parents[p] takes top_bpr[:, p, r]."""
    nodes = np.flatnonzero(tree.depth_n == depth)
    parent_pos = np.searchsorted(parents, tree.parent_n[nodes])
    return draft_bn.at[:, nodes].set(top_bpr[:, parent_pos, tree.rank_n[nodes]])


@dataclass(frozen=True)
class MedusaDrafter:
    """Head k's top-r tokens fill every depth-(k+1) node of rank r (Medusa's Cartesian tree)."""

    tree: Tree

    def start(self, base, heads, hidden_bsd, tokens_bs, lengths_b, first_b, cache_len) -> DraftState:
        last_bd = jnp.take_along_axis(hidden_bsd, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
        return DraftState(cache=None, head_input_bd=last_bd)

    def draft(self, base, heads, state: DraftState, root_b: jax.Array) -> jax.Array:
        tree = self.tree
        top_kbr = _top_ranks(heads(base, state.head_input_bd, tree.depth), tree.max_rank)
        nodes = np.arange(1, tree.num_nodes)
        draft_bn = jnp.zeros((root_b.shape[0], tree.num_nodes), jnp.int32).at[:, 0].set(root_b)
        draft_bn = draft_bn.at[:, nodes].set(top_kbr[tree.depth_n[nodes] - 1, :, tree.rank_n[nodes]].T)
        return draft_bn, tree.batch(root_b.shape[0])

    def commit(self, base, heads, state, verify_hidden_bnd, draft_bn, verdict: Verdict, lengths_b) -> DraftState:
        return DraftState(cache=None, head_input_bd=_at_last_accepted(verify_hidden_bnd, verdict))


@dataclass(frozen=True)
class HydraDrafter:
    """Depth by depth: head k reads each depth-k node's path of tokens and drafts its children.
    With Hydra++'s prefix layer, the layer runs over the base's hidden states of committed tokens."""

    tree: Tree

    def start(self, base, heads, hidden_bsd, tokens_bs, lengths_b, first_b, cache_len) -> DraftState:
        cache = heads.init_cache(hidden_bsd.shape[0], cache_len)
        h_bsd, cache = heads.prefix(hidden_bsd, cache=cache)
        if cache is not None:
            cache = cache.advance(lengths_b)
        last_bd = jnp.take_along_axis(h_bsd, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
        return DraftState(cache=cache, head_input_bd=last_bd)

    def draft(self, base, heads, state: DraftState, root_b: jax.Array) -> jax.Array:
        tree = self.tree
        draft_bn = jnp.zeros((root_b.shape[0], tree.num_nodes), jnp.int32).at[:, 0].set(root_b)
        for k in range(tree.depth):
            parents = np.flatnonzero(tree.depth_n == k)
            path_bpj = draft_bn[:, tree.ancestors_nd[parents][:, :k + 1]]
            h_bpd = jnp.broadcast_to(state.head_input_bd[:, None], path_bpj.shape[:2] + state.head_input_bd.shape[-1:])
            top_bpr = _top_ranks(heads.head(base, k, h_bpd, path_bpj), tree.max_rank)
            draft_bn = _place_children(tree, draft_bn, k + 1, top_bpr, parents)
        return draft_bn, tree.batch(root_b.shape[0])

    def commit(self, base, heads, state, verify_hidden_bnd, draft_bn, verdict: Verdict, lengths_b) -> DraftState:
        if state.cache is None:
            return DraftState(cache=None, head_input_bd=_at_last_accepted(verify_hidden_bnd, verdict))
        # The prefix layer over the accepted nodes' base hidden states (positions L .. L + m).
        path_hidden_bdd = jnp.take_along_axis(verify_hidden_bnd, verdict.path_bd[:, :, None], axis=1)
        positions_bd = lengths_b[:, None] + jnp.arange(verdict.path_bd.shape[1])
        h_bdd, cache = heads.prefix(path_hidden_bdd, positions_bd, cache=state.cache)
        return DraftState(cache=cache.advance(verdict.num_nodes_b), head_input_bd=_at_last_accepted(h_bdd, verdict, True))


@dataclass(frozen=True)
class EagleDrafter:
    """Depth by depth over the draft layer: every node drafted so far is an entry (its parent's
    predicted feature fused with its token) under the tree's ancestor mask; the entries of the
    deepest level give the next level's top-r tokens."""

    tree: Tree

    def start(self, base, heads, hidden_bsd, tokens_bs, lengths_b, first_b, cache_len) -> DraftState:
        # Entries 0 .. len-2: the prompt's features with the following prompt token.
        next_bs = jnp.concatenate([tokens_bs[:, 1:], tokens_bs[:, :1]], axis=1)
        cache = heads.init_cache(hidden_bsd.shape[0], cache_len)
        cache = heads.forward(base, hidden_bsd, next_bs, cache=cache).cache.advance(lengths_b - 1)
        last_bd = jnp.take_along_axis(hidden_bsd, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
        return DraftState(cache=cache, head_input_bd=last_bd)

    def draft(self, base, heads, state: DraftState, root_b: jax.Array) -> jax.Array:
        tree = self.tree
        b, d = state.head_input_bd.shape
        draft_bn = jnp.zeros((b, tree.num_nodes), jnp.int32).at[:, 0].set(root_b)
        predicted_bnd = jnp.zeros((b, 0, d), state.head_input_bd.dtype)
        for k in range(tree.depth):
            n = int(np.sum(tree.depth_n <= k))  # nodes are sorted by depth: entries 0 .. n-1
            feats_bnd = jnp.concatenate([state.head_input_bd[:, None], predicted_bnd[:, tree.parent_n[1:n]]], axis=1)
            positions_bn = state.cache.lengths[:, None] + tree.depth_n[:n]
            predicted_bnd, _ = heads.features(base, feats_bnd, draft_bn[:, :n], positions_bn, cache=state.cache,
                                              mask=tree.mask_nn[:n, :n])
            parents = np.flatnonzero(tree.depth_n == k)
            top_bpr = _top_ranks(base.logits(predicted_bnd[:, parents]), tree.max_rank)
            draft_bn = _place_children(tree, draft_bn, k + 1, top_bpr, parents)
        return draft_bn, tree.batch(b)

    def commit(self, base, heads, state, verify_hidden_bnd, draft_bn, verdict: Verdict, lengths_b) -> DraftState:
        # Entry j (position L-1+j) fuses the base feature at L-1+j with the accepted token at L+j.
        path_hidden_bdd = jnp.take_along_axis(verify_hidden_bnd, verdict.path_bd[:, :, None], axis=1)
        feats_bdd = jnp.concatenate([state.head_input_bd[:, None], path_hidden_bdd[:, :-1]], axis=1)
        tokens_bd = jnp.take_along_axis(draft_bn, verdict.path_bd, axis=1)
        cache = heads.forward(base, feats_bdd, tokens_bd, cache=state.cache).cache.advance(verdict.num_nodes_b)
        return DraftState(cache=cache, head_input_bd=_at_last_accepted(path_hidden_bdd, verdict, True))


@dataclass(frozen=True)
class DynamicEagleDrafter(EagleDrafter):
    """EAGLE-2: each row grows its own tree. Level by level, the draft layer runs over every node
    expanded so far (under their ancestor mask) and the `topk` best nodes of the newest level
    (by cumulative draft log-probability) each propose their top-`topk` children; of all nodes
    proposed, the `num_nodes - 1` best join the root. Candidates are numbered level by level, so
    a parent's number is below its children's and its score at least theirs: `top_k`, which
    breaks ties towards the lower index, never keeps a child without its parent."""

    tree: DynamicTree

    def draft(self, base, heads, state: DraftState, root_b: jax.Array) -> tuple[jax.Array, TreeBatch]:
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
        return jnp.take_along_axis(tokens_bc, chosen_bn, axis=1), layout


DRAFTERS = {"medusa": MedusaDrafter, "hydra": HydraDrafter, "eagle": EagleDrafter}


def make_drafter(kind: str, tree: Tree | DynamicTree):
    """The drafter of a head kind for a tree (dynamic trees are EAGLE-2's, for eagle heads)."""
    if isinstance(tree, DynamicTree):
        if kind != "eagle":
            raise ValueError(f"dynamic (EAGLE-2) trees need eagle heads, not {kind}")
        return DynamicEagleDrafter(tree)
    return DRAFTERS[kind](tree)
