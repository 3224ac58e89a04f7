"""Draft heads on a random tiny base: identity at init, causality, the drafting APIs agree with the
teacher-forced training pass, the heads directory and its base-model fingerprint, config errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxaccel import KVCache, ModelConfig, Transformer, save_hf
from jaxaccel.heads import (HeadParts, HeadsConfig, HeadsMismatchError, load_heads, make_heads, read_heads_config,
                            save_heads)
from jaxaccel.heads.run import check_setup
from jaxaccel.training import optim
from jaxaccel.training.distill import DistillConfig, init_state_fn, make_distill_step
from jaxaccel.training.steps import ModelParts

BASE = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=64)
VARIANTS = {
    "medusa": HeadsConfig(kind="medusa", num_heads=3, num_blocks=2),
    "medusa_shared": HeadsConfig(kind="medusa", num_heads=3, share_lm_head=True),
    "hydra": HeadsConfig(kind="hydra", num_heads=3),
    "hydra_prefix": HeadsConfig(kind="hydra", num_heads=3, prefix_layer=True),
    "eagle": HeadsConfig(kind="eagle", num_heads=3),
}


def new_base(config=BASE, seed=0):
    # Jitted throughout: eager mode compiles every primitive for every shape, which is slower here.
    return nnx.jit(lambda: Transformer(config, rngs=nnx.Rngs(seed)))()


@pytest.fixture(scope="module")
def base():
    return new_base()


def tokens(seed, shape=(2, 12)):
    return np.random.default_rng(seed).integers(0, BASE.vocab_size, shape).astype(np.int32)


@nnx.jit
def forward(base, tokens_bt):
    return base.forward(tokens_bt)


@nnx.jit(static_argnums=3)
def teacher_forced(heads, base, tokens_bt, depth=3):
    """The heads' training pass over tokens_bt."""
    return heads.teacher_forced(base, base.forward(tokens_bt).hidden, tokens_bt, depth)


def initial_heads(config, base):
    parts = HeadParts(config, base.config)
    return parts.merge(nnx.jit(lambda base: parts.init_from_base(base, 0))(base))


def random_heads(config, seed=1):
    """Heads with every parameter random (made on the host: no compilation), so that every input
    they read has an effect."""
    parts = HeadParts(config, BASE)
    rng = np.random.default_rng(seed)
    return parts.merge({name: jnp.asarray(0.3 * rng.standard_normal(var.shape), var.dtype)
                        for name, (_, var) in sorted(parts.templates.items())})


@pytest.mark.parametrize("name", ["medusa", "hydra_prefix"])
def test_residual_heads_start_as_the_base_lm_head(base, name):
    tokens_bt = tokens(0)
    draft = teacher_forced(initial_heads(VARIANTS[name], base), base, tokens_bt)
    assert draft.logits_kbtv.shape == (3, 2, 12, BASE.vocab_size) and draft.logits_kbtv.dtype == jnp.float32
    logits_btv = forward(base, tokens_bt).logits
    np.testing.assert_allclose(draft.logits_kbtv, np.broadcast_to(logits_btv, draft.logits_kbtv.shape), atol=1e-5)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_later_token_never_changes_earlier_drafts(base, name):
    """Row t of depth k reads tokens up to t + k + 1 (medusa: up to t); changing token j must
    leave rows t <= j - k - 2 unchanged, and change some later row."""
    heads = random_heads(VARIANTS[name])
    a = tokens(1)
    j = 8
    b = a.copy()
    b[:, j] = (a[:, j] + 1) % BASE.vocab_size
    draft = teacher_forced(heads, base, np.concatenate([a, b])).logits_kbtv
    draft_a, draft_b = draft[:, :2], draft[:, 2:]
    for k in range(3):
        np.testing.assert_allclose(draft_a[k, :, :j - k - 1], draft_b[k, :, :j - k - 1], atol=1e-5, rtol=0)
        assert np.abs(draft_a[k, :, j - k - 1:] - draft_b[k, :, j - k - 1:]).max() > 1e-4


def test_medusa_call_is_its_teacher_forced_pass(base):
    heads = random_heads(VARIANTS["medusa"])
    hidden_bd = forward(base, tokens(2)).hidden[:, 5]
    logits_kbv = nnx.jit(lambda heads, base, h: heads(base, h))(heads, base, hidden_bd)
    np.testing.assert_allclose(logits_kbv, teacher_forced(heads, base, tokens(2)).logits_kbtv[:, :, 5], atol=1e-5)


@nnx.jit
def hydra_chain(heads, base, hidden_btd, path_bt, lengths_b):
    """Drafting as the speculative loop would (jitted, static shapes): the prefix layer over a ragged
    prefill through its cache, then head k on the state at each row's last position and the k + 1
    path tokens after it."""
    h_btd, cache = heads.prefix(hidden_btd, cache=heads.init_cache(2, 16))
    cache = cache.advance(lengths_b)
    rows = jnp.arange(2)
    h_bd = h_btd[rows, lengths_b - 1]
    logits = [heads.head(base, k, h_bd, jnp.stack([path_bt[rows, lengths_b + i] for i in range(k + 1)], axis=1))
              for k in range(3)]
    return jnp.stack(logits), cache.lengths


def test_hydra_drafting_api_matches_teacher_forced(base):
    heads = random_heads(VARIANTS["hydra_prefix"])
    path_bt = tokens(3)
    lengths_b = np.array([5, 8], np.int32)
    hidden_btd = forward(base, path_bt).hidden
    logits_kbv, cache_lengths = hydra_chain(heads, base, hidden_btd[:, :8], path_bt, lengths_b)
    assert list(cache_lengths) == [5, 8]
    expected = teacher_forced(heads, base, path_bt).logits_kbtv[:, np.arange(2), lengths_b - 1]
    np.testing.assert_allclose(logits_kbv, expected, atol=1e-4)
    with pytest.raises(ValueError, match="hydra head 1 takes 2 tokens"):
        heads.head(base, 1, hidden_btd[:, 0], path_bt[:, :1])


@nnx.jit
def eagle_chain(drafter, base, hidden_btd, path_bt, lengths_b):
    """Drafting as the speculative loop would: prefill the drafter's cache with a ragged batch of real
    features (entry i: feature i, token i + 1), then a chain of 2 more entries on its own features,
    each committed as the next one's context."""
    rows = jnp.arange(2)
    out = drafter.forward(base, hidden_btd, path_bt[:, 1:hidden_btd.shape[1] + 1], cache=drafter.init_cache(2, 16))
    cache = out.cache.advance(lengths_b)
    feature_bd, logits_bv = out.features[rows, lengths_b - 1], out.logits[rows, lengths_b - 1]
    features, logits = [feature_bd], [logits_bv]
    for k in range(2):
        out = drafter.forward(base, feature_bd[:, None], path_bt[rows, lengths_b + k + 1][:, None], cache=cache)
        cache = out.cache.advance(jnp.ones(2, jnp.int32))
        feature_bd, logits_bv = out.features[:, 0], out.logits[:, 0]
        features.append(feature_bd)
        logits.append(logits_bv)
    return jnp.stack(features), jnp.stack(logits)


def test_eagle_cached_chain_matches_unrolled_training_pass(base):
    """The cached chain equals the training pass unrolled 3 steps (EAGLE-3's training-time test)."""
    drafter = random_heads(VARIANTS["eagle"])
    path_bt = tokens(4)
    lengths_b = np.array([4, 7], np.int32)
    features_kbd, logits_kbv = eagle_chain(drafter, base, forward(base, path_bt).hidden[:, :7], path_bt, lengths_b)
    expected = teacher_forced(drafter, base, path_bt)
    rows, last = np.arange(2), lengths_b - 1
    np.testing.assert_allclose(logits_kbv, expected.logits_kbtv[:, rows, last], atol=1e-4)
    np.testing.assert_allclose(features_kbd, expected.features_kbtd[:, rows, last], atol=1e-4)


def test_distill_step_trains_only_the_heads(base):
    """The optimizer state holds the heads' parameters only (Adam: two moments each); a few steps on
    one batch lower the loss (here: cross-entropy with the text; the CLI tests train with kl)."""
    config = DistillConfig(steps=6, lr=1e-2, warmup_steps=0, loss="ce")
    base_parts, head_parts = ModelParts.transformer(BASE), HeadParts(HeadsConfig(kind="medusa", num_heads=2), BASE)
    base_params = base_parts.params(base)
    schedule = optim.lr_schedule(config.lr, config.steps, 0)
    optimizer = optim.make_optimizer(schedule, weight_decay=0.0)
    state = init_state_fn(base_parts, head_parts, optimizer, seed=0)(base_params)
    assert set(state["params"]) == set(head_parts.templates)
    head_size = sum(p.size for p in state["params"].values())
    assert sum(x.size for x in jax.tree.leaves(state["opt"]) if x.ndim) == 2 * head_size

    step = make_distill_step(base_parts, head_parts, optimizer, schedule, config)
    batch_bt1 = tokens(5, (4, 17))
    history = []
    for _ in range(config.steps):
        state, metrics = step(state, base_params, batch_bt1)
        history.append(float(metrics["loss"]))
    assert history[-1] < history[0] - 0.1, history
    assert set(metrics) == {"loss", "loss_1", "loss_2", "top1_1", "top1_2", "grad_norm", "lr"}


def test_heads_directory_roundtrip_and_base_fingerprint(base, tmp_path):
    base_dir = save_hf(base, tmp_path / "base")
    heads = random_heads(VARIANTS["hydra_prefix"])
    save_heads(heads, tmp_path / "heads", base_dir)
    config, record = read_heads_config(tmp_path / "heads")
    assert config == VARIANTS["hydra_prefix"] and record["base"]["config"]["hidden_size"] == 32
    loaded = load_heads(tmp_path / "heads", base_dir)
    parts = HeadParts(config, BASE)
    for name, value in parts.params(heads).items():
        np.testing.assert_array_equal(parts.params(loaded)[name], value)

    other = nnx.clone(base)
    other.norm.scale[...] = 2 * other.norm.scale[...]
    other_weights = save_hf(other, tmp_path / "other_weights")
    with pytest.raises(HeadsMismatchError, match="distilled from another base model.*different weights"):
        load_heads(tmp_path / "heads", other_weights)
    other_config = shutil.copytree(base_dir, tmp_path / "other_config")
    hf_config = json.loads((other_config / "config.json").read_text())
    (other_config / "config.json").write_text(json.dumps({**hf_config, "rms_norm_eps": 1e-5}))
    with pytest.raises(HeadsMismatchError, match=r"config.json differs \(rms_norm_eps: 1e-06 vs 1e-05\)"):
        load_heads(tmp_path / "heads", other_config)
    with pytest.raises(HeadsMismatchError, match="not a heads directory"):
        load_heads(tmp_path / "base", base_dir)


@pytest.mark.parametrize("fields, message", [
    (dict(kind="lookahead"), "unknown heads kind 'lookahead'; expected one of ['eagle', 'eagle3', 'hydra', 'medusa']"),
    (dict(num_heads=0), "num_heads must be >= 1"),
    (dict(kind="medusa", prefix_layer=True), "prefix_layer is a hydra option"),
    (dict(kind="eagle", share_lm_head=True), "share_lm_head is a medusa / hydra option, not one of 'eagle'"),
])
def test_heads_config_errors(fields, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        HeadsConfig(**fields)


def test_more_heads_than_the_context_allows():
    with pytest.raises(ValueError, match="63 draft heads need sequences of at least 65 tokens"):
        check_setup(HeadsConfig(num_heads=63), DistillConfig(seq_len=64), context=64)
    with pytest.raises(ValueError, match=r"seq_len \(128\) exceeds the base model's context \(64"):
        check_setup(HeadsConfig(), DistillConfig(seq_len=128), context=64)
    check_setup(HeadsConfig(num_heads=62), DistillConfig(seq_len=64), context=64)


def test_make_heads_registry():
    for config in VARIANTS.values():
        heads = nnx.eval_shape(lambda: make_heads(config, BASE, rngs=nnx.Rngs(0)))
        assert type(heads).__name__.lower().startswith(config.kind)
    assert isinstance(make_heads(VARIANTS["eagle"], BASE, rngs=nnx.Rngs(0)).init_cache(2, 8), KVCache)
