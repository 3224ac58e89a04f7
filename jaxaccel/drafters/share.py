"""REST and prompt lookup sharing one budget of nodes (training-free), split per row each step by
what prompt lookup matched.

A verify pass on a CPU costs the same over 1–6 nodes (the panel kernel's register block), so the
budget is fixed and the question is only whose chains fill it. Prompt lookup's chain is worth
most where it continued its longest n-gram (the text repeats itself: copy far ahead) and nothing
where it matched none; REST's most frequent continuation is worth a little everywhere, and its
second a little more where nothing else drafts. So each row, by the n-gram length n prompt lookup
matched (`layouts`): n = max_ngram: prompt lookup's chain takes every node; n = 0: REST's two most
frequent continuations share them; otherwise REST's first two tokens and prompt lookup's chain for
the rest. Chains that start alike are one trie (`merge_twins`), so a step accepts the longest of
them. Chosen by simulation along the model's greedy answers to held-out training prompts, REST's store
built without them (`benchmarks/cpu/draft_sim.py --heldout 320`): 2.11 tokens a step on six nodes
against 1.95 for the fixed REST 2 + prompt lookup 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from jaxaccel.decoding.tree import TreeBatch
from jaxaccel.drafters.common import merge_twins
from jaxaccel.drafters.compose import UnionTree
from jaxaccel.drafters.pld import PromptLookup
from jaxaccel.drafters.protocol import Draft, Prefill, Verified
from jaxaccel.drafters.record import DrafterRecord
from jaxaccel.drafters.rest import Rest, recorded_options
from jaxaccel.drafters.rest_store import lookup


def layouts(nodes: int, max_ngram: int) -> np.ndarray:
    """[max_ngram + 1, 3] the chains' lengths (REST's first, its second, prompt lookup's) by the
    n-gram length prompt lookup matched; each row sums to nodes - 1."""
    d = nodes - 1
    table = np.zeros((max_ngram + 1, 3), np.int32)
    table[0] = ((d + 1) // 2, d // 2, 0)
    table[1:] = (min(2, d // 2), 0, d - min(2, d // 2))
    table[max_ngram] = (0, 0, d)
    return table


def slot_tables(table: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per layout and draft node (nodes 1..): (chain, level, parent, depth), each [layouts, nodes - 1]."""
    chain, level, parent, depth = (np.zeros((len(table), table[0].sum()), np.int32) for _ in range(4))
    for row, lengths in enumerate(table):
        slot = 0
        for c, length in enumerate(lengths):
            for lv in range(length):
                chain[row, slot], level[row, slot], depth[row, slot] = c, lv, lv + 1
                parent[row, slot] = slot if lv else 0  # node slot + 1's parent: the node before, or the root
                slot += 1
    return chain, level, parent, depth


@dataclass(frozen=True)
class Share:
    """`nodes` per step (the root included) from REST's store over `corpus` and prompt lookup."""

    corpus: str = ""
    nodes: int = 6
    max_ngram: int = 3  # prompt lookup's longest n-gram
    rest_max_ngram: int = 4
    module: None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.nodes < 2 or self.max_ngram < 1 or self.rest_max_ngram < 1:
            raise ValueError(f"share needs nodes >= 2, max_ngram >= 1 and rest_max_ngram >= 1, got {self}")

    @property
    def table(self) -> np.ndarray:
        return layouts(self.nodes, self.max_ngram)

    @property
    def rest(self) -> Rest:
        return Rest(corpus=self.corpus, depth=max(int(self.table[:, :2].max()), 1), branches=2,
                    max_ngram=self.rest_max_ngram)

    @property
    def lookup(self) -> PromptLookup:
        return PromptLookup(depth=self.nodes - 1, max_ngram=self.max_ngram)

    @property
    def tree(self) -> UnionTree:
        return UnionTree(num_nodes=self.nodes, depth=self.nodes - 1)

    def empty_carry(self, base):
        return self.rest.empty_carry(base)

    def carry(self, state: tuple):
        return self.rest.carry(state[0])

    def start(self, base, module, prefill: Prefill, carried=None) -> tuple:
        return self.rest.start(base, None, prefill, carried), self.lookup.start(base, None, prefill)

    def draft(self, base, module, state: tuple, root_b, cache) -> Draft:
        d = self.nodes - 1
        rest_bcd, _ = lookup(state[0].store, state[0].recent_bk)
        lookup_brd, ngram_b = self.lookup.chains(state[1])
        pad = [(0, 0), (0, 0), (0, d - rest_bcd.shape[2])]
        # The candidate chains in `layouts`' column order: REST's first, its second, prompt lookup's.
        candidates_bkd = jnp.concatenate([jnp.pad(rest_bcd, pad), lookup_brd], axis=1)
        chain_bn, level_bn, parent_bn, depth_bn = (jnp.asarray(t)[ngram_b] for t in slot_tables(self.table))
        drafted_bn = candidates_bkd[jnp.arange(root_b.shape[0])[:, None], chain_bn, level_bn]
        tokens_bn = jnp.concatenate([root_b[:, None], drafted_bn], axis=1).astype(jnp.int32)
        parent_bn = jnp.concatenate([jnp.full_like(parent_bn[:, :1], -1), parent_bn], axis=1)
        depth_bn = jnp.concatenate([jnp.zeros_like(depth_bn[:, :1]), depth_bn], axis=1)
        layout = TreeBatch(parent_bn=merge_twins(tokens_bn, parent_bn), depth_bn=depth_bn, max_depth=d,
                           max_children=3)  # a node's children: at most one per chain
        return Draft(tokens_bn, layout)

    def commit(self, base, module, state: tuple, verified: Verified) -> tuple:
        return self.rest.commit(base, None, state[0], verified), self.lookup.commit(base, None, state[1], verified)


def make(tree, module, **options) -> Share:
    if tree is not None:
        raise ValueError("share lays out its own tree per row (option nodes=), not --tree")
    return Share(**options)


RECORD = DrafterRecord(
    name="share", summary="REST and prompt lookup share a budget of nodes, split per row by what prompt lookup matched "
                          "(training-free)",
    make=make, options=("corpus", "nodes", "max_ngram", "rest_max_ngram"), recorded_options=recorded_options,
    composes=True)
