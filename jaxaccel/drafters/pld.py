"""Prompt lookup (training-free): the tokens that followed the last time the text said what it says now.

State: the row's text so far in a fixed buffer of the cache's length (the prompt, then every
emitted token; the root last) and its length. Each step, for n from max_ngram down to min_ngram,
the last n tokens are compared with every earlier window of the buffer at once; the longest n
that occurs picks the `branches` most recent occurrences, and the `depth` tokens after each
become one chain below the root. A continuation that runs into the present repeats the matched
period (a loop keeps looping). No occurrence: the chains carry token 0 and are simply rejected.
Static shapes throughout: every step drafts `branches * depth` nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import struct

from jaxaccel.decoding.tree import Tree
from jaxaccel.drafters.common import NO_TOKEN, chain_index, chains
from jaxaccel.drafters.protocol import Draft, Prefill, Verified
from jaxaccel.drafters.record import DrafterRecord


@struct.dataclass
class LookupState:
    tokens_bl: jax.Array  # [B, L] int32: prompt, then emitted tokens, then NO_TOKEN
    length_b: jax.Array  # [B] tokens written (the last is the next step's root)


@dataclass(frozen=True)
class PromptLookup:
    """N-gram lookup over the prompt and the generated text; `branches` chains of `depth` tokens."""

    depth: int = 8
    branches: int = 1
    max_ngram: int = 3
    min_ngram: int = 1
    module: None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.depth < 1 or self.branches < 1 or not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"prompt lookup needs depth >= 1, branches >= 1 and 1 <= min_ngram <= max_ngram, got {self}")

    @property
    def tree(self) -> Tree:
        """`branches` chains of `depth` nodes below the root."""
        return chains(self.branches, self.depth)

    def start(self, base, module, prefill: Prefill) -> LookupState:
        b, s = prefill.tokens_bs.shape
        slot_l = jnp.arange(prefill.cache_len)
        tokens_bl = jnp.pad(prefill.tokens_bs.astype(jnp.int32), ((0, 0), (0, prefill.cache_len - s)))
        tokens_bl = jnp.where(slot_l < prefill.lengths_b[:, None], tokens_bl, NO_TOKEN)
        tokens_bl = tokens_bl.at[jnp.arange(b), prefill.lengths_b].set(prefill.first_b)
        return LookupState(tokens_bl=tokens_bl, length_b=prefill.lengths_b + 1)

    def matches(self, state: LookupState) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Per row: [B, branches] the slot after each chosen occurrence of the longest n-gram
        found (most recent first), [B, branches] the distance from it to the present (a chain
        running into the present repeats it), and [B] that n (0: none found)."""
        tokens_bl, length_b = state.tokens_bl, state.length_b
        b, size = tokens_bl.shape
        slot_l = jnp.arange(size)
        ngram_b = jnp.zeros((b,), jnp.int32)
        start_br = jnp.zeros((b, self.branches), jnp.int32)
        period_br = jnp.ones((b, self.branches), jnp.int32)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):  # longest first: a found n is kept
            suffix_bn = jnp.take_along_axis(tokens_bl, jnp.maximum(length_b[:, None] - n + jnp.arange(n), 0), axis=1)
            match_bl = jnp.ones((b, size), bool)
            for i in range(n):  # window starting at slot j equals the suffix
                shifted_bl = jnp.pad(tokens_bl[:, i:], ((0, 0), (0, i)), constant_values=NO_TOKEN)
                match_bl &= shifted_bl == suffix_bn[:, i:i + 1]
            # Earlier windows only (the suffix itself ends at length - 1), with a suffix to match.
            match_bl &= (slot_l + n < length_b[:, None]) & (length_b[:, None] >= n)
            score_br, where_br = jax.lax.top_k(jnp.where(match_bl, slot_l, -1), self.branches)  # most recent first
            use_b = (ngram_b == 0) & (score_br[:, 0] >= 0)
            start_br = jnp.where(use_b[:, None], where_br + n, start_br)
            period_br = jnp.where(use_b[:, None], jnp.maximum(length_b[:, None] - n - where_br, 1), period_br)
            ngram_b = jnp.where(use_b, n, ngram_b)
        return start_br, period_br, ngram_b

    def chains(self, state: LookupState) -> tuple[jax.Array, jax.Array]:
        """([B, branches, depth] int32 the chains, zeros where nothing matched; [B] the n-gram
        length they continue, 0: none)."""
        tokens_bl, length_b = state.tokens_bl, state.length_b
        size = tokens_bl.shape[1]
        start_br, period_br, ngram_b = self.matches(state)
        # Chain slots; a slot at or past the present steps back by whole periods.
        slot_brd = start_br[:, :, None] + jnp.arange(self.depth)
        over_brd = slot_brd - (length_b[:, None, None] - 1)
        slot_brd -= period_br[:, :, None] * jnp.maximum(-(-over_brd // period_br[:, :, None]), 0)
        chain_brd = jnp.take_along_axis(tokens_bl[:, None, :], jnp.clip(slot_brd, 0, size - 1), axis=2)
        return jnp.where((ngram_b > 0)[:, None, None] & (chain_brd >= 0), chain_brd, 0).astype(jnp.int32), ngram_b

    def draft(self, base, module, state: LookupState, root_b, cache) -> Draft:
        chain_brd, _ = self.chains(state)
        branch_n, level_n = chain_index(self.branches, self.depth)
        tokens_bn = jnp.concatenate([root_b[:, None], chain_brd[:, branch_n, level_n]], axis=1).astype(jnp.int32)
        return Draft(tokens_bn, self.tree.batch(root_b.shape[0]))

    def commit(self, base, module, state: LookupState, verified: Verified) -> LookupState:
        emitted_bd, count_b = verified.emitted_bd, verified.verdict.num_nodes_b
        b, d = emitted_bd.shape
        offset_d = jnp.arange(d)
        slot_bd = jnp.where(offset_d < count_b[:, None], state.length_b[:, None] + offset_d, state.tokens_bl.shape[1])
        tokens_bl = state.tokens_bl.at[jnp.arange(b)[:, None], slot_bd].set(emitted_bd, mode="drop")
        return LookupState(tokens_bl=tokens_bl, length_b=state.length_b + count_b)


def make(tree, module, **options) -> PromptLookup:
    if tree is not None:
        raise ValueError("prompt lookup lays out its own tree (options depth= and branches=), not --tree")
    return PromptLookup(**options)


RECORD = DrafterRecord(
    name="pld", summary="prompt lookup: continue the most recent earlier occurrence of the last n-gram (training-free)",
    make=make, options=("depth", "branches", "max_ngram", "min_ngram"), composes=True)
