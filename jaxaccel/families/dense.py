"""The Llama-style config.json shared by Llama, Mistral, Qwen2/3 and their MoE variants.

They share SwiGLU, RMSNorm, rope (default / linear / llama3) and the field names; a family differs
only in its attention and MLP flags (`Attention`: biases, QK-norm, sliding window) and, for MoE
families, its expert fields (`MoE`). `family` builds a `Family` from those two.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from jaxaccel.config import ModelConfig, MoESpec, RopeScaling
from jaxaccel.families.common import Family, FamilyConfigError, hf_dimensions

ATTENTION_KEY = "jaxaccel_attention"  # config.json key of ModelConfig.attention (an AttentionSpec)
# Gemma's architectural flags at the values every Llama-style family has.
NOT_GEMMA = dict(hidden_act="silu", norm_offset=0.0, sandwich_norms=False, embed_scale=False, layer_types=None,
                 local_rope_theta=None, query_pre_attn_scalar=None, attn_softcap=None, final_softcap=None)


@dataclasses.dataclass(frozen=True)
class Attention:
    """How a dense family spells qkv_bias, o_bias, mlp_bias, qk_norm and sliding_window in config.json."""

    name: str  # the dense family, named in "a <name> checkpoint cannot express ..."
    from_hf: Callable[[dict[str, Any]], dict[str, Any]]  # config.json -> those five fields
    fixed: Callable[[ModelConfig], dict[str, Any]]  # the values its checkpoints cannot vary
    to_hf: Callable[[ModelConfig], dict[str, Any]]  # those fields -> config.json


@dataclasses.dataclass(frozen=True)
class MoE:
    """How a MoE family spells its MoESpec in config.json."""

    from_hf: Callable[[dict[str, Any]], MoESpec]
    to_hf: Callable[[ModelConfig], dict[str, Any]]  # raises if the family cannot express config.moe


def family(name: str, architecture: str, attention: Attention, moe: MoE | None = None, **names: Any) -> Family:
    """A Llama-style family; `names` are Family's checkpoint-name fields."""
    return Family(name=name, model_type=name, architecture=architecture,
                  config_fields=functools.partial(config_fields, attention=attention, moe=moe),
                  config_to_hf=functools.partial(config_to_hf, architecture=architecture, attention=attention,
                                                  moe=moe),
                  has_moe=moe is not None, **names)


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope base, scaling) of a config.json: transformers 5's rope_parameters or 4's rope_scaling."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), RopeScaling(kind="linear", factor=rope["factor"])
    if kind == "llama3":
        return float(theta), RopeScaling(kind="llama3", factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                                         high_freq_factor=rope["high_freq_factor"],
                                         original_max_position=rope["original_max_position_embeddings"])
    raise FamilyConfigError(f"unsupported rope_type {kind!r}; supported: default, linear, llama3")


def rope_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The rope_parameters dict of `config`."""
    s = config.rope_scaling
    if s is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    rope = {"rope_type": s.kind, "factor": s.factor, "rope_theta": config.rope_theta}
    if s.kind == "llama3":
        rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                    original_max_position_embeddings=s.original_max_position)
    return rope


def config_fields(hf: dict[str, Any], attention: Attention, moe: MoE | None) -> dict[str, Any]:
    """ModelConfig fields of a Llama-style config.json (transformers 4 or 5 layout)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise FamilyConfigError(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu' is implemented")
    rope_theta, scaling = rope_from_hf(hf)
    flags = attention.from_hf(hf)
    eos = hf.get("eos_token_id")
    return dict(
        family=hf["model_type"],
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        max_position_embeddings=hf["max_position_embeddings"],
        rope_theta=rope_theta,
        rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **flags,
        moe=None if moe is None else moe.from_hf(hf),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        attention=hf.get(ATTENTION_KEY),  # our own key: per-layer attention kinds (absent: full)
    )


def config_to_hf(config: ModelConfig, architecture: str, attention: Attention, moe: MoE | None) -> dict[str, Any]:
    """A Llama-style config.json for `config`; raises if the family cannot express it."""
    if config.moe is not None and moe is None:
        from jaxaccel.families import FAMILIES  # the registry imports this module

        names = [repr(f.name) for f in sorted(FAMILIES.values(), key=lambda f: f.name) if f.has_moe]
        raise ValueError(f"a {attention.name} checkpoint cannot express MoE layers; use family "
                         f"{', '.join(names[:-1])} or {names[-1]}")
    expected = attention.fixed(config) | NOT_GEMMA
    wrong = {k: getattr(config, k) for k, v in expected.items() if getattr(config, k) != v}
    if wrong:
        raise ValueError(f"a {attention.name} checkpoint cannot express {wrong}")
    rope = rope_to_hf(config)
    hf = {
        "architectures": [architecture],
        "model_type": config.family,
        **hf_dimensions(config),
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,  # transformers 4 reads these two,
        "rope_scaling": None if config.rope_scaling is None else rope,
        "rope_parameters": rope,  # transformers 5 this one
        **attention.to_hf(config),
    }
    if moe is not None:
        hf.update(moe.to_hf(config))
    if config.attention is not None:  # duo / block_sparse / linear / hybrids: read back by config_fields
        hf[ATTENTION_KEY] = dataclasses.asdict(config.attention)
    return hf



def moe_spec(config: ModelConfig) -> MoESpec:
    """config.moe of a config for a MoE family's checkpoint."""
    if config.moe is None:
        raise ValueError(f"a {config.family} checkpoint needs MoE layers, but config.moe is None")
    return config.moe


def check_moe(config: ModelConfig, wrong: dict[str, Any]) -> None:
    """Raises naming the MoESpec fields (`wrong`) a MoE family's checkpoint cannot express."""
    if wrong:
        raise ValueError(f"a {config.family} checkpoint cannot express moe {wrong}")
