"""The trimmed draft vocabulary: the most frequent answer tokens, their coverage, and the map back."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.draft_vocab import answer_token_counts, coverage, draft_vocab, to_target_logits


def write_answers(directory, answers):
    directory.mkdir()
    lines = "".join(json.dumps({"key": str(i), "prompt_ids": [7, 7, 7], "response_ids": a}) + "\n"
                    for i, a in enumerate(answers))
    (directory / "shard-00000.jsonl").write_text(lines)


def test_the_draft_vocabulary_is_the_most_written_answer_tokens(tmp_path):
    write_answers(tmp_path / "r", [[5, 3, 5, 9], [5, 3, 1]])
    counts = answer_token_counts(tmp_path / "r", 12)
    assert counts[5] == 3 and counts[3] == 2 and counts[7] == 0  # prompts are not counted
    np.testing.assert_array_equal(draft_vocab(counts, 4), [5, 3, 1, 9])  # ties: lower id first
    assert coverage(counts, [1, 2, 4, 12]) == {1: 3 / 7, 2: 5 / 7, 4: 1.0, 12: 1.0}
    with pytest.raises(ValueError, match="1..12"):
        draft_vocab(counts, 13)
    write_answers(tmp_path / "bad", [[3, 99]])
    with pytest.raises(ValueError, match="outside a vocabulary of 12"):
        answer_token_counts(tmp_path / "bad", 12)


def test_draft_logits_map_back_to_target_ids_and_never_propose_outside(tmp_path):
    rng = np.random.default_rng(0)
    d2t = jnp.asarray(rng.permutation(50)[:8], jnp.int32)
    draft = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
    full = to_target_logits(draft, d2t, 50)
    np.testing.assert_array_equal(jnp.argmax(full, -1), d2t[jnp.argmax(draft, -1)])
    outside = np.setdiff1d(np.arange(50), np.asarray(d2t))
    assert np.all(np.isneginf(np.asarray(full)[:, outside]))
