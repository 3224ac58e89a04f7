"""Medusa and Hydra(++) heads over a trimmed draft vocabulary, and train.hydra on cached features:
the LM heads start as the base's columns of d2t, greedy-identical output at T = 0, the base's law
at T = 1, drafts only from d2t, the feature-cache loss trains, and the CLI end to end."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from chat_models import build_chat_model
from drafter_fixtures import (briefly_trained, cached_features, greedy_answers, looping_model, random_prompts,
                              same_law_pvalue)
from flax import nnx
from test_drafters import CONFIG, STOP

from jaxaccel.decoding import AutoregressiveDecoder, Sampler
from jaxaccel.decoding.speculative import SpeculativeDecoder
from jaxaccel.decoding.tree import Tree
from jaxaccel.drafters import Prefill, make_drafter
from jaxaccel.heads import HeadParts, HeadsConfig, load_heads, make_heads
from jaxaccel.heads.run import check_setup
from jaxaccel.hf import load_hf
from jaxaccel.training.distill import DistillConfig
from jaxaccel.training.hydra_features import loss_and_metrics
from train import hydra as train_hydra

DRAFT_VOCAB = 24
TRIMMED = {
    "medusa": HeadsConfig(kind="medusa", num_heads=3, draft_vocab_size=DRAFT_VOCAB),
    "medusa_shared": HeadsConfig(kind="medusa", num_heads=3, share_lm_head=True, draft_vocab_size=DRAFT_VOCAB),
    "hydra++": HeadsConfig(kind="hydra", num_heads=3, prefix_layer=True, draft_vocab_size=DRAFT_VOCAB),
}


@pytest.fixture(scope="module")
def base():
    return looping_model(CONFIG)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(CONFIG.vocab_size)


@pytest.fixture(scope="module")
def greedy_batch(base):
    """The base's own greedy answers after random 4-token prompts, as a feature-cache batch
    (tokens, final hidden states, answer mask), and the draft vocabulary of those answers."""
    tokens_bt, answer_bt, d2t = greedy_answers(base, DRAFT_VOCAB)
    hidden_btd = nnx.jit(lambda base, t: base.forward(t).hidden)(base, tokens_bt)
    return {"tokens": tokens_bt, "hidden": hidden_btd, "answer": answer_bt}, d2t


def trimmed_heads(base, name, d2t):
    heads = make_heads(TRIMMED[name], CONFIG, rngs=nnx.Rngs(0))
    heads.init_from_base(base, d2t)
    return heads


@pytest.fixture(scope="module")
def hydra_pp(base, greedy_batch):
    """Hydra++ heads over the 24 most written tokens, briefly trained with the feature-cache loss
    (so that drafts get accepted and the loss is seen to work)."""
    batch, d2t = greedy_batch
    return briefly_trained(trimmed_heads(base, "hydra++", d2t),
                           lambda h: loss_and_metrics(h, base, batch, 3, 0.8), steps=60)


@pytest.mark.parametrize("name", sorted(TRIMMED))
def test_trimmed_heads_start_as_the_base_lm_head_over_the_draft_vocabulary(base, greedy_batch, name):
    batch, d2t = greedy_batch
    heads = trimmed_heads(base, name, d2t)
    assert heads.draft_vocab_size == DRAFT_VOCAB and heads.d2t[...].dtype == jnp.int32
    tokens_bt = batch["tokens"][:2]
    logits_kbtn = nnx.jit(lambda h, b, x, t: h.teacher_forced(b, x, t, 3).logits_kbtv)(
        heads, base, batch["hidden"][:2], tokens_bt)
    want_btn = nnx.jit(lambda b, t: b.forward(t).logits)(base, tokens_bt)[..., d2t]
    np.testing.assert_allclose(logits_kbtn, np.broadcast_to(want_btn, logits_kbtn.shape), atol=1e-5)


def test_full_vocabulary_heads_are_unchanged(base):
    """draft_vocab_size 0 keeps the parameters (and so the checkpoints) of before: no d2t."""
    for kind in ("medusa", "hydra"):
        templates = HeadParts(HeadsConfig(kind=kind, num_heads=2), CONFIG).templates
        assert "d2t" not in templates and templates["heads.lm_kernel"][1].shape == (2, 32, CONFIG.vocab_size)


@pytest.mark.parametrize("name", ["medusa", "hydra++"])
def test_trimmed_heads_equal_greedy_and_draft_only_d2t_tokens(base, prompts, greedy_batch, hydra_pp, name):
    heads = hydra_pp if name == "hydra++" else trimmed_heads(base, name, greedy_batch[1])
    want = AutoregressiveDecoder(base).generate(prompts, max_new_tokens=30, stop_tokens=[STOP])
    got = SpeculativeDecoder(base, make_drafter(heads=heads)).generate(prompts, max_new_tokens=30, stop_tokens=[STOP])
    assert got.sequences() == want.sequences()
    assert got.mean_accepted_tokens() > 1.1, got.num_steps_b  # drafts were accepted: commit was exercised

    drafter = dataclasses.replace(make_drafter(heads=heads), module=None)
    tokens_bs = jnp.asarray([p + [0] * (11 - len(p)) for p in prompts], jnp.int32)
    lengths_b = jnp.asarray([len(p) for p in prompts], jnp.int32)

    @nnx.jit
    def prefill_and_draft(base, heads, tokens_bs, lengths_b):
        out = base.forward(tokens_bs)
        first_b = jnp.argmax(out.logits[jnp.arange(5), lengths_b - 1], axis=-1).astype(jnp.int32)
        state = drafter.start(base, heads, Prefill(hidden_bsd=out.hidden, tokens_bs=tokens_bs, lengths_b=lengths_b,
                                                   first_b=first_b, cache_len=64))
        return drafter.draft(base, heads, state, first_b, None).tokens_bn

    draft_bn = np.asarray(prefill_and_draft(base, heads, tokens_bs, lengths_b))
    assert np.isin(draft_bn[:, 1:], np.asarray(heads.d2t[...])).all()


def test_trimmed_hydra_sampling_follows_the_base_distribution(base, prompts, hydra_pp):
    """Two-sample test at T = 1 (top-4 filtering, as in test_drafters): the first 4 tokens of
    speculative and autoregressive sampling have the same joint law, trimmed vocabulary included."""
    policy, rows, k = Sampler(temperature=1.0, top_k=4), 3000, 4
    batch = [prompts[1]] * rows
    ar = AutoregressiveDecoder(base).generate(batch, policy=policy, max_new_tokens=k, seed=1)
    spec = SpeculativeDecoder(base, make_drafter(heads=hydra_pp, tree=Tree(((0,), (1,), (0, 0))))).generate(
        batch, policy=policy, max_new_tokens=k, seed=2)
    assert spec.mean_accepted_tokens() > 1.05, spec.mean_accepted_tokens()
    assert same_law_pvalue(ar, spec, k) > 1e-3


def test_trimmed_vocabulary_errors(base):
    with pytest.raises(ValueError, match="draft vocabulary of 51 tokens is larger than the base model's vocabulary"):
        make_heads(HeadsConfig(kind="hydra", draft_vocab_size=51), CONFIG, rngs=nnx.Rngs(0))
    heads = make_heads(TRIMMED["medusa"], CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="outside a vocabulary of 50"):
        heads.init_from_base(base, np.arange(27, 51))
    with pytest.raises(ValueError, match="repeats a token id"):
        heads.init_from_base(base, np.zeros(DRAFT_VOCAB, np.int32))
    with pytest.raises(ValueError, match="no d2t to set"):
        make_heads(HeadsConfig(kind="medusa"), CONFIG, rngs=nnx.Rngs(0)).init_from_base(base, np.arange(24))
    with pytest.raises(ValueError, match="python -m train.hydra"):
        check_setup(TRIMMED["hydra++"], DistillConfig(seq_len=32), context=64)
    with pytest.raises(ValueError, match="draft_vocab_size is a medusa / hydra / eagle3 option, not one of 'eagle'"):
        HeadsConfig(kind="eagle", draft_vocab_size=8)


def test_train_hydra_on_cached_features(tmp_path, capsys):
    model_dir, feats, out = cached_features(tmp_path)
    argv = ["--model", str(model_dir), "--features", str(feats), "--out", str(out), "--draft-vocab", "40",
            "--heads", "2", "--prefix-layer", "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "2",
            "--holdout-mod", "4", "--checkpoint-every", "2", "--no-progress"]
    assert train_hydra.main(argv + ["--steps", "2", "--no-eval"]) == 0
    assert train_hydra.main(argv + ["--steps", "4"]) == 0  # resumes at step 2
    assert "resuming from step 2" in capsys.readouterr().err
    record = json.loads((out / "eval.json").read_text())
    assert record["step"] == 4 and record["kind"] == "hydra" and record["prefix_layer"]
    assert [d["depth"] for d in record["depths"]] == [0, 1] and record["draft_vocab_size"] == 40
    assert record["draft_vocab"]["coverage_train"] > 0.4 and record["mean_accepted_chain"] >= 1.0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 4

    heads = load_heads(out, model_dir)
    assert heads.config == HeadsConfig(kind="hydra", num_heads=2, prefix_layer=True, draft_vocab_size=40)
    np.testing.assert_array_equal(heads.d2t[...], np.load(out / "draft_vocab.npy"))
    base = load_hf(model_dir)
    prompts = [[5, 17, 33, 2], [40, 8]]
    want = AutoregressiveDecoder(base).generate(prompts, max_new_tokens=6)
    got = SpeculativeDecoder(base, make_drafter(heads=heads, tree=Tree.chain(2))).generate(prompts, max_new_tokens=6)
    assert got.sequences() == want.sequences()

    other = build_chat_model(tmp_path / "other", context=512, seed=5)
    capsys.readouterr()
    for model, extra, message in [(other, [], "another base model"),
                                  (model_dir, ["--draft-vocab", "100000"], "--draft-vocab must be in 0..")]:
        assert train_hydra.main(["--model", str(model), "--features", str(feats), "--out", str(tmp_path / "x"),
                                 "--draft-vocab", "40", *extra]) == 2
        assert message in capsys.readouterr().err
