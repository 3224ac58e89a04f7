"""EAGLE-3 heads (fused low/middle/high features, trimmed draft vocabulary): greedy-identical at
T = 0, the base's law at T = 1, drafts only from the draft vocabulary, cached features equal to
the loop's captured ones, and train.eagle3 on cached features end to end."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from chat_models import build_chat_model
from drafter_fixtures import (briefly_trained, cached_features, greedy_answers, looping_model, random_prompts,
                              same_law_pvalue)
from flax import nnx

from jaxaccel import ModelConfig
from jaxaccel.decoding import AutoregressiveDecoder, Sampler
from jaxaccel.decoding.speculative import SpeculativeDecoder
from jaxaccel.decoding.tune import draft_ranks
from jaxaccel.decoding.tree import DynamicTree, Tree
from jaxaccel.drafters import Prefill, make_drafter
from jaxaccel.drafters.eagle3 import Eagle3Drafter
from jaxaccel.heads import HeadsConfig
from jaxaccel.heads.common import base_lm_kernel
from jaxaccel.heads.eagle3 import Eagle3Heads
from jaxaccel.heads.io import load_heads
from jaxaccel.training.eagle3 import loss_and_metrics
from jaxaccel.training.features import feature_layers, layer_features
from train import eagle3 as train_eagle3

CONFIG = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=128)
STOP = 7
DRAFT_VOCAB = 24


@pytest.fixture(scope="module")
def base():
    """A random model scaled up so that greedy text loops (as in test_drafters)."""
    return looping_model(CONFIG)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(CONFIG.vocab_size)


@pytest.fixture(scope="module")
def heads(base):
    """A head over the base's 24 most written tokens, briefly trained on the base's own greedy text
    with the feature-cache loss (so that drafts get accepted and the loss is seen to work)."""
    tokens_bt, answer_bt, d2t = greedy_answers(base, DRAFT_VOCAB)
    layers_btkd, hidden_btd = layer_features(base, tokens_bt, feature_layers(CONFIG.num_layers))
    batch = {"tokens": tokens_bt, "layers": layers_btkd, "hidden": hidden_btd, "answer": answer_bt}
    module = Eagle3Heads(HeadsConfig(kind="eagle3", num_heads=3, draft_vocab_size=DRAFT_VOCAB), CONFIG, rngs=nnx.Rngs(0))
    module.init_from_base(base, d2t)
    embed_vd, rows_dn = base.embed_tokens.embedding[...], base_lm_kernel(base)[:, d2t]
    return briefly_trained(module, lambda h: loss_and_metrics(h, embed_vd, rows_dn, batch, 3, 0.8), steps=80)


@pytest.mark.parametrize("tree", [None, DynamicTree(topk=2, depth=3, num_nodes=6)])
def test_eagle3_equals_greedy(base, prompts, heads, tree):
    want = AutoregressiveDecoder(base).generate(prompts, max_new_tokens=30, stop_tokens=[STOP])
    got = SpeculativeDecoder(base, make_drafter(heads=heads, tree=tree)).generate(prompts, max_new_tokens=30,
                                                                                 stop_tokens=[STOP])
    assert got.sequences() == want.sequences()
    assert got.mean_accepted_tokens() > 1.15, got.num_steps_b  # drafts were accepted: commit was exercised


def test_drafts_come_from_the_draft_vocabulary(base, prompts, heads):
    drafter = dataclasses.replace(make_drafter(heads=heads), module=None)
    assert drafter.capture == feature_layers(CONFIG.num_layers)
    tokens_bs = jnp.asarray([p + [0] * (11 - len(p)) for p in prompts], jnp.int32)
    lengths_b = jnp.asarray([len(p) for p in prompts], jnp.int32)

    @nnx.jit
    def prefill_and_draft(base, heads, tokens_bs, lengths_b):
        out = base.forward(tokens_bs, capture=drafter.capture)
        first_b = jnp.argmax(out.logits[jnp.arange(5), lengths_b - 1], axis=-1).astype(jnp.int32)
        state = drafter.start(base, heads, Prefill(hidden_bsd=out.hidden, tokens_bs=tokens_bs, lengths_b=lengths_b,
                                                   first_b=first_b, cache_len=64, captured_bskd=out.captured))
        return out.captured, drafter.draft(base, heads, state, first_b, None).tokens_bn

    captured_bskd, draft_bn = prefill_and_draft(base, heads, tokens_bs, lengths_b)
    assert np.isin(np.asarray(draft_bn[:, 1:]), np.asarray(heads.d2t[...])).all()
    # The captured states the loop hands over are the cached features' computation.
    layers_btkd, _ = layer_features(base, tokens_bs, drafter.capture)
    np.testing.assert_allclose(captured_bskd, layers_btkd, atol=1e-5)


def test_tree_tuning_ranks_are_the_drafters_own(base, prompts, heads):
    """draft_ranks (what --tune-tree measures) for an EAGLE-3 head: along the greedy text, the
    drafter's chain from each position proposes the true next tokens exactly where their rank is 0."""
    text = AutoregressiveDecoder(base).generate([prompts[1]], max_new_tokens=24).sequences()[0]
    tokens = np.asarray(prompts[1] + text, np.int32)
    width, depth = len(tokens), 3
    ranks = draft_ranks(base, heads, tokens[None], np.array([len(prompts[1])]), np.array([width]), depth, max_rank=8)
    lengths = np.arange(len(prompts[1]), width - depth)  # a step after each prefix tokens[:L]
    assert len(ranks) == len(lengths)
    drafter = dataclasses.replace(make_drafter(heads=heads, tree=Tree(((0,), (0, 0), (0, 0, 0)))), module=None)

    @nnx.jit
    def chains(base, heads, tokens_bs, lengths_b):
        out = base.forward(tokens_bs, capture=drafter.capture)
        root_b = tokens_bs[jnp.arange(tokens_bs.shape[0]), lengths_b]  # the base's greedy token after each prefix
        state = drafter.start(base, heads, Prefill(hidden_bsd=out.hidden, tokens_bs=tokens_bs, lengths_b=lengths_b,
                                                   first_b=root_b, cache_len=64, captured_bskd=out.captured))
        return drafter.draft(base, heads, state, root_b, None).tokens_bn

    draft_bn = np.asarray(chains(base, heads, jnp.asarray(np.tile(tokens, (len(lengths), 1))), jnp.asarray(lengths, jnp.int32)))
    for row, length in enumerate(lengths):
        for k in range(depth):  # node k + 1 drafts the token at length + k + 1, given the chain before it is right
            assert (draft_bn[row, k + 1] == tokens[length + k + 1]) == (ranks[row, k] == 0), (row, k)
            if ranks[row, k] != 0:
                break
    assert (ranks[:, 0] == 0).mean() > 0.3  # the trained head is right often enough for the deeper checks to run


class PointDrafts(Eagle3Drafter):
    """The same drafter without the sampling capability: top-ranked drafts at any temperature."""
    sample_draft = None


def test_sampling_follows_the_base_distribution(base, prompts, heads):
    """Two-sample test at T = 1 (top-4 filtering, as in test_drafters): the first 4 tokens of
    speculative and autoregressive sampling have the same joint law, trimmed vocabulary included,
    with drafts sampled from the head (the q-aware rule) and with its top-ranked drafts; sampled
    drafts are accepted more often."""
    policy, rows, k = Sampler(temperature=1.0, top_k=4), 3000, 4
    batch = [prompts[1]] * rows
    ar = AutoregressiveDecoder(base).generate(batch, policy=policy, max_new_tokens=k, seed=1)
    sampled_drafter = make_drafter(heads=heads, tree=Tree(((0,), (1,), (0, 0))))
    point_drafter = PointDrafts(tree=sampled_drafter.tree, module=heads, capture=sampled_drafter.capture)
    accepted = {}
    for name, drafter in (("sampled", sampled_drafter), ("point", point_drafter)):
        spec = SpeculativeDecoder(base, drafter).generate(batch, policy=policy, max_new_tokens=k, seed=2)
        accepted[name] = spec.mean_accepted_tokens()
        assert same_law_pvalue(ar, spec, k) > 1e-3, name
    assert accepted["point"] > 1.05 and accepted["sampled"] > accepted["point"] + 0.05, accepted


def test_train_eagle3_on_cached_features(tmp_path, capsys):
    model_dir, feats, out = cached_features(tmp_path)
    argv = ["--model", str(model_dir), "--features", str(feats), "--out", str(out), "--draft-vocab", "40",
            "--depth", "2", "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "2", "--holdout-mod", "4",
            "--checkpoint-every", "2", "--eval-vocab", "20", "--no-progress"]
    assert train_eagle3.main(argv + ["--steps", "2"]) == 0
    assert train_eagle3.main(argv + ["--steps", "4", "--export-vocab", "30"]) == 0  # resumes at step 2
    assert "resuming from step 2" in capsys.readouterr().err
    record = json.loads((out / "eval.json").read_text())
    assert record["step"] == 4 and [d["depth"] for d in record["depths"]] == [0, 1] and record["draft_vocab_size"] == 30
    assert record["draft_vocab"]["coverage_train"] > 0.4  # the 40 most written of 90 answer tokens
    assert [r["draft_vocab_size"] for r in record["by_draft_vocab"]] == [20]
    heads = load_heads(out, model_dir)
    assert heads.draft_vocab_size == 30 and heads.d2t[...].dtype == jnp.int32  # the 30 most frequent of 40
    np.testing.assert_array_equal(heads.d2t[...], np.load(out / "draft_vocab.npy")[:30])

    other = build_chat_model(tmp_path / "other", context=512, seed=5)
    capsys.readouterr()
    for features_dir, model, message in [(feats, other, "another base model"), (tmp_path / "none", model_dir, "does not exist")]:
        assert train_eagle3.main(["--model", str(model), "--features", str(features_dir), "--out", str(tmp_path / "x"),
                                  "--draft-vocab", "40"]) == 2
        assert message in capsys.readouterr().err


def test_decode_layout_gives_the_heads_panels_and_the_same_drafts():
    # Drafting multiplies a few rows by the head's fuse, combine, draft-layer and LM-head kernels:
    # where the CPU kernel runs, the decoder's copy of the head reads panel-packed copies of them all
    # (no Params, the head itself untouched), with the same results on fresh inputs.
    from jaxaccel.cpu_kernels.panel_matmul import available
    from jaxaccel.model import DecodeCopy, decode_layout

    if not available():
        pytest.skip("the panel kernel does not run on this machine")
    module = Eagle3Heads(HeadsConfig(kind="eagle3", num_heads=3, draft_vocab_size=32), CONFIG, rngs=nnx.Rngs(5))
    fast = decode_layout(module)
    assert all(isinstance(getattr(fast, name), DecodeCopy) for name in Eagle3Heads.PANEL_COPIES.values())
    assert isinstance(fast.layer.mlp.down_proj.panels, DecodeCopy) and module.lm_panels is None
    assert len(nnx.to_flat_state(nnx.state(fast, nnx.Param))) == len(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    rng = np.random.default_rng(2)
    captured = jnp.asarray(rng.standard_normal((1, 5, 3, CONFIG.hidden_size)).astype(np.float32))
    embeds = jnp.asarray(rng.standard_normal((1, 5, CONFIG.hidden_size)).astype(np.float32))
    close = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fast.fuse(captured)), np.asarray(module.fuse(captured)), **close)
    features = module.fuse(captured)
    states_fast, _ = fast.step(features, embeds)
    states, _ = module.step(features, embeds)
    np.testing.assert_allclose(np.asarray(states_fast), np.asarray(states), **close)
    np.testing.assert_allclose(np.asarray(fast.draft_logits(states)), np.asarray(module.draft_logits(states)), **close)
