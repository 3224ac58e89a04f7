"""Hugging Face interop: logits parity with transformers, round trips, and bad model directories."""

import json

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from hf_models import FAMILIES, build_hf_model, hf_logits, save_hf_model
from jaxaccel import load_hf, save_hf
from jaxaccel.hf import ModelDirectoryError


def random_tokens(seed, shape=(2, 17), vocab=97):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_match_transformers(tmp_path, name):
    hf_model = build_hf_model(name, seed=1)
    save_hf_model(hf_model, tmp_path)
    model = load_hf(tmp_path)
    tokens = random_tokens(2)
    ours = np.asarray(model(tokens))
    assert ours.shape == (2, 17, 97)
    np.testing.assert_allclose(ours, hf_logits(hf_model, tokens), atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads(tmp_path):
    hf_model = build_hf_model("llama_gqa_llama3", seed=3)
    save_hf_model(hf_model, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    tokens = random_tokens(4)
    np.testing.assert_allclose(np.asarray(load_hf(tmp_path)(tokens)), hf_logits(hf_model, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["qwen3_gqa_tied", "mistral_window", "llama_mha_tied_bias", "llama_gqa_llama3", "qwen2_gqa"])
def test_save_hf_loads_in_transformers(tmp_path, name):
    save_hf_model(build_hf_model(name, seed=5), tmp_path / "src")
    model = load_hf(tmp_path / "src")
    save_hf(model, tmp_path / "out", max_shard_bytes=30_000)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    tokens = random_tokens(6)
    np.testing.assert_allclose(hf_logits(reloaded, tokens), np.asarray(model(tokens)), atol=1e-4, rtol=0)
    assert type(reloaded).__name__ == json.loads((tmp_path / "out/config.json").read_text())["architectures"][0]


@pytest.fixture
def llama_dir(tmp_path):
    return save_hf_model(build_hf_model("llama_gqa_llama3"), tmp_path / "m")


def test_unknown_architecture(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirectoryError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_hf(llama_dir)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ModelDirectoryError, match="no config.json"):
        load_hf(tmp_path)


def test_missing_tensor(llama_dir):
    tensors = load_file(llama_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, llama_dir / "model.safetensors")
    with pytest.raises(ModelDirectoryError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_hf(llama_dir)


def test_misshapen_tensor(llama_dir):
    tensors = load_file(llama_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((33, 64), np.float32)
    save_file(tensors, llama_dir / "model.safetensors")
    with pytest.raises(ModelDirectoryError, match=r"k_proj.weight' .* shape \(33, 64\), expected \(32, 64\)"):
        load_hf(llama_dir)


def test_unexpected_tensor(llama_dir):
    tensors = load_file(llama_dir / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, llama_dir / "model.safetensors")
    with pytest.raises(ModelDirectoryError, match="does not use.*mlp.extra.weight"):
        load_hf(llama_dir)


def test_token_out_of_range(llama_dir):
    model = load_hf(llama_dir)
    with pytest.raises(ValueError, match="token id 97 is out of range for a vocabulary of 97"):
        model(np.array([[1, 2, 97]], np.int32))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        model(np.array([[-1, 2]], np.int32))
    with pytest.raises(ValueError, match=r"shape \[batch, length\]"):
        model(np.array([1, 2], np.int32))
