"""Attention kinds through the programs: `train.pretrain --attention KIND` and model directories."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxaccel import ModelConfig, Transformer
from jaxaccel.config import AttentionSpec
from jaxaccel.hf import load_hf, save_hf
from train import pretrain as cli

RUN_ARGS = ["--preset", "tiny", "--steps", "3", "--eval-every", "3", "--eval-windows", "2", "--test-windows", "2",
            "--batch-size", "8", "--seq-len", "32", "--checkpoint-every", "3", "--no-progress"]


@pytest.mark.parametrize("kinds", ["duo", "block_sparse,linear"])
def test_pretrain_each_kind_trains_and_exports(tmp_path, kinds):
    out = tmp_path / "run"
    assert cli.main(RUN_ARGS + ["--out", str(out), "--attention", kinds, "--attention-set", "sparsity=0.5"]) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["jaxaccel_attention"]["kinds"] == kinds.split(",")
    model = load_hf(out / "model")
    assert [model.config.layer_kind(i) for i in range(model.config.num_layers)] == (kinds.split(",") * 2)[:2]
    assert model.config.num_params() == sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_bad_attention_flags_fail(tmp_path):
    with pytest.raises(SystemExit):
        cli.parse_args(["--out", "x", "--attention"])
    args = cli.parse_args(["--out", str(tmp_path), "--attention", "duo", "--attention-set", "sparsity=2"])
    with pytest.raises(ValueError, match="sparsity must be in"):
        cli.attention_overrides(args, ModelConfig(max_position_embeddings=128))


def test_hybrid_model_directory_round_trips(tmp_path):
    spec = AttentionSpec(kinds=("duo", "linear"), retrieval_heads=((True, False), (False, True)), sink_size=2,
                         recent_size=8, chunk_size=4)
    config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=64, attention=spec)
    model = Transformer(config, rngs=nnx.Rngs(0))
    save_hf(model, tmp_path / "m")
    loaded = load_hf(tmp_path / "m")
    assert loaded.config.attention == spec
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (1, 20)))
    np.testing.assert_allclose(loaded(tokens), model(tokens), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# train.retrieval_heads


@pytest.fixture(scope="module")
def tiny_full_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_full") / "run"
    assert cli.main(RUN_ARGS + ["--out", str(out)]) == 0
    return out / "model"


def test_retrieval_heads_writes_a_duo_model(tiny_full_model, tmp_path):
    from train import retrieval_heads

    out = tmp_path / "duo"
    assert retrieval_heads.main(["--base", str(tiny_full_model), "--out", str(out), "--steps", "4", "--sparsity",
                                 "0.5", "--batch-size", "2", "--seq-len", "96", "--sink-size", "4",
                                 "--recent-size", "16", "--filler-bytes", "200000", "--l1", "1.0"]) == 0
    gates = json.loads((out / "gates.json").read_text())
    g = np.asarray(gates["gates"])
    assert g.shape == (2, 2) and (g >= 0).all() and (g <= 1).all() and g.mean() < 1  # the L1 pulled them down
    assert len(gates["history"]) == 4 and gates["history"][0]["distill"] < 1e-6  # gates start at 1: the base
    duo, base = load_hf(out), load_hf(tiny_full_model)
    assert duo.config.layer_kind(0) == "duo" and duo.config.attention.recent_size == 16
    assert sum(not r for row in duo.config.attention.retrieval_heads for r in row) == 2
    expected = np.argsort(g.ravel(), kind="stable")[:2]
    assert sorted(np.flatnonzero(~np.asarray(duo.config.attention.retrieval_heads).ravel())) == sorted(expected)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 500, (1, 18)))
    np.testing.assert_allclose(duo(tokens), base(tokens), atol=1e-5)  # 18 tokens: inside sink + recent

    # The long-context benchmark runs end to end on it (past the trained context: RoPE interpolation).
    from infer import long_context_bench

    report = tmp_path / "long_context.json"
    assert long_context_bench.main(["--model", str(tiny_full_model), "--duo-model", str(out), "--contexts", "512",
                                    "--kinds", "full", "duo", "block_sparse", "--passkeys", "1", "--loss-windows", "1",
                                    "--max-new-tokens", "4", "--repeats", "1", "--out", str(report)]) == 0
    rows = {r["kind"]: r for r in json.loads(report.read_text())["rows"]}
    assert set(rows) == {"full", "duo", "block_sparse"}
    assert rows["duo"]["kv_bytes"] < rows["full"]["kv_bytes"] < rows["block_sparse"]["kv_bytes"]
    assert all(np.isfinite(r["test_loss"]) and r["ar"]["tokens_per_s"] > 0 for r in rows.values())


def test_retrieval_heads_rejects_bad_sparsity(tiny_full_model, tmp_path, capsys):
    from train import retrieval_heads

    assert retrieval_heads.main(["--base", str(tiny_full_model), "--out", str(tmp_path / "x"),
                                 "--sparsity", "1.5"]) == 2
    assert "sparsity must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_passkey_batch_holds_needle_question_and_answer(tiny_full_model):
    from jaxaccel.data import load_tokenizer
    from jaxaccel.passkey import passkey_batch

    tokenizer = load_tokenizer(tiny_full_model)
    filler = np.asarray(tokenizer.encode("def f(x):\n    return x + 1\n" * 40).ids, np.int32)
    batch = passkey_batch(tokenizer, filler, 3, 80, seed=0)
    assert batch.tokens_bt.shape == (3, 80)
    for row, key in zip(batch.tokens_bt, batch.keys):
        text = tokenizer.decode(row.tolist())
        assert f"PASSKEY = {key}\n" in text and text.endswith(f"assert PASSKEY == {key}")
        assert tokenizer.decode(row[batch.answer_start:].tolist()) == key
