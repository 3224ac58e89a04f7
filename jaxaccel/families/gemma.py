"""Gemma 2 and Gemma 3 (text) as flags of the one Transformer, and their Hugging Face configs.

Both: GeGLU with the tanh GELU, RMSNorm scaling by (1 + w), norms before and after attention and
MLP, embeddings times sqrt(hidden_size), scores scaled by query_pre_attn_scalar ** -0.5, tied
embeddings, and sliding / full layers (`layer_types`). Gemma 3 adds QK-norm and a rope base per
layer type (`rope_parameters` keyed by layer type); Gemma 2 adds tanh soft-capping of the scores
and of the final logits, with one rope base for every layer.
"""

from __future__ import annotations

from typing import Any

from jaxaccel.config import ModelConfig, RopeScaling
from jaxaccel.families.common import Family, FamilyConfigError, hf_dimensions

# Hugging Face model_type -> our family, and our family -> the architecture transformers builds.
MODEL_TYPES = {"gemma3_text": "gemma3", "gemma2": "gemma2"}
ARCHITECTURES = {"gemma3": "Gemma3ForCausalLM", "gemma2": "Gemma2ForCausalLM"}
HF_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}
ACTIVATION = "gelu_pytorch_tanh"
DEFAULT_PATTERN = {"gemma3": 6, "gemma2": 2}  # every Nth layer is full when a config has no layer_types
DEFAULT_THETA = {"gemma3": (1_000_000.0, 10_000.0), "gemma2": (10_000.0, None)}  # (global, local)


class GemmaConfigError(FamilyConfigError):
    """A Gemma config asks for something the Transformer does not do (the message names it)."""


def flags(family: str) -> dict[str, Any]:
    """The ModelConfig fields every Gemma of `family` has."""
    return dict(hidden_act="gelu_tanh", norm_offset=1.0, sandwich_norms=True, embed_scale=True,
                qk_norm=family == "gemma3", qkv_bias=False, o_bias=False, mlp_bias=False, moe=None)


def layer_types_from_hf(hf: dict[str, Any], family: str, num_layers: int) -> tuple[str, ...]:
    """Our per-layer types from `layer_types` (or the sliding_window_pattern rule); others are named errors."""
    names = hf.get("layer_types")
    if names is None:
        pattern = hf.get("sliding_window_pattern") or DEFAULT_PATTERN[family]
        return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers))
    unknown = sorted(set(names) - set(HF_LAYER_TYPES))
    if unknown:
        raise GemmaConfigError(f"unsupported layer_types value(s) {unknown}; supported: {sorted(HF_LAYER_TYPES)}")
    if len(names) != num_layers:
        raise GemmaConfigError(f"layer_types names {len(names)} layers, but num_hidden_layers is {num_layers}")
    return tuple(HF_LAYER_TYPES[n] for n in names)


def rope_from_hf(params: dict[str, Any] | None, what: str) -> tuple[float | None, RopeScaling | None]:
    """(rope base, scaling) of one rope_parameters dict: default or linear."""
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=params["factor"])
    raise GemmaConfigError(f"unsupported rope_type {kind!r} for {what}; supported: default, linear")


def config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a Gemma3TextConfig / Gemma2Config dict (transformers 4 or 5 layout)."""
    family = MODEL_TYPES[hf["model_type"]]
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ACTIVATION
    if act != ACTIVATION:
        raise GemmaConfigError(f"unsupported hidden_activation {act!r} for {family}; only {ACTIVATION!r}")
    if hf.get("attention_bias"):
        raise GemmaConfigError(f"{family} with attention_bias=true is not supported")
    if hf.get("use_bidirectional_attention"):
        raise GemmaConfigError(f"{family} with use_bidirectional_attention=true is not supported (decoder only)")
    layers = hf["num_hidden_layers"]
    types = layer_types_from_hf(hf, family, layers)
    global_theta, local_theta = DEFAULT_THETA[family]
    rope = hf.get("rope_parameters") or {}
    if "full_attention" in rope or "sliding_attention" in rope:  # Gemma 3, transformers 5: one per layer type
        theta, scaling = rope_from_hf(rope.get("full_attention"), "full_attention layers")
        local, local_scaling = rope_from_hf(rope.get("sliding_attention"), "sliding_attention layers")
        if local_scaling is not None:
            raise GemmaConfigError("scaled rope on the sliding layers is not supported")
    else:  # one dict (Gemma 2), or transformers 4's rope_theta / rope_local_base_freq / rope_scaling
        theta, scaling = rope_from_hf(rope or hf.get("rope_scaling"), f"{family} layers")
        theta = theta or hf.get("rope_theta")
        local = hf.get("rope_local_base_freq")
    theta = float(theta or global_theta)
    local = local or local_theta
    eos = hf.get("eos_token_id")
    hd = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return dict(
        family=family, **flags(family),
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=layers, num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hd,
        max_position_embeddings=hf["max_position_embeddings"], rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling,
        local_rope_theta=None if local is None or float(local) == theta else float(local),
        sliding_window=hf.get("sliding_window") if "sliding" in types else None, layer_types=types,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or hd),
        attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos)


def check_expressible(config: ModelConfig) -> None:
    """Raises if a Gemma checkpoint of config.family cannot express `config`."""
    fixed = {**flags(config.family), "attention": None}
    if config.family == "gemma3":
        fixed["attn_softcap"] = None
    wrong = {k: getattr(config, k) for k, v in fixed.items() if getattr(config, k) != v}
    if config.layer_types is None and config.sliding_window is not None:
        wrong["layer_types"] = None  # Gemma names each layer's type
    if wrong:
        raise ValueError(f"a {config.family} checkpoint cannot express {wrong}")


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A Gemma3TextConfig / Gemma2Config dict for `config` (what transformers and `config_fields` read)."""
    check_expressible(config)
    full = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        if config.rope_scaling.kind != "linear":
            raise ValueError(f"a {config.family} checkpoint cannot express {config.rope_scaling.kind} rope scaling")
        full = {"rope_type": "linear", "factor": config.rope_scaling.factor, "rope_theta": config.rope_theta}
    types = config.layer_types or ("full",) * config.num_layers
    if config.family == "gemma3":
        local = {"rope_type": "default", "rope_theta": config.local_rope_theta or config.rope_theta}
        rope = {"sliding_attention": local, "full_attention": full}
    elif config.local_rope_theta is not None:
        raise ValueError("a gemma2 checkpoint cannot express a local rope base (local_rope_theta)")
    else:
        rope = full
    hd = config.resolved_head_dim
    return {
        "architectures": [ARCHITECTURES[config.family]],
        "model_type": {v: k for k, v in MODEL_TYPES.items()}[config.family],
        **hf_dimensions(config),
        "hidden_activation": ACTIVATION,
        "sliding_window": config.sliding_window,
        "layer_types": [{v: k for k, v in HF_LAYER_TYPES.items()}[t] for t in types],
        "rope_parameters": rope,
        "query_pre_attn_scalar": whole(config.query_pre_attn_scalar or hd),
        "final_logit_softcapping": config.final_softcap,
        "attn_logit_softcapping": config.attn_softcap,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
    }


def whole(x: float) -> int | float:
    """x as an int where it is one (transformers' strict configs type query_pre_attn_scalar as int)."""
    return int(x) if float(x).is_integer() else x


def family(name: str) -> Family:
    model_type = {v: k for k, v in MODEL_TYPES.items()}[name]
    return Family(name=name, model_type=model_type, architecture=ARCHITECTURES[name], config_fields=config_fields,
                  config_to_hf=config_to_hf)


GEMMA2 = family("gemma2")
GEMMA3 = family("gemma3")  # model_type gemma3_text: "gemma3" is the multimodal model, which we do not run
