"""Lookahead decoding (training-free; Fu et al. 2024, "Break the Sequential Dependency of LLM
Inference Using Lookahead Decoding"): Jacobi iterations feed an n-gram pool, verified in the same pass.

Every step's one base forward scores two branches below the root (N = `ngram`, W = `window`,
G = `candidates`):
  verification: the G n-grams of the pool whose first token is the root, each a chain of its N-1
      other tokens, most recently added first; chains that share a prefix share its nodes (a
      per-row trie: the verifier then takes the longest match among them);
  lookahead: a window of W columns by N-1 levels of Jacobi guesses. Level 0 is a chain below the
      root (column c at position c+1); the level-l guess of column c hangs below level l-1 of the
      same column (position l+c+1). Each guess therefore sees the root, level 0 up to its column
      and its own column's earlier levels: the paper's lookahead mask, which is an ancestor mask.
`commit` takes the base's greedy next token after the top level of every column: a new level.
A column read down its levels and closed by its new token is an n-gram of the base's own
successive predictions; it enters the pool under its first token. The oldest level is dropped and
the new one appended (the window moves on with the root).

Pool: [B, V, G, N-1]: per first token, the G n-grams added last (a ring, with a write count per
token; an n-gram the ring holds is not added twice), seeded with the G distinct n-grams of the
prompt that occur last. The levels start as prompt tokens; columns enter the pool once every level
above the oldest is a base prediction (from the (N-2)-th commit on).

The window is a subtree with consistent positions, so the verifier may also accept a path through
it (Jacobi decoding accepting its own guess): lossless like any drafted tree, since every node is a
point mass decided by earlier steps. Static shapes: every step drafts 1 + (G + W)(N-1) nodes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxaccel.decoding.sampling import greedy_tokens
from jaxaccel.decoding.tree import Tree, TreeBatch
from jaxaccel.drafters.protocol import Draft, Prefill, Verified
from jaxaccel.drafters.record import DrafterRecord


@struct.dataclass
class LookaheadState:
    levels_blw: jax.Array  # [B, N-1, W] int32: the Jacobi guesses, level 0 the oldest
    pool_bvgm: jax.Array  # [B, V, G, N-1] int32: the n-grams after each first token (ring slots)
    written_bv: jax.Array  # [B, V] int32: n-grams ever added under each first token
    steps: jax.Array  # [] int32: commits so far


class Layout(NamedTuple):
    """The static tree and where each branch's tokens sit in it."""
    tree: Tree
    chain_gm: np.ndarray  # [G, N-1] node of candidate g's m-th token
    window_lw: np.ndarray  # [N-1, W] node of level l, column w


@functools.lru_cache(maxsize=None)
def layout(window: int, ngram: int, candidates: int) -> Layout:
    """Candidate g is the rank-g chain below the root; the window hangs below rank G: level 0 is its
    rank-0 chain, and level l >= 1 of column c is the rank-1 child of (0, c), then rank-0 children."""
    chains = [[(g,) + (0,) * m for m in range(ngram - 1)] for g in range(candidates)]
    levels = [[(candidates,) + (0,) * c + ((1,) + (0,) * (lv - 1) if lv else ()) for c in range(window)]
              for lv in range(ngram - 1)]
    tree = Tree(tuple(p for group in (chains, levels) for row in group for p in row))
    node = {p: i + 1 for i, p in enumerate(tree.paths)}
    return Layout(tree, np.array([[node[p] for p in row] for row in chains], np.int32),
                  np.array([[node[p] for p in row] for row in levels], np.int32))


@dataclass(frozen=True)
class Lookahead:
    """Lookahead decoding: a `window` x (`ngram` - 1) Jacobi window and `candidates` pooled n-grams."""

    # Sized for a small CPU (16 nodes): on 13 Spec-Bench questions with SmolLM2, 9 to 16 nodes drafted
    # gave about the same accepted tokens per step cost; 4-grams accept the most.
    window: int = 3
    ngram: int = 4
    candidates: int = 2
    module: None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.window < 1 or self.ngram < 2 or self.candidates < 1:
            raise ValueError(f"lookahead needs window >= 1, ngram >= 2 and candidates >= 1, got {self}")

    @property
    def layout(self) -> Layout:
        return layout(self.window, self.ngram, self.candidates)

    @property
    def tree(self) -> Tree:
        """The candidates' chains and the window, below one root (each row's trie merges shared prefixes)."""
        return self.layout.tree

    def start(self, base, module, prefill: Prefill) -> LookaheadState:
        tokens_bs, lengths_b = prefill.tokens_bs.astype(jnp.int32), prefill.lengths_b
        b, s = tokens_bs.shape
        # The text so far: the prompt, then the first token.
        text_bt = jnp.pad(tokens_bs, ((0, 0), (0, 1))).at[jnp.arange(b), lengths_b].set(prefill.first_b)
        pool_bvgm, written_bv = seed_pool(text_bt, lengths_b + 1, base.config.vocab_size, self.candidates, self.ngram)
        # First guesses: the prompt's last (N-1) * W tokens (cycled when it is shorter).
        size = (self.ngram - 1) * self.window
        back_k = jnp.mod(lengths_b[:, None] - size + jnp.arange(size), lengths_b[:, None])
        levels_blw = jnp.take_along_axis(tokens_bs, back_k, axis=1).reshape(b, self.ngram - 1, self.window)
        return LookaheadState(levels_blw=levels_blw, pool_bvgm=pool_bvgm, written_bv=written_bv, steps=jnp.int32(0))

    def draft(self, base, module, state: LookaheadState, root_b, cache) -> Draft:
        lay, b, g = self.layout, root_b.shape[0], self.candidates
        rows_b = jnp.arange(b)
        # The root's n-grams, most recently added first.
        slot_bg = jnp.mod(state.written_bv[rows_b, root_b][:, None] - 1 - jnp.arange(g), g)
        chains_bgm = jnp.take_along_axis(state.pool_bvgm[rows_b, root_b], slot_bg[:, :, None], axis=1)
        tokens_bn = jnp.zeros((b, lay.tree.num_nodes), jnp.int32).at[:, 0].set(root_b)
        tokens_bn = tokens_bn.at[:, lay.chain_gm].set(chains_bgm).at[:, lay.window_lw].set(state.levels_blw)
        return Draft(tokens_bn, self.trie(chains_bgm))

    def trie(self, chains_bgm: jax.Array) -> TreeBatch:
        """The static tree with each candidate's m-th token re-hung below the first candidate that
        shares its first m tokens: repeated prefixes become leaves that an earlier sibling shadows."""
        lay = self.layout
        b = chains_bgm.shape[0]
        parent_bn = jnp.broadcast_to(jnp.asarray(lay.tree.parent_n), (b, lay.tree.num_nodes))
        for m in range(1, self.ngram - 1):
            same_bgh = jnp.all(chains_bgm[:, :, None, :m] == chains_bgm[:, None, :, :m], axis=-1)
            first_bg = jnp.argmax(same_bgh, axis=2)  # the first candidate with g's prefix (g itself at worst)
            parent_bn = parent_bn.at[:, lay.chain_gm[:, m]].set(jnp.asarray(lay.chain_gm[:, m - 1])[first_bg])
        depth_bn = jnp.broadcast_to(jnp.asarray(lay.tree.depth_n), parent_bn.shape)
        # A node gains at most G - 1 re-hung children; the root has G + 1.
        return TreeBatch(parent_bn=parent_bn, depth_bn=depth_bn, max_depth=lay.tree.depth,
                         max_children=self.candidates + 1)

    def commit(self, base, module, state: LookaheadState, verified: Verified) -> LookaheadState:
        top_n = self.layout.window_lw[-1]
        new_bw = greedy_tokens(verified.logits_bnv[:, top_n])
        grams_bwn = jnp.concatenate([jnp.swapaxes(state.levels_blw, 1, 2), new_bw[:, :, None]], axis=2)
        ready = state.steps >= self.ngram - 2  # every level above the oldest is the base's guess
        pool_bvgm, written_bv = state.pool_bvgm, state.written_bv
        for c in range(self.window):  # in turn: two columns may share a first token
            pool_bvgm, written_bv = add_ngram(pool_bvgm, written_bv, grams_bwn[:, c], ready)
        levels_blw = jnp.concatenate([state.levels_blw[:, 1:], new_bw[:, None]], axis=1)
        return LookaheadState(levels_blw=levels_blw, pool_bvgm=pool_bvgm, written_bv=written_bv,
                              steps=state.steps + 1)


def add_ngram(pool_bvgm, written_bv, gram_bn, ready) -> tuple[jax.Array, jax.Array]:
    """Each row's n-gram into the ring of its first token, unless the ring holds it already."""
    b, vocab, g, _ = pool_bvgm.shape
    rows_b = jnp.arange(b)
    key_b, rest_bm = gram_bn[:, 0], gram_bn[:, 1:]
    count_b = written_bv[rows_b, key_b]
    held_bg = jnp.all(pool_bvgm[rows_b, key_b] == rest_bm[:, None], axis=-1) & (jnp.arange(g) < count_b[:, None])
    key_b = jnp.where(ready & ~jnp.any(held_bg, axis=1), key_b, vocab)  # out of range: dropped
    pool_bvgm = pool_bvgm.at[rows_b, key_b, count_b % g].set(rest_bm, mode="drop")
    return pool_bvgm, written_bv.at[rows_b, key_b].add(1, mode="drop")


def seed_pool(text_bt, length_b, vocab: int, g: int, n: int) -> tuple[jax.Array, jax.Array]:
    """The pool holding, per first token, the G distinct n-grams of the text that occur last, in the
    ring order that adding them in order of last occurrence gives."""
    b, t = text_bt.shape
    start_t = jnp.arange(t)
    grams_btn = text_bt[:, np.minimum(np.arange(t)[:, None] + np.arange(n), t - 1)]
    valid_bt = start_t + n <= length_b[:, None]
    pair_btu = valid_bt[:, :, None] & valid_bt[:, None, :]  # [t, u]: both are n-grams of the text
    later_btu = start_t[None, :] > start_t[:, None]
    same_btu = jnp.all(grams_btn[:, :, None] == grams_btn[:, None, :], axis=-1) & pair_btu
    last_bt = valid_bt & ~jnp.any(same_btu & later_btu, axis=2)  # no later occurrence of the same n-gram
    same_key_btu = (grams_btn[:, :, None, 0] == grams_btn[:, None, :, 0]) & last_bt[:, :, None] & last_bt[:, None, :]
    count_bt = jnp.sum(same_key_btu, axis=2)  # distinct n-grams under t's first token
    after_bt = jnp.sum(same_key_btu & later_btu, axis=2)  # of them, seen last after t's
    keep_bt = last_bt & (after_bt < g)
    key_bt = jnp.where(keep_bt, grams_btn[:, :, 0], vocab)
    rows_b1 = jnp.arange(b)[:, None]
    pool_bvgm = jnp.zeros((b, vocab, g, n - 1), jnp.int32).at[rows_b1, key_bt, (count_bt - 1 - after_bt) % g].set(
        grams_btn[:, :, 1:], mode="drop")
    written_bv = jnp.zeros((b, vocab), jnp.int32).at[rows_b1, key_bt].max(count_bt, mode="drop")
    return pool_bvgm, written_bv


def make(tree, module, **options) -> Lookahead:
    if tree is not None:
        raise ValueError("lookahead lays out its own tree (options window=, ngram=, candidates=), not --tree")
    return Lookahead(**options)


RECORD = DrafterRecord(
    name="lookahead", summary="lookahead decoding: Jacobi iterations feed an n-gram pool, verified in the same pass "
    "(training-free)", make=make, options=("window", "ngram", "candidates"))
