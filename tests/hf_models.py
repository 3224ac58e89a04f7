"""Tiny random Hugging Face checkpoints, built by the tests themselves with transformers."""

from pathlib import Path

import torch
import transformers

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            max_position_embeddings=64, rms_norm_eps=1e-5)

# name -> (config class, fields): GQA and MHA, tied and untied, biases, QK-norm, llama3 RoPE, windows.
FAMILIES = {
    "llama_gqa_llama3": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "llama_mha_tied_bias": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "qwen2_gqa": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=1)),
    "qwen3_gqa_tied": (transformers.Qwen3Config, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "mistral_window": (transformers.MistralConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=5)),
}
# Gemma 3 / 2: windows (4) shorter than the test sequences, full layers at two places, a
# query_pre_attn_scalar unlike head_dim, small soft-caps (Gemma 2) so that they bite on these weights.
GEMMA_FAMILIES = {
    "gemma3_window": (transformers.Gemma3TextConfig, dict(
        num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=24, tie_word_embeddings=True,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}})),
    "gemma2_softcap": (transformers.Gemma2Config, dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=4,
        query_pre_attn_scalar=16, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        tie_word_embeddings=False)),
}


def build_hf_model(name: str, seed: int = 0):
    """A random-weight transformers model (norm scales and biases randomised too, so bugs show)."""
    config_cls, fields = {**FAMILIES, **GEMMA_FAMILIES}[name]
    config = config_cls(**{**BASE, **fields})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:  # Gemma's norms store w of the factor 1 + w
                p.copy_((0.0 if name in GEMMA_FAMILIES else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def save_hf_model(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def hf_logits(model, tokens) -> "numpy.ndarray":
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
