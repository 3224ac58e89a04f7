"""Static draft trees: the token-tree shapes a speculative step drafts and verifies.

Node 0 is the root: the base model's own next token, certain to be emitted. Every other node is
a path of top-k ranks, Medusa-style: node (r1, ..., rd) is the r_d-th most likely draft at depth
d below node (r1, ..., r_{d-1}). A tree is a frozen, hashable dataclass, so it is a static `jit`
argument; its index buffers (parents, depths, ancestor mask, children) are numpy constants.
"""

from __future__ import annotations

import functools
import heapq
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Tree:
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
    def load(cls, path: str | Path) -> Tree:
        """A tree from a JSON file holding a list of rank paths (`[[0], [1], [0, 0]]`)."""
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict):
            data = data["paths"]
        return cls(tuple(tuple(p) for p in data))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"paths": [list(p) for p in self.paths]}))

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
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


# Defaults per head kind. Medusa/Hydra heads draft one distribution per depth, so their trees
# spend most nodes on the first levels; a chain suits a drafter whose top-1 is usually right.
DEFAULT_TREES = {
    "chain": Tree.chain(4),
    "medusa": Tree(((0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0),
                    (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0, 0))),
    "hydra": Tree(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0),
                   (1, 0, 0), (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 0, 0))),
    "eagle": Tree(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0),
                   (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0))),
}
