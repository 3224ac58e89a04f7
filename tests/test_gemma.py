"""Gemma 3 and Gemma 2 in the one Transformer: logits parity with transformers both ways on tiny
random models whose sliding windows are shorter than the sequence, the ring cache of the sliding
layers against a dense cache (prefill, decode, tree verification), and configs we cannot run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from hf_models import GEMMA_FAMILIES, build_hf_model, hf_logits, save_hf_model
from jaxaccel import load_hf, save_hf
from jaxaccel.cache import KVCache
from jaxaccel.caches.dense import DenseEntry
from jaxaccel.caches.streaming import StreamingEntry
from jaxaccel.hf import ModelDirectoryError
from jaxaccel.model import Transformer


def random_tokens(seed, shape=(2, 19), vocab=97):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.fixture(scope="module", params=sorted(GEMMA_FAMILIES))
def gemma(request, tmp_path_factory):
    """(name, transformers model, its directory, our model loaded from it)."""
    path = tmp_path_factory.mktemp(request.param)
    reference = build_hf_model(request.param, seed=1)
    save_hf_model(reference, path)
    return request.param, reference, path, load_hf(path)


def test_load_hf_matches_transformers(gemma):
    name, reference, _, model = gemma
    config = model.config
    assert config.family == name[:6] and config.sliding_window < 19
    assert "full" in config.layer_types and "sliding" in config.layer_types
    tokens = random_tokens(2)
    ours = np.asarray(model(tokens))
    diff = np.abs(ours - hf_logits(reference, tokens)).max()
    assert diff <= 1e-4, diff
    # The window matters: the same weights with a window as long as the context give other logits
    # past the window only.
    wide = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Transformer(config.replace(sliding_window=64),
                                                                      rngs=nnx.Rngs(0)))), nnx.state(model))
    unwindowed = np.asarray(wide(tokens))
    w = config.sliding_window
    np.testing.assert_allclose(unwindowed[:, :w], ours[:, :w], atol=1e-5, rtol=0)
    assert np.abs(unwindowed[:, w:] - ours[:, w:]).max() > 1e-2


def test_save_hf_loads_in_transformers(gemma, tmp_path):
    name, _, _, model = gemma
    save_hf(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded).__name__ == GEMMA_FAMILIES[name][0].__name__.replace("TextConfig", "Config").replace(
        "Config", "ForCausalLM")
    tokens = random_tokens(6)
    np.testing.assert_allclose(hf_logits(reloaded, tokens), np.asarray(model(tokens)), atol=1e-4, rtol=0)
    assert load_hf(tmp_path / "out").config == model.config


def test_window_and_rope_are_per_layer(gemma):
    """Each layer carries its own window and rope base (not the first layer's for the whole pass)."""
    _, reference, _, model = gemma
    hf = reference.config
    for i, layer in enumerate(model.layers):
        sliding = hf.layer_types[i] == "sliding_attention"
        assert layer.self_attn.sliding_window == (hf.sliding_window if sliding else None)
    if model.config.family == "gemma3":
        assert model.config.layer_rope(0) == (10_000.0, None)
        theta, scaling = model.config.layer_rope(1)
        assert theta == 1_000_000.0 and scaling.kind == "linear" and scaling.factor == 4.0


def decode_with(model, tokens, sliding: str, tree: bool):
    """Prefill 7 tokens, decode 5 one by one, then verify a 3-node tree (root, two children) and keep
    the second child's path: the logits of every step, and the cache."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, *args, **kw: nnx.merge(graphdef, state).forward(*args, **kw))
    cache = KVCache.create(model.config, tokens.shape[0], 24, sliding=sliding)
    out = forward(state, tokens[:, :7], cache=cache)
    steps, cache = [out.logits[:, -1]], out.cache.advance(7)
    for t in range(7, 12):
        out = forward(state, tokens[:, t:t + 1], cache=cache)
        steps.append(out.logits[:, -1])
        cache = out.cache.advance(1)
    if tree:
        mask = jnp.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)
        positions = cache.lengths[:, None] + jnp.array([0, 1, 1])
        out = forward(state, tokens[:, 12:15], positions, cache=cache, mask=mask)
        steps.append(out.logits)
        cache = out.cache.keep(jnp.array([[0, 2], [0, 2]]), jnp.array([2, 2]))
        out = forward(state, tokens[:, 15:16], cache=cache)
        steps.append(out.logits[:, -1])
    return steps, cache


@pytest.mark.parametrize("gemma", ["gemma3_window"], indirect=True)  # the ring code is the same for Gemma 2
def test_ring_cache_equals_dense_cache(gemma):
    """Sliding layers keep `sliding_window` slots; decoding and tree verification give the same
    logits as a dense cache on every layer, and the same as a cache-free pass."""
    _, _, _, model = gemma
    tokens = random_tokens(9, (2, 16))
    ring_steps, ring_cache = decode_with(model, tokens, "ring", tree=True)
    dense_steps, dense_cache = decode_with(model, tokens, "dense", tree=True)
    window = model.config.sliding_window
    for i, (ring, dense) in enumerate(zip(ring_cache.layers, dense_cache.layers)):
        assert isinstance(dense, DenseEntry)
        if model.config.layer_window(i) is None:
            assert isinstance(ring, DenseEntry)
        else:
            assert isinstance(ring, StreamingEntry) and ring.keys.shape[1] == window
    assert ring_cache.nbytes < dense_cache.nbytes
    for ring, dense in zip(ring_steps, dense_steps):
        np.testing.assert_allclose(np.asarray(ring), np.asarray(dense), atol=1e-5, rtol=0)
    # Plain decoding equals the training-mode pass over the whole sequence.
    logits = nnx.jit(lambda model, tokens: model(tokens))  # one compile, not one per eager op
    full = np.asarray(logits(model, tokens[:, :12]))
    np.testing.assert_allclose(np.stack([np.asarray(s) for s in ring_steps[:6]], 1), full[:, 6:12], atol=1e-4, rtol=0)
    # The kept tree path (tokens 12, 14) then token 15 equals a pass over that sequence.
    path = np.concatenate([tokens[:, :13], tokens[:, 14:16]], axis=1)
    np.testing.assert_allclose(np.asarray(ring_steps[-1]), np.asarray(logits(model, path))[:, -1], atol=1e-4, rtol=0)


def hf_config(tmp_path, name="gemma3_window"):
    save_hf_model(build_hf_model(name, seed=0), tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("change,message", [
    (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention", "sliding_attention",
                       "full_attention"]), r"unsupported layer_types value\(s\) \['chunked_attention'\]"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types names 2 layers, but num_hidden_layers is 5"),
    (dict(hidden_activation="gelu"), "unsupported hidden_activation 'gelu' for gemma3"),
    (dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]),
     "unsupported architecture 'Gemma3ForConditionalGeneration'"),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     "unsupported rope_type 'yarn' for full_attention layers"),
])
def test_configs_we_cannot_run_are_named(tmp_path, change, message):
    config = hf_config(tmp_path)
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirectoryError, match=message):
        load_hf(tmp_path)


def test_layer_types_of_other_families_are_checked(tmp_path):
    save_hf_model(build_hf_model("qwen3_gqa_tied", seed=0), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["layer_types"] = ["full_attention", "hybrid_attention"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirectoryError, match=r"unsupported layer_types value\(s\) \['hybrid_attention'\]"):
        load_hf(tmp_path)


def test_kv_memory_report(tmp_path, capsys):
    """infer.kv_memory from config.json alone: a ring of sliding_window slots on the sliding layers."""
    from infer.kv_memory import main

    config = hf_config(tmp_path)  # 5 layers, 3 sliding with window 4; 2 KV heads of 32; float32
    assert main(["--model", str(tmp_path / "config.json"), "--context", "16", "48", "--batch", "2", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    per_slot = 2 * 2 * 2 * 32 * 4  # K and V, batch 2, 2 KV heads, head_dim 32, float32
    lengths = 2 * 4
    for row, context in zip(rows, (16, 48)):
        assert row["sliding_layers"] == 3 and row["sliding_window"] == config["sliding_window"] == 4
        assert row["dense_bytes"] == 5 * context * per_slot + lengths
        assert row["ring_bytes"] == (3 * 4 + 2 * context) * per_slot + lengths
    assert main(["--model", str(tmp_path / "missing.json")]) == 2


@pytest.mark.parametrize("gemma", ["gemma3_window"], indirect=True)
def test_speculative_equals_greedy_past_the_window(gemma):
    """Prompt lookup with a token tree over the ring caches decodes exactly what greedy decoding does,
    far past the sliding window (4)."""
    from jaxaccel.decoding import AutoregressiveDecoder
    from jaxaccel.decoding.speculative import SpeculativeDecoder
    from jaxaccel.drafters import make_drafter

    _, _, _, model = gemma
    rng = np.random.default_rng(3)
    prompts = [list(np.tile(rng.integers(0, 97, 5), 3)), list(rng.integers(0, 97, 9))]
    want = AutoregressiveDecoder(model).generate(prompts, max_new_tokens=24)
    got = SpeculativeDecoder(model, make_drafter("pld:branches=3,depth=4,max_ngram=2")).generate(
        prompts, max_new_tokens=24)
    assert got.sequences() == want.sequences()
    assert got.mean_accepted_tokens() > 1.0  # some drafts were accepted, so the ring kept tree paths
