"""Two drafters in one tree: trained heads (or a training-free drafter, or another composite) and
a training-free drafter (prompt lookup, REST, layer skipping), verified in one pass over the union
of their trees. Parts that carry state across calls (REST's datastore) carry it as a pair.

Node layout (per row, a TreeBatch): the heads' nodes first (their own indices), then the other
drafter's nodes below the same root. The union is made a trie: a node of the second drafter whose
path of tokens the heads already drafted hangs under that heads node instead (its duplicate stays
in the tree, after its twin, so verification never accepts it: at T = 0 the earlier sibling wins,
at T > 0 a rejected point mass has no mass left; after a sampled twin it is one more proposal,
which the q-aware walk may accept, losslessly). So at T = 0 a step accepts as many tokens as the
better of the two would have, and the loop still sees static shapes: N = N_heads + N_other - 1.
With heads that sample their drafts (T > 0), so does the composite: the heads' part sampled, the
other part's nodes point masses (one-hot rows of q).

Both parts' commits read the union's `Verified` (node indices into the union, its hidden states,
logits and path): every drafter's commit reads a verify pass through `verdict` and the draft's
tokens, never through its own tree's layout, so the union's is as good as its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.decoding.tree import TreeBatch
from jaxaccel.drafters.protocol import Draft, Drafter, Prefill, Verified, carries, samples_drafts


@dataclass(frozen=True)
class UnionTree:
    """The static size of a composite's tree (its layout is drafted per row)."""

    num_nodes: int
    depth: int


@dataclass(frozen=True)
class Composite:
    """`heads` (a trained drafter, its module split off into `module`) and `other` (training-free)."""

    heads: Drafter
    other: Drafter
    module: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, heads: Drafter, other: Drafter) -> Composite:
        if getattr(other, "module", None) is not None:
            raise ValueError("the second drafter of a composition must be training-free")
        if getattr(other, "capture", ()):
            raise ValueError("the second drafter of a composition may not capture base layers")
        return cls(heads=replace(heads, module=None), other=other, module=heads.module)

    @property
    def capture(self) -> tuple[int, ...]:
        return tuple(getattr(self.heads, "capture", ()))

    @property
    def tree(self) -> UnionTree:
        return UnionTree(num_nodes=self.heads.tree.num_nodes + self.other.tree.num_nodes - 1,
                         depth=max(self.heads.tree.depth, self.other.tree.depth))

    def start(self, base, module, prefill: Prefill, carried: tuple | None = None) -> tuple:
        carried = carried or (None, None)
        return _start(self.heads, base, module, prefill, carried[0]), _start(self.other, base, None, prefill, carried[1])

    @property
    def _carrying(self) -> bool:
        return carries(self.heads) or carries(self.other)

    @property
    def empty_carry(self):
        """The optional capability, when a part carries something across calls (a pair, None for
        a part that does not)."""
        if not self._carrying:
            return None
        return lambda base: tuple(part.empty_carry(base) if carries(part) else None
                                  for part in (self.heads, self.other))

    @property
    def carry(self):
        if not self._carrying:
            return None
        return lambda state: tuple(part.carry(s) if carries(part) else None
                                   for part, s in zip((self.heads, self.other), state))

    def draft(self, base, module, state: tuple, root_b, cache) -> Draft:
        return self.union(self.heads.draft(base, module, state[0], root_b, cache),
                          self.other.draft(base, None, state[1], root_b, cache))

    @property
    def sample_draft(self):
        """The optional capability, when the heads have it."""
        return self._sample_draft if samples_drafts(self.heads) else None

    def _sample_draft(self, base, module, state: tuple, root_b, cache, policy, key) -> Draft:
        return self.union(self.heads.sample_draft(base, module, state[0], root_b, cache, policy, key),
                          self.other.draft(base, None, state[1], root_b, cache))

    def union(self, heads: Draft, other: Draft) -> Draft:
        """One tree of both drafts (the module doc's layout)."""
        parent_bn = union_parents(heads, other)
        tokens_bn = jnp.concatenate([heads.tokens_bn, other.tokens_bn[:, 1:]], axis=1)
        layout = TreeBatch(parent_bn=parent_bn,
                           depth_bn=jnp.concatenate([heads.tree.depth_bn, other.tree.depth_bn[:, 1:]], axis=1),
                           max_depth=self.tree.depth,
                           # A heads node's children: its own, plus (at worst) every other-part node.
                           max_children=heads.tree.max_children + other.tokens_bn.shape[1] - 1)
        q_bnv = None
        if heads.q_bnv is not None:
            other_q_bnv = jax.nn.one_hot(other.tokens_bn[:, 1:], heads.q_bnv.shape[-1], dtype=heads.q_bnv.dtype)
            q_bnv = jnp.concatenate([heads.q_bnv, other_q_bnv], axis=1)
        return Draft(tokens_bn, layout, q_bnv)

    def commit(self, base, module, state: tuple, verified: Verified) -> tuple:
        return self.heads.commit(base, module, state[0], verified), self.other.commit(base, None, state[1], verified)


def _start(drafter, base, module, prefill: Prefill, carried):
    return drafter.start(base, module, prefill) if carried is None else drafter.start(base, module, prefill, carried)


def union_parents(heads: Draft, other: Draft) -> jax.Array:
    """[B, N_h + N_o - 1] each union node's parent. The other part's node j hangs under the heads
    node its parent's token path reaches (if the heads drafted that whole path), else under its
    own parent (shifted past the heads' nodes). Its parents come before it within its own part
    (the other part's trees are static Trees: nodes sorted by depth)."""
    n_h, n_o = heads.tokens_bn.shape[1], other.tokens_bn.shape[1]
    b = heads.tokens_bn.shape[0]
    h_parent_bh = heads.tree.parent_bn
    o_parent_bo = other.tree.parent_bn
    # twin_bo: the heads node whose token path equals other node j's (-1: none); the roots are twins.
    twin = [jnp.zeros((b,), jnp.int32)]
    parents = []
    for j in range(1, n_o):
        p_b = o_parent_bo[:, j]
        parent_twin_b = jnp.take_along_axis(jnp.stack(twin, axis=1), p_b[:, None], axis=1)[:, 0]
        match_bh = (h_parent_bh == parent_twin_b[:, None]) & (heads.tokens_bn == other.tokens_bn[:, j:j + 1])
        match_bh &= (parent_twin_b >= 0)[:, None] & (np.arange(n_h) > 0)
        twin.append(jnp.where(jnp.any(match_bh, axis=1), jnp.argmax(match_bh, axis=1), -1).astype(jnp.int32))
        parents.append(jnp.where(parent_twin_b >= 0, parent_twin_b, p_b + n_h - 1))
    if n_o == 1:
        return h_parent_bh
    return jnp.concatenate([h_parent_bh, jnp.stack(parents, axis=1).astype(jnp.int32)], axis=1)
