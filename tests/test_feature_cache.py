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


def test_prompt_weight_draws_windows_over_prompts_and_weighs_their_loss(tmp_path):
    import jax.numpy as jnp

    from jaxaccel.training.feature_cache import DepthOutputs, depth_targets, loss_and_metrics

    model_dir = build_chat_model(tmp_path / "chat", context=512)
    feats = features_of(tmp_path, model_dir, "greedy", 2)
    features = FeatureSet(feats, base_fingerprint(model_dir), feature_layers(num_layers(model_dir)), HOLDOUT_MOD)
    answers_only = features.batch(0, 0, 16, 32)
    assert np.array_equal(answers_only["weight"], answers_only["answer"].astype(np.float32))
    batches = [features.batch(0, step, 16, 32, prompt_weight=0.25) for step in range(4)]
    weights = np.concatenate([b["weight"].ravel() for b in batches])
    answer = np.concatenate([b["answer"].ravel() for b in batches])
    assert np.all(weights[answer] == 1.0)
    assert np.isin(weights[~answer], [0.0, 0.25]).all()  # 0: past the sequence's end
    # Windows over answers start 32 // 8 = 4 tokens before them; these reach further into prompts.
    prompt_per_window = np.concatenate([(b["weight"] == 0.25).sum(axis=1) for b in batches])
    assert prompt_per_window.max() > 4 and (answers_only["weight"] == 0).sum() > 0

    # The loss is the weighted mean of the entries' KL divergences; top-1 counts answer tokens only.
    rng = np.random.default_rng(3)
    b = batches[0]
    depth, n = 2, 7
    teacher_btn = jnp.asarray(rng.normal(size=b["tokens"].shape + (n,)), jnp.float32)
    target_kbtn, greedy_kbt, mask_kbt, weight_kbt = depth_targets(teacher_btn, b, depth)
    logits_kbtn = jnp.asarray(rng.normal(size=target_kbtn.shape), jnp.float32)
    out = DepthOutputs(logits_kbtn, target_kbtn, greedy_kbt, mask_kbt, weight_kbt)
    _, metrics = loss_and_metrics(out, None, 0.8)
    p = np.exp(np.asarray(target_kbtn) - np.asarray(target_kbtn).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(np.asarray(logits_kbtn) - np.asarray(logits_kbtn).max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    w = np.asarray(weight_kbt)
    for k in range(depth):
        assert np.isclose(float(metrics[f"loss_{k}"]), (kl[k] * w[k]).sum() / w[k].sum(), rtol=1e-4)
        hits = (np.asarray(greedy_kbt[k]) == np.argmax(np.asarray(logits_kbtn[k]), -1)) & np.asarray(mask_kbt[k])
        assert np.isclose(float(metrics[f"top1_{k}"]), hits.sum() / max(np.asarray(mask_kbt[k]).sum(), 1))
