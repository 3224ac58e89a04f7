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
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxaccel.cache import KVCache
from jaxaccel.decoding.tree import Tree
from jaxaccel.decoding.verify import Verdict


@struct.dataclass
class DraftState:
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
        return draft_bn.at[:, nodes].set(top_kbr[tree.depth_n[nodes] - 1, :, tree.rank_n[nodes]].T)

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
        return draft_bn

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
            out = heads.forward(base, feats_bnd, draft_bn[:, :n], positions_bn, cache=state.cache,
                                mask=tree.mask_nn[:n, :n])
            predicted_bnd = out.features
            parents = np.flatnonzero(tree.depth_n == k)
            draft_bn = _place_children(tree, draft_bn, k + 1, _top_ranks(out.logits[:, parents], tree.max_rank), parents)
        return draft_bn

    def commit(self, base, heads, state, verify_hidden_bnd, draft_bn, verdict: Verdict, lengths_b) -> DraftState:
        # Entry j (position L-1+j) fuses the base feature at L-1+j with the accepted token at L+j.
        path_hidden_bdd = jnp.take_along_axis(verify_hidden_bnd, verdict.path_bd[:, :, None], axis=1)
        feats_bdd = jnp.concatenate([state.head_input_bd[:, None], path_hidden_bdd[:, :-1]], axis=1)
        tokens_bd = jnp.take_along_axis(draft_bn, verdict.path_bd, axis=1)
        cache = heads.forward(base, feats_bdd, tokens_bd, cache=state.cache).cache.advance(verdict.num_nodes_b)
        return DraftState(cache=cache, head_input_bd=_at_last_accepted(path_hidden_bdd, verdict, True))


DRAFTERS = {"medusa": MedusaDrafter, "hydra": HydraDrafter, "eagle": EagleDrafter}
