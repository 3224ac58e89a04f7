"""FeatureSet over several feature directories (greedy answers, then sampled answers to the same
prompts): every directory trains, only the first one's held-out prompts are evaluated on, and no
directory trains on a held-out prompt."""

import json

import numpy as np
import pytest
from chat_models import build_chat_model
from drafter_fixtures import write_answers

from jaxaccel.heads.io import base_fingerprint
from jaxaccel.training.feature_cache import FeatureSet
from jaxaccel.training.features import feature_layers
from jaxaccel.training.prompts import is_heldout
from train import features as train_features

HOLDOUT_MOD = 3  # a third of the 24 keys held out, so that both splits are sure to be populated


def num_layers(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


def features_of(tmp_path, model_dir, name, seed):
    answers, feats = tmp_path / f"{name}-answers", tmp_path / name
    write_answers(answers, model_dir, 24, np.random.default_rng(seed))
    assert train_features.main(["--model", str(model_dir), "--responses", str(answers), "--out", str(feats),
                                "--batch-size", "12", "--no-progress"]) == 0
    return feats


def test_several_directories_train_together_and_only_the_first_is_held_out(tmp_path):
    model_dir = build_chat_model(tmp_path / "chat", context=512)
    first, second = features_of(tmp_path, model_dir, "greedy", 0), features_of(tmp_path, model_dir, "sampled", 1)
    args = (base_fingerprint(model_dir), feature_layers(num_layers(model_dir)), HOLDOUT_MOD)
    one, both = FeatureSet(first, *args), FeatureSet([first, second], *args)

    assert [str(p) for p in both.paths] == [str(first / "features-00000"), str(second / "features-00000")]
    assert both.heldout_seqs == one.heldout_seqs  # adding data never moves the held-out set
    assert both.train_seqs[:len(one.train_seqs)] == one.train_seqs
    from_second = both.train_seqs[len(one.train_seqs):]
    assert len(from_second) == len(one.train_seqs) and {i for i, *_ in from_second} == {1}
    keys = both.shards[1]["meta"]["keys"]
    starts = [int(s) for s in both.shards[1]["starts"]]
    trained_keys = {keys[starts.index(start)] for _, start, _, _ in from_second}
    assert not any(is_heldout(k, HOLDOUT_MOD) for k in trained_keys)
    assert any(is_heldout(k, HOLDOUT_MOD) for k in keys)  # there were held-out prompts to skip

    # The second directory's answers count too (the draft vocabulary is counted over them).
    counts = both.answer_counts(both.shards[0]["tokens"].max() + 1000)
    assert counts.sum() > one.answer_counts(len(counts)).sum()

    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureSet([first, tmp_path / "missing"], *args)
