"""What every family adapter is: the `Family` record, its config error, and the config.json fields all share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


class FamilyConfigError(ValueError):
    """A config.json asks for something the Transformer does not do (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family over the one Transformer: its config.json mapping both ways and its tensor names."""

    name: str  # ModelConfig.family
    model_type: str  # config.json "model_type"
    architecture: str  # config.json "architectures"[0]: the class transformers builds
    config_fields: Callable[[dict[str, Any]], dict[str, Any]]  # config.json -> ModelConfig fields
    config_to_hf: Callable[[Any], dict[str, Any]]  # ModelConfig -> config.json; ValueError if it cannot
    has_moe: bool = False  # its checkpoints hold MoE layers
    # Checkpoint names that differ from our module names (the Llama layout's):
    layer_modules: Mapping[str, str] = dataclasses.field(default_factory=dict)  # within a decoder layer
    expert_projections: Mapping[str, str] = dataclasses.field(default_factory=dict)  # of one expert


def hf_dimensions(config) -> dict[str, Any]:
    """The config.json fields every family writes the same way: sizes, eps, tokens, dtype."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": config.param_dtype,
    }
