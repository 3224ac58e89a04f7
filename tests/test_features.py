"""The cached base features (train.features): equal to a fresh forward of the base, resumable, and
refused for answers of another model."""

import jax.numpy as jnp
import numpy as np
from chat_models import build_chat_model
from flax import nnx

from jaxaccel.hf import load_hf
from jaxaccel.model import run_layers
from jaxaccel.training.features import feature_layers, layer_features, read_shard
from train import features, responses


def test_layer_features_are_the_forward_pass_read_at_the_cuts(tmp_path):
    model = load_hf(build_chat_model(tmp_path / "chat", seed=3))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 24)), jnp.int32)
    cuts = feature_layers(model.config.num_layers)
    layers_btkd, hidden_btd = layer_features(model, tokens, cuts)
    np.testing.assert_allclose(hidden_btd, model.forward(tokens).hidden, atol=1e-5)
    for k, cut in enumerate(cuts):
        alone, _, _ = run_layers(model.layers[:cut + 1], model.embed_tokens(tokens))
        np.testing.assert_allclose(layers_btkd[:, :, k], alone, atol=1e-5)


def test_cached_features_equal_a_fresh_forward_and_a_rerun_keeps_them(tmp_path, capsys):
    model_dir = build_chat_model(tmp_path / "chat", context=4096)
    answers, out = tmp_path / "responses", tmp_path / "features"
    assert responses.main(["--model", str(model_dir), "--out", str(answers), "--limit", "5", "--shard-size", "3",
                           "--batch-size", "2", "--max-new-tokens", "4", "--no-progress"]) == 0
    argv = ["--model", str(model_dir), "--responses", str(answers), "--out", str(out), "--no-progress"]
    assert features.main(argv) == 0
    shards = sorted(out.iterdir())
    assert [s.name for s in shards] == ["features-00000", "features-00001"]

    model = load_hf(model_dir)
    fresh_features = nnx.jit(layer_features, static_argnums=2)  # one compile a length, not one per op
    shard = read_shard(shards[0])
    starts, tokens = shard["starts"], shard["tokens"]
    assert len(shard["meta"]["keys"]) == len(starts) - 1 == len(shard["prompt_lens"])
    for r in range(len(starts) - 1):
        seq = jnp.asarray(tokens[starts[r]:starts[r + 1]])[None]
        fresh_layers, fresh_hidden = fresh_features(model, seq, tuple(shard["meta"]["feature_layers"]))
        cached_hidden = np.asarray(shard["hidden"][starts[r]:starts[r + 1]], np.float32)
        cached_layers = np.asarray(shard["layers"][starts[r]:starts[r + 1]], np.float32)
        np.testing.assert_allclose(cached_hidden, fresh_hidden[0], rtol=2e-3, atol=2e-3)  # float16 on disk
        np.testing.assert_allclose(cached_layers, fresh_layers[0], rtol=2e-3, atol=2e-3)

    stamp = (shards[0] / "layers.npy").stat().st_mtime_ns
    assert features.main(argv) == 0 and (shards[0] / "layers.npy").stat().st_mtime_ns == stamp

    other = build_chat_model(tmp_path / "other", context=4096, seed=7)
    capsys.readouterr()
    assert features.main(["--model", str(other), "--responses", str(answers), "--out", str(out)]) == 2
    assert "another model" in capsys.readouterr().err
