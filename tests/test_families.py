"""The family registry: lookups name what is supported, and every family round-trips its config.json."""

import json

import pytest

from jaxaccel import config as config_module
from jaxaccel.config import ModelConfig, MoESpec
from jaxaccel.families import BY_NAME, FAMILIES, family_for, gemma, named
from jaxaccel.hf import config_from_hf, config_to_hf, hf_name

DIMS = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4, num_kv_heads=2,
            head_dim=16, bos_token_id=1, eos_token_id=2)
# One config per family that sets the flags it can vary away from their defaults.
CONFIGS = {
    "llama": dict(qkv_bias=True, o_bias=True, mlp_bias=True),
    "mistral": dict(sliding_window=8),
    "mixtral": dict(sliding_window=8, moe=MoESpec(num_experts=4, top_k=2, normalize_top_k=True)),
    "qwen2": dict(qkv_bias=True, tie_embeddings=True),
    "qwen3": dict(qk_norm=True, qkv_bias=True, o_bias=True),
    "qwen2_moe": dict(qkv_bias=True, moe=MoESpec(num_experts=4, top_k=2, intermediate_size=32,
                                                 shared_intermediate_size=48, shared_expert_gate=True)),
    "qwen3_moe": dict(qk_norm=True, moe=MoESpec(num_experts=4, top_k=2, intermediate_size=32, normalize_top_k=True,
                                                layer_step=2, dense_layers=(0,))),
    "gemma2": dict(**gemma.flags("gemma2"), layer_types=("sliding", "full") * 2, sliding_window=4, rope_theta=1e4,
                   query_pre_attn_scalar=24.0, attn_softcap=50.0, final_softcap=30.0, tie_embeddings=True),
    "gemma3": dict(**gemma.flags("gemma3"), layer_types=("sliding",) * 3 + ("full",), sliding_window=4,
                   rope_theta=1e6, local_rope_theta=1e4, query_pre_attn_scalar=16.0, tie_embeddings=True),
}


def test_every_family_has_a_round_trip_case_and_config_knows_it():
    assert sorted(CONFIGS) == sorted(BY_NAME) == sorted(config_module.FAMILIES)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_round_trips_through_its_config_json(name):
    config = ModelConfig(family=name, **DIMS, **CONFIGS[name])
    hf = json.loads(json.dumps(config_to_hf(config)))  # what config.json holds
    family = named(name)
    assert hf["model_type"] == family.model_type and hf["architectures"] == [family.architecture]
    assert family_for(hf["model_type"]) is family
    assert config_from_hf(hf) == config


def test_unknown_names_list_the_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'; supported: \['gemma2', 'gemma3_text', "):
        family_for("gpt2")
    with pytest.raises(ValueError, match=r"unknown model family 'gemma3_text'; supported: \['gemma2', 'gemma3', "):
        named("gemma3_text")
    assert sorted(FAMILIES) == sorted(f.model_type for f in BY_NAME.values())


def test_mixtral_tensor_names_differ_only_in_its_moe_layers():
    expert = ("layers", 1, "mlp", "experts", "gate_proj")
    assert hf_name(expert, "mixtral") == ("model.layers.1.block_sparse_moe.experts.{e}.w1.weight", True)
    assert hf_name(expert, "qwen3_moe") == ("model.layers.1.mlp.experts.{e}.gate_proj.weight", True)
    attention = ("layers", 0, "self_attn", "q_proj", "kernel")
    assert hf_name(attention, "mixtral") == hf_name(attention, "llama")
    assert hf_name(attention, "mixtral") == ("model.layers.0.self_attn.q_proj.weight", True)
