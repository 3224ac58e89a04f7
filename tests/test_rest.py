"""REST's datastore: the jitted lookup drafts what a plain count over the corpus says, on real
answers it was and was not built from; the drafter finds a model's committed answers by itself
and names what is wrong with a corpus. (Decoding with it: tests/test_drafters.py.)"""

import collections
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.drafters import make_drafter
from jaxaccel.drafters.registry import composes, split_spec
from jaxaccel.drafters.rest import Rest, recorded_options
from jaxaccel.drafters.rest_store import NO_TOKEN, build_store, lookup, read_corpus

ANSWERS = Path(__file__).resolve().parents[1] / "data" / "distill" / "smollm2-135m-instruct" / "responses"
VOCAB = 49152


def reference(corpus, max_ngram, depth, branches):
    """context tuple -> [branches] continuations: the most frequent first tokens (ties: the smaller
    token), each with its most frequent continuation (ties: the smallest; past the end, 0)."""
    counts = collections.defaultdict(collections.Counter)
    for text in corpus:
        for i in range(1, len(text)):
            continuation = tuple(text[i:i + depth]) + (NO_TOKEN,) * max(0, i + depth - len(text))
            for k in range(1, min(i, max_ngram) + 1):
                counts[tuple(text[i - k:i])][continuation] += 1
    table = {}
    for context, counter in counts.items():
        by_first = collections.defaultdict(list)
        for continuation, n in counter.items():
            by_first[continuation[0]].append((-n, continuation))
        firsts = sorted(by_first, key=lambda f: (-sum(-n for n, _ in by_first[f]), f))[:branches]
        table[context] = [[max(t, 0) for t in min(by_first[f])[1]] for f in firsts]
    return table


def expected(table, recent, max_ngram, depth, branches):
    for k in range(max_ngram, 0, -1):
        context = tuple(recent[len(recent) - k:])
        if len(context) == k and NO_TOKEN not in context and context in table:
            found = table[context]
            return found + [[0] * depth] * (branches - len(found)), True
    return [[0] * depth] * branches, False


@pytest.mark.parametrize("max_ngram,depth,branches", [(3, 2, 1), (4, 3, 2)])
def test_lookup_drafts_the_most_frequent_continuations(max_ngram, depth, branches):
    corpus = read_corpus([ANSWERS / "shard-00000.jsonl"])[:120]
    store, summary = build_store(corpus, max_ngram=max_ngram, depth=depth, branches=branches, vocab_size=VOCAB)
    table = reference(corpus, max_ngram, depth, branches)
    assert summary["contexts"] == len(table) > 10_000
    # Windows of answers in the store and of answers it never saw, some shorter than max_ngram.
    unseen = read_corpus([ANSWERS / "shard-00001.jsonl"])[:40]
    rng = np.random.default_rng(0)
    recent = []
    for text in corpus[:40] + unseen:
        for end in rng.integers(1, len(text), 8):
            window = text[max(0, end - max_ngram):end]
            recent.append([NO_TOKEN] * (max_ngram - len(window)) + window)
    drafts_bcd, found_b = jax.jit(lookup)(store, jnp.asarray(recent, jnp.int32))
    want = [expected(table, r, max_ngram, depth, branches) for r in recent]
    assert np.asarray(drafts_bcd).tolist() == [w for w, _ in want]
    assert np.asarray(found_b).tolist() == [f for _, f in want]
    assert 0.2 < np.mean([len(r) - r.count(NO_TOKEN) == max_ngram and f for r, (_, f) in zip(recent, want)]) < 1


def test_drafter_finds_the_committed_answers_and_names_bad_corpora(tmp_path, monkeypatch):
    assert recorded_options(None) == {}
    # A model directory whose fingerprint matches the committed answers' config is given their directories.
    fingerprint = json.loads((ANSWERS / "config.json").read_text())["settings"]["base"]
    monkeypatch.setattr("jaxaccel.heads.io.base_fingerprint", lambda model_dir: fingerprint)
    corpus = recorded_options(tmp_path)["corpus"].split(":")
    assert str(ANSWERS) in corpus and not any("t0.8" in c for c in corpus)  # greedy answers only
    monkeypatch.setattr("jaxaccel.heads.io.base_fingerprint", lambda model_dir: {"weights_sha256": "other"})
    assert recorded_options(tmp_path) == {}

    class Base:  # what empty_carry reads of a base
        class config:
            vocab_size = 1000

    with pytest.raises(ValueError, match="needs a corpus"):
        Rest().empty_carry(Base)
    with pytest.raises(FileNotFoundError, match="no answers"):
        Rest(corpus=str(tmp_path)).empty_carry(Base)
    (tmp_path / "shard-00000.jsonl").write_text(json.dumps({"response_ids": [5, 999, 1000]}) + "\n")
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 1000\)"):
        Rest(corpus=str(tmp_path)).empty_carry(Base)
    with pytest.raises(ValueError, match="depth, branches and max_ngram"):
        Rest(corpus=str(tmp_path), depth=0)


def test_specs_join_training_free_drafters():
    assert split_spec("rest:corpus=a,depth=3+pld:depth=2") == ["rest:corpus=a,depth=3", "pld:depth=2"]
    assert split_spec("layerskip:skip=1+2,depth=4+pld") == ["layerskip:skip=1+2,depth=4", "pld"]  # a value's '+'
    assert composes("rest+pld:depth=2") and not composes("rest+recycling")
    drafter = make_drafter("rest:corpus=x,depth=3+pld:depth=2")
    assert drafter.tree.num_nodes == 1 + 3 + 2 and drafter.tree.depth == 3
    with pytest.raises(ValueError, match="only drafters that compose join"):
        make_drafter("pld+recycling")
    with pytest.raises(ValueError, match="lays out its own tree"):
        make_drafter("rest+pld", tree=object())
