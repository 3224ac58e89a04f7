"""What the draft-head tests share (test_eagle3, test_hydra_features, test_layerskip): a random
base whose greedy text loops, its greedy answers as a feature-cache batch, a brief training of a
head with a feature-cache loss, the chi-square test of two samplers' laws, and a feature cache
written by train.features for the trainers' end-to-end tests."""

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from chat_models import build_chat_model
from flax import nnx
from scipy import stats

from jaxaccel import Transformer
from jaxaccel.decoding import AutoregressiveDecoder
from jaxaccel.draft_vocab import draft_vocab
from jaxaccel.heads.io import base_fingerprint
from train import features as train_features


def looping_model(config):
    """Random layers scaled up so that greedy text loops (as test_drafters' base)."""
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, state))


def random_prompts(vocab_size: int) -> list[list[int]]:
    """Five random prompts of 5, 11, 3, 8 and 1 tokens."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, n).tolist() for n in (5, 11, 3, 8, 1)]


def greedy_answers(base, draft_vocab_size: int):
    """The base's own greedy answers (36 tokens) after 16 random 4-token prompts: tokens [16, 40],
    the answer mask [16, 40] (a feature-cache batch's `answer`), and the draft vocabulary (d2t) of
    the `draft_vocab_size` tokens most written in the answers."""
    vocab_size = base.config.vocab_size
    starts = np.random.default_rng(1).integers(0, vocab_size, (16, 4)).tolist()
    text = np.asarray(AutoregressiveDecoder(base).generate(starts, max_new_tokens=36).tokens_bn)
    tokens_bt = jnp.asarray(np.concatenate([np.asarray(starts), text], axis=1), jnp.int32)
    d2t = draft_vocab(np.bincount(np.asarray(tokens_bt[:, 4:]).ravel(), minlength=vocab_size), draft_vocab_size)
    return tokens_bt, jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]) >= 4, tokens_bt.shape), d2t


def briefly_trained(heads, loss_fn, steps: int):
    """`heads` after `steps` Adam updates (lr 1e-2) of loss_fn(heads) -> (loss, metrics) (a
    feature-cache loss over 3 draft steps), checked to work: the loss at least halves and the
    deepest step's top-1 rises by over 0.2."""
    graphdef, params, rest = nnx.split(heads, nnx.Param, ...)
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        (_, metrics), grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest)), has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, metrics

    opt_state, first = opt.init(params), None
    for _ in range(steps):
        params, opt_state, metrics = step(params, opt_state)
        first = first or metrics
    assert metrics["loss"] < 0.5 * first["loss"] and metrics["top1_2"] > first["top1_2"] + 0.2, (first, metrics)
    return nnx.merge(graphdef, params, rest)


def same_law_pvalue(a_result, b_result, k: int) -> float:
    """Chi-square p-value that two batches' first k tokens follow one joint law (rare sequences pooled)."""
    a = collections.Counter(tuple(s[:k]) for s in a_result.sequences())
    b = collections.Counter(tuple(s[:k]) for s in b_result.sequences())
    rows_a, rows_b = sum(a.values()), sum(b.values())
    common = [t for t in a if a[t] + b[t] >= 20]
    table = np.array([[a[t] for t in common] + [rows_a - sum(a[t] for t in common)],
                      [b[t] for t in common] + [rows_b - sum(b[t] for t in common)]])
    assert table.shape[1] > 5, table
    return stats.chi2_contingency(table).pvalue


def write_answers(directory, model_dir, rows, rng):
    """train.responses' layout, written directly: random prompts and answers (the trainer only
    needs their features, and no base runs to make them)."""
    directory.mkdir()
    lines = [json.dumps({"key": f"k{i}", "prompt_ids": rng.integers(0, 600, rng.integers(3, 12)).tolist(),
                         "response_ids": rng.integers(0, 90, rng.integers(8, 40)).tolist()}) for i in range(rows)]
    (directory / "shard-00000.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "config.json").write_text(json.dumps({"settings": {"base": base_fingerprint(model_dir)}}))


def cached_features(tmp_path):
    """A tiny chat model (tmp_path/chat), train.features run over 24 random answers of it
    (tmp_path/features), and the heads directory a trainer is to write (tmp_path/heads)."""
    model_dir = build_chat_model(tmp_path / "chat", context=512)
    answers, feats = tmp_path / "responses", tmp_path / "features"
    write_answers(answers, model_dir, 24, np.random.default_rng(0))
    assert train_features.main(["--model", str(model_dir), "--responses", str(answers), "--out", str(feats),
                                "--batch-size", "12", "--no-progress"]) == 0
    return model_dir, feats, tmp_path / "heads"
