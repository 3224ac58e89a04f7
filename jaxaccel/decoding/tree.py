"""Draft trees: the token-tree shapes a speculative step drafts and verifies.

Node 0 is the root: the base model's own next token, certain to be emitted.
  `Tree`: a static tree. Every other node is a path of top-k ranks, Medusa-style: node
      (r1, ..., rd) is the r_d-th most likely draft at depth d below node (r1, ..., r_{d-1}).
      Its index buffers (parents, depths, ancestor mask, children) are numpy constants.
  `DynamicTree`: EAGLE-2's recipe for a tree that each row grows anew every step: expand the
      `topk` most probable nodes of each level by their top-`topk` drafts, then keep the
      `num_nodes` nodes of highest cumulative draft probability.
Both are frozen, hashable dataclasses (static `jit` arguments). Inside `jit`, verification and
the cache see either one as a `TreeBatch`: each row's parents and depths as arrays.
"""

from __future__ import annotations

import functools
import heapq
import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class TreeBatch:
    """One tree per row, as arrays: node 0 is the root; a parent's index may come before or
    after its children's. Static: the deepest node's depth and the most children of any node."""

    parent_bn: jax.Array  # [B, N] int32, -1 for the root
    depth_bn: jax.Array  # [B, N] int32, root 0
    max_depth: int = struct.field(pytree_node=False)
    max_children: int = struct.field(pytree_node=False)

    @property
    def num_nodes(self) -> int:
        return self.parent_bn.shape[1]

    def _ups_bnk(self) -> jax.Array:
        """[B, N, max_depth + 1] the ancestor k steps above each node (the root above the root)."""
        parent_bn = jnp.maximum(self.parent_bn, 0)
        ups = [jnp.broadcast_to(jnp.arange(self.num_nodes, dtype=jnp.int32), self.parent_bn.shape)]
        for _ in range(self.max_depth):
            ups.append(jnp.take_along_axis(parent_bn, ups[-1], axis=1))
        return jnp.stack(ups, axis=-1)

    @property
    def mask_bnn(self) -> jax.Array:
        """[B, N, N] node i sees node j iff j is i or an ancestor of i."""
        ups_bnk = self._ups_bnk()
        return jnp.any(ups_bnk[:, :, :, None] == jnp.arange(self.num_nodes)[None, None, None], axis=2)

    @property
    def ancestors_bnd(self) -> jax.Array:
        """[B, N, max_depth + 1] the path root..node of each node, padded by repeating the node."""
        ups_bnk = self._ups_bnk()
        d = jnp.arange(self.max_depth + 1)
        steps_up_bnd = jnp.clip(self.depth_bn[:, :, None] - d, 0, self.max_depth)
        on_path = jnp.take_along_axis(ups_bnk, steps_up_bnd, axis=2)
        return jnp.where(d <= self.depth_bn[:, :, None], on_path, jnp.arange(self.num_nodes)[None, :, None])

    @property
    def children_bnc(self) -> jax.Array:
        """[B, N, max_children] each node's children in index order, padded with -1."""
        n = self.num_nodes
        node = jnp.arange(n)
        is_child_bnm = self.parent_bn[:, None, :] == node[None, :, None]
        # top_k of -index over the children picks them in index order; non-children score -n.
        score, index = jax.lax.top_k(jnp.where(is_child_bnm, -node, -n), self.max_children)
        return jnp.where(score > -n, index, -1).astype(jnp.int32)


@dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2's dynamic tree: `depth` levels, each expanding the `topk` nodes of highest
    cumulative draft log-probability by their top-`topk` drafts; the verified tree is the
    `num_nodes` (root included) best of all drafted nodes. A child's cumulative probability never
    exceeds its parent's, so the best nodes form a prefix-closed tree."""

    topk: int = 8
    depth: int = 6
    num_nodes: int = 32

    def __post_init__(self):
        if self.topk < 1 or self.depth < 1:
            raise ValueError(f"a dynamic tree needs topk >= 1 and depth >= 1, got topk={self.topk}, depth={self.depth}")
        if not 2 <= self.num_nodes <= 1 + self.num_candidates:
            raise ValueError(f"a dynamic tree of topk={self.topk}, depth={self.depth} drafts {self.num_candidates} "
                             f"nodes, so num_nodes must be in [2, {1 + self.num_candidates}], got {self.num_nodes}")

    @property
    def num_candidates(self) -> int:
        """Nodes drafted before reranking: topk at depth 1, topk**2 at every deeper level."""
        return self.topk + (self.depth - 1) * self.topk ** 2

    @property
    def max_children(self) -> int:
        """The most children a node can get (topk)."""
        return self.topk

    def to_json(self) -> dict:
        return {"dynamic": {"topk": self.topk, "depth": self.depth, "num_nodes": self.num_nodes}}


@dataclass(frozen=True)
class Tree:
    """A static token tree: node i > 0 is a path of top-k ranks from the root (Medusa-style), sorted by depth."""
    paths: tuple[tuple[int, ...], ...]  # every non-root node, parents before children

    def __post_init__(self):
        paths = {tuple(int(r) for r in p) for p in self.paths}
        for p in paths:
            if not p or min(p) < 0:
                raise ValueError(f"a tree path must be a non-empty tuple of ranks >= 0, got {p}")
            if len(p) > 1 and p[:-1] not in paths:
                raise ValueError(f"tree path {p} has no parent {p[:-1]} in the tree")
        object.__setattr__(self, "paths", tuple(sorted(paths, key=lambda p: (len(p), p))))

    @classmethod
    def chain(cls, depth: int) -> Tree:
        """The top-1 draft at each of `depth` levels."""
        return cls(tuple((0,) * d for d in range(1, depth + 1)))

    @classmethod
    def from_acceptance(cls, accept_dr: np.ndarray, num_nodes: int) -> Tree:
        """The tree of `num_nodes` nodes (root included) with the most expected accepted tokens,
        given accept_dr[d, r]: the probability that the rank-r draft at depth d+1 is accepted.

        A node's value is the product of its path's probabilities; it never exceeds its parent's,
        so taking the best nodes one at a time from the frontier keeps the tree prefix-closed.
        """
        accept_dr = np.asarray(accept_dr, np.float64)
        depth, ranks = accept_dr.shape
        frontier = [(-accept_dr[0, r], (r,)) for r in range(ranks)]
        heapq.heapify(frontier)
        chosen = []
        while frontier and len(chosen) < num_nodes - 1:
            neg_value, path = heapq.heappop(frontier)
            chosen.append(path)
            if len(path) < depth:
                for r in range(ranks):
                    heapq.heappush(frontier, (neg_value * accept_dr[len(path), r], path + (r,)))
        return cls(tuple(chosen))

    @classmethod
    def load(cls, path: str | Path) -> Tree | DynamicTree:
        """A tree from a JSON file: a list of rank paths (`[[0], [1], [0, 0]]`), `{"paths": ...}`,
        or `{"dynamic": {"topk": 8, "depth": 6, "num_nodes": 32}}` for a DynamicTree."""
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and "dynamic" in data:
            return DynamicTree(**data["dynamic"])
        if isinstance(data, dict):
            data = data["paths"]
        return cls(tuple(tuple(p) for p in data))

    def to_json(self) -> dict:
        return {"paths": [list(p) for p in self.paths]}

    def save(self, path: str | Path) -> None:
        """Writes the tree as JSON (atomically)."""
        save_tree(self, path)

    def batch(self, batch_size: int) -> TreeBatch:
        """This tree for every row of a batch (constants that XLA folds)."""
        def rows(x):
            return jnp.broadcast_to(jnp.asarray(x), (batch_size, self.num_nodes))

        return TreeBatch(parent_bn=rows(self.parent_n), depth_bn=rows(self.depth_n), max_depth=self.depth,
                         max_children=self.children_nc.shape[1])

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        """Draft levels below the root."""
        return max((len(p) for p in self.paths), default=0)

    @property
    def max_rank(self) -> int:
        """How many top-k candidates the deepest-ranked node needs (k of the per-depth top-k)."""
        return 1 + max((max(p) for p in self.paths), default=0)

    @functools.cached_property
    def _index(self) -> dict[tuple[int, ...], int]:
        return {(): 0, **{p: i + 1 for i, p in enumerate(self.paths)}}

    @functools.cached_property
    def parent_n(self) -> np.ndarray:
        """[N] parent node of each node (-1 for the root)."""
        return np.array([-1] + [self._index[p[:-1]] for p in self.paths], np.int32)

    @functools.cached_property
    def depth_n(self) -> np.ndarray:
        """[N] depth of each node (root 0)."""
        return np.array([0] + [len(p) for p in self.paths], np.int32)

    def parents_at(self, depth: int) -> np.ndarray:
        """The nodes at `depth` that have children, in order: the only ones a drafter must rank
        candidates after."""
        return np.unique(self.parent_n[self.depth_n == depth + 1])

    @functools.cached_property
    def rank_n(self) -> np.ndarray:
        """[N] top-k rank of each node among its parent's drafts (root 0)."""
        return np.array([0] + [p[-1] for p in self.paths], np.int32)

    @functools.cached_property
    def mask_nn(self) -> np.ndarray:
        """[N, N] attention mask: node i sees node j iff j is i or an ancestor of i."""
        mask = np.eye(self.num_nodes, dtype=bool)
        for i in range(1, self.num_nodes):
            mask[i] |= mask[self.parent_n[i]]
        return mask

    @functools.cached_property
    def children_nc(self) -> np.ndarray:
        """[N, C] children of each node in rank order, padded with -1."""
        kids = [[] for _ in range(self.num_nodes)]
        for i in range(1, self.num_nodes):
            kids[self.parent_n[i]].append(i)
        width = max(1, max(len(k) for k in kids))
        return np.array([k + [-1] * (width - len(k)) for k in kids], np.int32)

    @functools.cached_property
    def ancestors_nd(self) -> np.ndarray:
        """[N, depth + 1] the path root..node of each node, padded by repeating the node."""
        out = np.zeros((self.num_nodes, self.depth + 1), np.int32)
        for i in range(self.num_nodes):
            path = [j for j in range(self.num_nodes) if self.mask_nn[i, j]]  # ancestors come first
            out[i] = path + [i] * (self.depth + 1 - len(path))
        return out


def save_tree(tree: Tree | DynamicTree, path: str | Path) -> None:
    """Writes a tree as JSON (what `Tree.load` reads)."""
    Path(path).write_text(json.dumps(tree.to_json()))
