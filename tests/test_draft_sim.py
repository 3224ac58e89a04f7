"""benchmarks/cpu/draft_sim.py's upper bound: what it copies, and that no drafting rule beats it."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SPEC = importlib.util.spec_from_file_location(
    "draft_sim", Path(__file__).resolve().parents[1] / "benchmarks" / "cpu" / "draft_sim.py")
draft_sim = sys.modules["draft_sim"] = importlib.util.module_from_spec(SPEC)  # dataclasses look it up
SPEC.loader.exec_module(draft_sim)


def sequence(prompt, answer, rest=None, max_ngram=3):
    """draft_sim's per-answer record: prompt lookup's chains as the drafter computes them, REST's
    chains from `rest` ({depth: [A, 2, depth]}; default: token 0, which no test text holds)."""
    tokens_tl, length_t = draft_sim.positions(prompt, answer)
    pld, pld_n = draft_sim.pld_chains(tokens_tl, length_t, max_ngram)
    if rest is None:
        rest = {d: np.zeros((len(length_t), 2, d), np.int32) for d in (2, 3, 4, 5)}
    return list(answer), pld, pld_n, rest, list(prompt)


def test_bound_copies_what_followed_an_earlier_occurrence():
    seq = sequence([5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 1])
    assert list(draft_sim.best_drafts(seq, 5)) == [4, 3, 2, 1, 0, 0]
    assert draft_sim.simulate_bound(seq, 5) == (6, 2, 12)  # 5 then 6..9 in one step, then 1
    assert draft_sim.simulate_bound(seq, 2) == (6, 3, 9)  # 2 deep: 5 6 7, then 8 9, then 1


def test_bound_repeats_a_period_into_the_future():
    # Root 3 at slot 2 follows an earlier 3 two slots back: the copy reads 4 3 4 3 ... by period.
    seq = sequence([3, 4], [3, 4, 3, 4, 3, 4, 3, 4])
    assert draft_sim.best_drafts(seq, 5)[0] == 5
    assert draft_sim.simulate_bound(seq, 5)[:2] == (8, 2)


def test_bound_takes_rest_chains():
    answer = [1, 2, 3, 4]
    rest = {d: np.zeros((64, 2, d), np.int32) for d in (2, 3, 4, 5)}
    rest[5][0, 1] = [2, 3, 9, 9, 9]  # the second continuation at the first root
    seq = sequence([7], answer, rest)
    assert draft_sim.best_drafts(seq, 5)[0] == 2


@pytest.mark.parametrize("seed", range(3))
def test_no_rule_accepts_more_than_the_bound(seed):
    # Text from a small vocabulary repeats itself often, so prompt lookup and REST (random chains
    # over the same tokens) match often; every rule's chains are at most 15 deep.
    rng = np.random.default_rng(seed)
    prompt, answer = rng.integers(1, 6, 40), rng.integers(1, 6, 120)
    answer[60:90] = answer[20:50]  # a long repeat
    length = len(draft_sim.positions(prompt, answer)[1])
    rest = {d: rng.integers(1, 6, (length, 2, d)).astype(np.int32) for d in (2, 3, 4, 5)}
    seq = sequence(prompt, answer, rest)
    tokens, steps, _ = draft_sim.simulate_bound(seq, 15)
    assert tokens == len(answer)
    for name, policy in draft_sim.POLICIES.items():
        if not isinstance(policy, draft_sim.Bound):
            ruled, ruled_steps, _ = draft_sim.simulate(seq, policy)
            assert ruled == len(answer) and ruled_steps >= steps, name
