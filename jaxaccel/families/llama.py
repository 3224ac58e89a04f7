"""Llama and Mistral: the same layers; Llama may bias its projections, Mistral may slide a window."""

from __future__ import annotations

from typing import Any

from jaxaccel.families import dense


def llama_flags(hf: dict[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))  # q/k/v and o together
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=False,
                sliding_window=None)


def mistral_flags(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(qkv_bias=bool(hf.get("attention_bias", False)), o_bias=False, mlp_bias=False, qk_norm=False,
                sliding_window=hf.get("sliding_window"))  # one window for every layer


LLAMA_ATTENTION = dense.Attention(
    name="llama", from_hf=llama_flags,
    fixed=lambda c: dict(qk_norm=False, o_bias=c.qkv_bias, sliding_window=None),
    to_hf=lambda c: {"attention_bias": c.qkv_bias, "mlp_bias": c.mlp_bias})
MISTRAL_ATTENTION = dense.Attention(
    name="mistral", from_hf=mistral_flags,
    fixed=lambda c: dict(qk_norm=False, qkv_bias=False, o_bias=False, mlp_bias=False),
    to_hf=lambda c: {"sliding_window": c.sliding_window})

LLAMA = dense.family("llama", "LlamaForCausalLM", LLAMA_ATTENTION)
MISTRAL = dense.family("mistral", "MistralForCausalLM", MISTRAL_ATTENTION)
