"""Lookahead decoding's pieces against simple references: the window's mask (the paper's), the
candidates' trie, the pool (seeded from the text, fed by the Jacobi columns) and the level update.
Greedy identity and the two-sample test at T = 1 are in tests/test_drafters.py with the others."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.decoding.sampling import Greedy
from jaxaccel.decoding.verify import verify_tree
from jaxaccel.drafters import Draft, Verified, make_drafter
from jaxaccel.drafters.lookahead import Lookahead, LookaheadState, add_ngram, seed_pool


def test_the_window_sees_what_the_paper_says():
    """Guess (l, c) sits at position l + c + 1 and sees the root, level 0 up to column c and column c's
    levels up to l; candidate g's m-th token sees the root and g's tokens up to m."""
    la = Lookahead(window=3, ngram=4, candidates=2)
    lay, n = la.layout, la.tree.num_nodes
    assert n == 1 + (2 + 3) * 3
    want = np.eye(n, dtype=bool)
    want[:, 0] = True
    for g in range(2):
        for m in range(3):
            want[lay.chain_gm[g, m], lay.chain_gm[g, :m + 1]] = True
    for lv in range(3):
        for c in range(3):
            node = lay.window_lw[lv, c]
            assert la.tree.depth_n[node] == lv + c + 1
            want[node, lay.window_lw[0, :c + 1]] = True
            want[node, lay.window_lw[:lv + 1, c]] = True
    distinct_bgm = jnp.arange(6).reshape(1, 2, 3)
    np.testing.assert_array_equal(la.trie(distinct_bgm).mask_bnn[0], want)


def test_candidates_sharing_a_prefix_share_its_nodes():
    la = Lookahead(window=2, ngram=4, candidates=3)
    lay = la.layout
    chains_bgm = jnp.array([[[5, 6, 1], [5, 7, 2], [5, 7, 3]]])
    parent_n = np.asarray(la.trie(chains_bgm).parent_bn[0])
    # 5 7 2 continues below candidate 0's 5; 5 7 3 below candidate 1's 7.
    assert parent_n[lay.chain_gm[1, 1]] == lay.chain_gm[0, 0]
    assert parent_n[lay.chain_gm[2, 1]] == lay.chain_gm[0, 0]
    assert parent_n[lay.chain_gm[2, 2]] == lay.chain_gm[1, 1]
    # The verifier then takes the longest match: 5 7 3 (the base says 5, 7, 3, 9 along it).
    tokens_bn = jnp.zeros((1, la.tree.num_nodes), jnp.int32).at[:, lay.chain_gm].set(chains_bgm)
    target_n = np.full(la.tree.num_nodes, 4)
    target_n[[0, lay.chain_gm[0, 0], lay.chain_gm[1, 1], lay.chain_gm[2, 2]]] = [5, 7, 3, 9]
    logits_bnv = jnp.asarray(np.eye(10)[target_n][None])
    verdict = verify_tree(la.trie(chains_bgm), tokens_bn, logits_bnv, Greedy(), None)
    assert int(verdict.num_nodes_b[0]) == 4 and int(verdict.bonus_b[0]) == 9


def reference_pool(events, vocab, g, n):
    """Adds n-grams one at a time: a first token's ring holds its last g additions, none twice."""
    pool, written = np.zeros((vocab, g, n - 1), np.int64), np.zeros(vocab, np.int64)
    for gram in events:
        key, rest = gram[0], list(gram[1:])
        if any(list(pool[key, s]) == rest for s in range(min(written[key], g))):
            continue
        pool[key, written[key] % g] = rest
        written[key] += 1
    return pool, written


@pytest.mark.parametrize("g,n", [(2, 3), (3, 2), (3, 4)])
def test_the_pool_is_seeded_with_the_texts_last_distinct_ngrams(g, n):
    rng = np.random.default_rng(g * 10 + n)
    vocab, t = 6, 40
    text_bt = rng.integers(0, vocab, (2, t))
    length_b = np.array([t, 23])
    pool_bvgm, written_bv = seed_pool(jnp.asarray(text_bt), jnp.asarray(length_b), vocab, g, n)
    for row in range(2):
        grams = [tuple(text_bt[row, i:i + n]) for i in range(length_b[row] - n + 1)]
        # Distinct n-grams in order of their last occurrence, added in that order.
        last = sorted(set(grams), key=lambda x: max(i for i, y in enumerate(grams) if y == x))
        pool, written = reference_pool(last, vocab, g, n)
        np.testing.assert_array_equal(written_bv[row], written)
        for key in range(vocab):
            np.testing.assert_array_equal(pool_bvgm[row, key, :min(written[key], g)], pool[key, :min(written[key], g)])


def test_ngrams_enter_their_ring_once():
    rng = np.random.default_rng(3)
    vocab, g, n, b = 4, 2, 3, 3
    events_bk = rng.integers(0, vocab, (b, 30, n))
    pool_bvgm, written_bv = jnp.zeros((b, vocab, g, n - 1), jnp.int32), jnp.zeros((b, vocab), jnp.int32)
    for k in range(30):
        pool_bvgm, written_bv = add_ngram(pool_bvgm, written_bv, jnp.asarray(events_bk[:, k]), jnp.bool_(True))
    for row in range(b):
        pool, written = reference_pool(events_bk[row], vocab, g, n)
        np.testing.assert_array_equal(pool_bvgm[row], pool)
        np.testing.assert_array_equal(written_bv[row], written)
    unchanged = add_ngram(pool_bvgm, written_bv, jnp.asarray(events_bk[:, 0]) * 0 + 1, jnp.bool_(False))
    np.testing.assert_array_equal(unchanged[1], written_bv)


def test_commit_moves_the_window_on_and_pools_its_columns():
    """The base's greedy token after each column's top guess becomes the new top level; each column,
    closed by it, enters the pool once the levels are all the base's guesses."""
    la = make_drafter("lookahead:window=3,ngram=3,candidates=2")
    lay, nodes = la.layout, la.tree.num_nodes
    rng = np.random.default_rng(4)
    vocab, b = 9, 2
    levels = rng.integers(0, vocab, (b, 2, 3))
    levels[0, 0, :2] = 4  # two columns under one first token, in one commit
    state = LookaheadState(levels_blw=jnp.asarray(levels), pool_bvgm=jnp.zeros((b, vocab, 2, 2), jnp.int32),
                           written_bv=jnp.zeros((b, vocab), jnp.int32), steps=jnp.int32(0))
    logits = rng.normal(size=(b, nodes, vocab))
    root = jnp.zeros((b,), jnp.int32)
    draft = la.draft(None, None, state, root, None)
    verified = Verified(draft=draft, hidden_bnd=None, logits_bnv=jnp.asarray(logits),
                        verdict=verify_tree(draft.tree, draft.tokens_bn, jnp.asarray(logits), Greedy(), None),
                        lengths_b=jnp.zeros((b,), jnp.int32))
    new = np.argmax(logits[:, lay.window_lw[-1]], axis=-1)
    for steps, pooled in ((0, False), (1, True)):  # ngram 3: pooled from the first commit on
        after = la.commit(None, None, state.replace(steps=jnp.int32(steps)), verified)
        np.testing.assert_array_equal(after.levels_blw, np.concatenate([levels[:, 1:], new[:, None]], axis=1))
        assert int(after.steps) == steps + 1
        for row in range(b):
            columns = [(*levels[row, :, c], new[row, c]) for c in range(3)]
            pool, written = reference_pool(columns if pooled else [], vocab, 2, 3)
            np.testing.assert_array_equal(after.pool_bvgm[row], pool)
            np.testing.assert_array_equal(after.written_bv[row], written)


def test_drafts_offer_the_roots_latest_ngrams_first():
    la = Lookahead(window=2, ngram=3, candidates=3)
    lay = la.layout
    pool = np.zeros((1, 8, 3, 2), np.int32)
    pool[0, 5] = [[1, 1], [2, 2], [3, 3]]
    levels = np.array([[[6, 7], [4, 3]]])
    state = LookaheadState(levels_blw=jnp.asarray(levels), pool_bvgm=jnp.asarray(pool),
                           written_bv=jnp.zeros((1, 8), jnp.int32).at[0, 5].set(4), steps=jnp.int32(9))
    draft = la.draft(None, None, state, jnp.array([5]), None)
    assert isinstance(draft, Draft)
    tokens = np.asarray(draft.tokens_bn[0])
    assert tokens[0] == 5
    # 4 written into 3 slots: the latest in slot 0 (the 4th), then slot 2, then slot 1.
    np.testing.assert_array_equal(tokens[lay.chain_gm], [[1, 1], [3, 3], [2, 2]])
    np.testing.assert_array_equal(tokens[lay.window_lw], levels[0])


def test_lookahead_options_and_errors():
    assert make_drafter("lookahead").tree.num_nodes <= 16  # sized for a small CPU
    with pytest.raises(ValueError, match="lookahead needs window >= 1, ngram >= 2"):
        make_drafter("lookahead:ngram=1")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['depth'\] for drafter 'lookahead'"):
        make_drafter("lookahead:depth=3")
