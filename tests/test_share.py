"""REST and prompt lookup sharing a node budget (jaxaccel.drafters.share): each row's layout follows
what prompt lookup matched, and chains that start alike are one trie. Greedy identity and the
base's law at T = 1 are checked with the other training-free drafters in test_drafters."""

import json
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.drafters import make_drafter
from jaxaccel.drafters.common import merge_twins
from jaxaccel.drafters.protocol import Prefill
from jaxaccel.drafters.share import layouts


def merged_reference(tokens, parents):
    """The trie, node by node: a node whose (merged) parent already has an earlier child drafting
    its token is that child's twin; its own children move under the twin."""
    canon, out = [0], [parents[0]]
    for j in range(1, len(tokens)):
        p = canon[parents[j]]
        twin = next((i for i in range(1, j) if out[i] == p and tokens[i] == tokens[j] and canon[i] == i), j)
        canon.append(twin)
        out.append(p)
    return out


def test_merge_twins_matches_a_reference_on_random_forests():
    rng = np.random.default_rng(0)
    for _ in range(20):
        b, n = 4, int(rng.integers(2, 9))
        parent_bn = np.full((b, n), -1)
        for j in range(1, n):
            parent_bn[:, j] = rng.integers(0, j, b)  # parents before children
        tokens_bn = rng.integers(0, 3, (b, n))  # few tokens: many twins
        got = np.asarray(merge_twins(jnp.asarray(tokens_bn), jnp.asarray(parent_bn)))
        for row in range(b):
            assert got[row].tolist() == merged_reference(tokens_bn[row].tolist(), parent_bn[row].tolist())


def test_merge_twins_hangs_a_chain_under_its_twin():
    # root, chain A = 5 6, chain B = 5 7 8: B's 7 moves under A's 5; B's own 5 stays, after its twin.
    tokens = jnp.array([[9, 5, 6, 5, 7, 8]])
    parents = jnp.array([[-1, 0, 1, 0, 3, 4]])
    assert merge_twins(tokens, parents).tolist() == [[-1, 0, 1, 0, 1, 4]]


def test_layouts_fill_the_budget():
    for nodes in range(2, 10):
        for max_ngram in (1, 2, 3, 4):
            table = layouts(nodes, max_ngram)
            assert table.shape == (max_ngram + 1, 3) and (table.sum(axis=1) == nodes - 1).all()
            assert table[max_ngram].tolist() == [0, 0, nodes - 1]  # the longest match: prompt lookup alone
    assert layouts(6, 3).tolist() == [[3, 2, 0], [2, 0, 3], [2, 0, 3], [0, 0, 5]]


@pytest.fixture
def corpus(tmp_path):
    """After 1 2 the model wrote 3 4 5 twice and 8 9 once."""
    answers = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6], [1, 2, 8, 9]]
    (tmp_path / "shard-00000.jsonl").write_text("".join(json.dumps({"response_ids": a}) + "\n" for a in answers))
    return tmp_path


def test_each_row_is_laid_out_by_what_prompt_lookup_matched(corpus):
    drafter = make_drafter(f"share:corpus={corpus},nodes=6")
    base = SimpleNamespace(config=SimpleNamespace(vocab_size=32))
    # Row 0 repeats itself (20 21 22 ... 20 21 22): prompt lookup's 3-gram, its chain takes all five nodes.
    # Row 1 never repeats and ends on 1 2: REST's two continuations, 3 4 5 and 8 9.
    texts = [[20, 21, 22, 23, 24, 25, 26, 27, 20, 21], [30, 11, 12, 13, 1]]
    firsts = [22, 2]
    tokens_bs = np.zeros((2, 10), np.int32)
    for row, text in enumerate(texts):
        tokens_bs[row, :len(text)] = text
    prefill = Prefill(hidden_bsd=jnp.zeros((2, 10, 4)), tokens_bs=jnp.asarray(tokens_bs),
                      lengths_b=jnp.array([10, 5]), first_b=jnp.array(firsts), cache_len=24)
    state = drafter.start(base, None, prefill, drafter.empty_carry(base))
    draft = drafter.draft(base, None, state, jnp.array(firsts), None)
    assert draft.tokens_bn.tolist() == [[22, 23, 24, 25, 26, 27], [2, 3, 4, 5, 8, 9]]
    assert draft.tree.parent_bn.tolist() == [[-1, 0, 1, 2, 3, 4], [-1, 0, 1, 2, 0, 4]]
    assert draft.tree.depth_bn.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 1, 2]]


def test_share_needs_a_corpus_and_a_budget():
    with pytest.raises(ValueError, match="nodes >= 2"):
        make_drafter("share:corpus=x,nodes=1")
    with pytest.raises(ValueError, match="corpus"):
        make_drafter("share").empty_carry(SimpleNamespace(config=SimpleNamespace(vocab_size=32)))
