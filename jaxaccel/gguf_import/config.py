"""GGUF metadata -> a Hugging Face config dict (read back by `jaxaccel.hf.config_from_hf`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxaccel.gguf_import.reader import GGUFError

if TYPE_CHECKING:  # families.py imports this module
    from jaxaccel.gguf_import.families import GGUFFamily


def hf_config_from_metadata(meta: dict[str, Any], arch: str, family: GGUFFamily, tensor_names: set[str],
                            path: Path) -> dict[str, Any]:
    """The config.json fields the metadata and the tensor list state."""

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise GGUFError(f"{path} lacks metadata {arch}.{key}")
        if isinstance(value, list):  # llama.cpp writes some per-layer values as arrays
            if len(set(value)) != 1:
                raise GGUFError(f"{path}: per-layer {arch}.{key} {value[:8]} is not supported")
            value = value[0]
        return value

    heads = int(get("attention.head_count", required=True))
    hidden = int(get("embedding_length", required=True))
    head_dim = int(get("attention.key_length", hidden // heads))
    rotary = get("rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise GGUFError(f"{path}: partial rotary ({arch}.rope.dimension_count {rotary} of head_dim {head_dim}) "
                        f"is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", len(tokens) if tokens else None, required=True)
    hf = {
        "model_type": family.model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", required=True)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", required=True)),
        "rope_parameters": rope_parameters(get, tensor_names, path),
        # llama.cpp drops output.weight when it equals the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if family.model_type == "mistral":
        hf["sliding_window"] = get("attention.sliding_window")
    return hf


def rope_parameters(get, tensor_names: set[str], path: Path) -> dict[str, Any]:
    """transformers 5's rope_parameters from the rope.* keys: default or linear scaling."""
    theta = float(get("rope.freq_base", 10000.0))
    if "rope_freqs.weight" in tensor_names:
        # llama.cpp stores Llama 3 rope scaling only as per-frequency factors, not its parameters.
        raise GGUFError(f"{path}: llama3 rope scaling (tensor rope_freqs.weight) is not supported yet")
    kind = get("rope.scaling.type", "none")
    if kind == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(get("rope.scaling.factor", required=True)), "rope_theta": theta}
    raise GGUFError(f"{path}: rope scaling {kind!r} is not supported; supported: none, linear")
