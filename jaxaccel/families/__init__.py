"""Model-family adapters: a family's Hugging Face config mapping and architectural flags over the one Transformer."""

from typing import Any


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
