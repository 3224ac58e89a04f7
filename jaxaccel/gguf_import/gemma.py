"""Gemma 2 and 3 from llama.cpp files: tensor names, the norm offset, and the config facts the metadata omits.

The metadata becomes a Hugging Face config dict (Gemma3TextConfig, Gemma2Config), which our
`Transformer` validates and lays out like any other family (`layout.our_layout`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxaccel.gguf_import.names import LLAMA_BLOCK_TENSORS
from jaxaccel.gguf_import.reader import GGUFError

# llama.cpp block tensor -> Gemma3DecoderLayer parameter: Llama's, with four norms per block. llama.cpp's
# "ffn_norm" is the pre-feed-forward norm, and "post_attention_norm" really follows attention (where
# Llama's HF name `post_attention_layernorm` means the pre-MLP norm).
GEMMA3_BLOCK_TENSORS = {**LLAMA_BLOCK_TENSORS, "post_attention_norm": "post_attention_layernorm",
                        "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
GEMMA2_BLOCK_TENSORS = {k: v for k, v in GEMMA3_BLOCK_TENSORS.items() if k not in ("attn_q_norm", "attn_k_norm")}

# Facts absent from the metadata (Gemma3TextConfig's / Gemma2Config's values; llama.cpp hard-codes the same).
SLIDING_PATTERN = {"gemma3": 6, "gemma2": 2}  # every Nth layer attends globally, the others within the window
LOCAL_ROPE_BASE = 10_000.0  # Gemma 3's sliding layers; the global base is the metadata's rope.freq_base
DEFAULT_ROPE_BASE = {"gemma3": 1_000_000.0, "gemma2": 10_000.0}  # when the file omits rope.freq_base
SOFTCAPS = {"gemma2": (50.0, 30.0)}  # (attention, final logits) when a Gemma 2 file omits them; Gemma 3 has none
# Layer counts of the 27B models, which scale scores by (hidden / heads) ** -0.5, not head_dim ** -0.5
# (llama.cpp's rule; transformers' GGUF loader keeps the config default 256).
LAYERS_27B = {"gemma3": 62, "gemma2": 46}
ACTIVATION = "gelu_pytorch_tanh"  # GeGLU with the tanh approximation
END_OF_TURN = "<end_of_turn>"  # ends a chat turn: a stop token besides <eos>


def unshift_norms(name: str, w: np.ndarray, num_heads: int, num_kv_heads: int) -> np.ndarray:
    """Gemma's RMSNorm scales by (1 + w); llama.cpp stores the factor 1 + w, Hugging Face stores w."""
    return w - 1.0 if name.endswith("norm.weight") else w


def gemma_hf_config(meta: dict[str, Any], arch: str, family, tensor_names: set[str],
                    path: Path) -> dict[str, Any]:
    """A Gemma3TextConfig (arch "gemma3") or Gemma2Config ("gemma2") dict from the metadata and the facts above."""

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{path} lacks metadata {arch}.{key}")
        if isinstance(value, list):
            raise GGUFError(f"{path}: per-layer {arch}.{key} is not supported for {arch}")
        return value

    layers, hidden, heads = int(get("block_count")), int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length"))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{path}: {arch} needs attention.value_length == key_length ({head_dim})")
    if layers < 1 or heads < 1 or head_dim < 2 or head_dim % 2:
        raise GGUFError(f"{path}: {arch} block_count {layers}, head_count {heads}, key_length {head_dim} "
                        f"cannot make a model")
    rotary = meta.get(f"{arch}.rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise GGUFError(f"{path}: partial rotary ({rotary} of head_dim {head_dim}) is not supported")
    full = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", DEFAULT_ROPE_BASE[arch]))}
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":  # Gemma 3 4B and larger scale the global layers' positions only
        full = {"rope_type": "linear", "factor": float(get("rope.scaling.factor")), "rope_theta": full["rope_theta"]}
    elif scaling != "none":
        raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported for {arch}; supported: none, linear")
    gemma3 = arch == "gemma3"
    attn_cap, final_cap = (None, None) if gemma3 else (float(get("attn_logit_softcapping", SOFTCAPS[arch][0])),
                                                       float(get("final_logit_softcapping", SOFTCAPS[arch][1])))
    tokens = meta.get("tokenizer.ggml.tokens")
    return {
        "architectures": ["Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM"],
        "model_type": "gemma3_text" if gemma3 else "gemma2",
        "vocab_size": int(get("vocab_size", len(tokens) if tokens else None)),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_activation": ACTIVATION,
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "sliding_window": int(get("attention.sliding_window")),
        "layer_types": ["full_attention" if (i + 1) % SLIDING_PATTERN[arch] == 0 else "sliding_attention"
                        for i in range(layers)],
        # Gemma 3: a rope base per layer kind; Gemma 2: one for all layers.
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": LOCAL_ROPE_BASE},
                            "full_attention": full} if gemma3 else full,
        # Scores are scaled by query_pre_attn_scalar ** -0.5.
        "query_pre_attn_scalar": hidden // heads if layers == LAYERS_27B[arch] else head_dim,
        "final_logit_softcapping": final_cap,
        "attn_logit_softcapping": attn_cap,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
