"""Mixtral / Qwen2-MoE / Qwen3-MoE interop: logits parity with transformers both ways, bad configs."""

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from hf_models import BASE, hf_logits, save_hf_model
from jaxaccel import load_hf, save_hf
from jaxaccel.config import ModelConfig, MoESpec
from jaxaccel.hf import ModelDirectoryError, config_to_hf

MOE_BASE = dict(BASE, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)

# name -> (config class, fields): softmax top-2 of 4 with normalised weights (Mixtral, window);
# Qwen2-MoE with a gated shared expert, un-normalised top-k, a dense layer; Qwen3-MoE with QK-norm,
# normalised top-3 and every second layer sparse.
MOE_FAMILIES = {
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=7)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, shared_expert_intermediate_size=56,
        mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        num_experts=5, num_experts_per_tok=3, moe_intermediate_size=40, head_dim=24, decoder_sparse_step=2,
        norm_topk_prob=True)),
}


def build_moe_model(name: str, seed: int = 0):
    """A random-weight transformers MoE model; router weights large so that routing is decisive
    (well away from ties, which a 1e-7 difference could flip)."""
    config_cls, fields = MOE_FAMILIES[name]
    config = config_cls(**MOE_BASE, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def random_tokens(seed, shape=(2, 17), vocab=97):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("name", sorted(MOE_FAMILIES))
def test_moe_logits_match_transformers_both_ways(tmp_path, name):
    hf_model = build_moe_model(name, seed=1)
    save_hf_model(hf_model, tmp_path / "src")
    model = load_hf(tmp_path / "src")
    assert model.config.family == name and model.config.moe is not None
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    hf_blocks = [getattr(layer, "block_sparse_moe", None) or layer.mlp for layer in hf_model.model.layers]
    assert kinds == ["MoE" if "SparseMoe" in type(block).__name__ else "MLP" for block in hf_blocks]
    assert "MoE" in kinds and ("MLP" in kinds) == (name != "mixtral")
    tokens = random_tokens(2)
    ours = np.asarray(model(tokens))
    np.testing.assert_allclose(ours, hf_logits(hf_model, tokens), atol=1e-4, rtol=0)

    save_hf(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded).__name__ == type(hf_model).__name__
    tokens = random_tokens(3)
    np.testing.assert_allclose(hf_logits(reloaded, tokens), np.asarray(model(tokens)), atol=1e-4, rtol=0)


def test_config_round_trip_and_inexpressible_configs():
    config = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, family="qwen2", qkv_bias=True,
                         moe=MoESpec(num_experts=4, top_k=2))
    with pytest.raises(ValueError, match="qwen2 checkpoint cannot express MoE layers"):
        config_to_hf(config)
    with pytest.raises(ValueError, match=r"qwen2_moe checkpoint cannot express moe \{'shared_expert_gate': False"):
        config_to_hf(config.replace(family="qwen2_moe"))
    with pytest.raises(ValueError, match="mixtral checkpoint cannot express moe {'router': 'sigmoid'}"):
        config_to_hf(config.replace(family="mixtral", qkv_bias=False, moe=MoESpec(num_experts=4, router="sigmoid")))
    with pytest.raises(ValueError, match="mixtral checkpoint needs MoE layers"):
        config_to_hf(config.replace(family="mixtral", qkv_bias=False, moe=None))


def test_missing_expert_tensor_is_named(tmp_path):
    save_hf_model(build_moe_model("mixtral"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    missing = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
    with pytest.raises(ModelDirectoryError, match=f"missing tensor '{missing}'"):
        load_hf(tmp_path)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_fused_expert_layout_loads(tmp_path, name):
    """transformers' in-memory layout (experts fused into [E, 2f, d] / [E, d, f] tensors, Mixtral's
    block under `mlp`), written as is, loads with the same logits."""
    from safetensors.torch import save_file

    hf_model = build_moe_model(name, seed=7)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf_model.config.to_json_file(tmp_path / "config.json")
    tokens = random_tokens(8)
    np.testing.assert_allclose(np.asarray(load_hf(tmp_path)(tokens)), hf_logits(hf_model, tokens), atol=1e-4, rtol=0)
