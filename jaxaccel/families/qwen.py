"""Qwen2, Qwen3 and their MoE variants.

Qwen2 biases q/k/v (never o); Qwen3 normalises q and k per head (QK-norm) and may bias all four
projections. Neither runs per-layer sliding windows (use_sliding_window). Their MoE variants use
moe_intermediate_size-wide experts, MoE every decoder_sparse_step-th layer except mlp_only_layers;
Qwen2-MoE adds a gated shared expert.
"""

from __future__ import annotations

import functools
from typing import Any

from jaxaccel.config import ModelConfig, MoESpec
from jaxaccel.families import dense
from jaxaccel.families.common import FamilyConfigError


def no_sliding_window(hf: dict[str, Any]) -> None:
    if hf.get("use_sliding_window"):
        raise FamilyConfigError(f"{hf['model_type']} with use_sliding_window=true (per-layer windows) is not supported")


def qwen2_flags(hf: dict[str, Any]) -> dict[str, Any]:
    no_sliding_window(hf)
    return dict(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False, sliding_window=None)


def qwen3_flags(hf: dict[str, Any]) -> dict[str, Any]:
    no_sliding_window(hf)
    bias = bool(hf.get("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True, sliding_window=None)


NO_WINDOW = {"use_sliding_window": False, "sliding_window": None}
QWEN2_ATTENTION = dense.Attention(
    name="qwen2", from_hf=qwen2_flags,
    fixed=lambda c: dict(qk_norm=False, qkv_bias=True, o_bias=False, mlp_bias=False, sliding_window=None),
    to_hf=lambda c: dict(NO_WINDOW))
QWEN3_ATTENTION = dense.Attention(
    name="qwen3", from_hf=qwen3_flags,
    fixed=lambda c: dict(qk_norm=True, o_bias=c.qkv_bias, mlp_bias=False, sliding_window=None),
    to_hf=lambda c: {"attention_bias": c.qkv_bias, **NO_WINDOW})


def moe_from_hf(hf: dict[str, Any], shared_expert: bool) -> MoESpec:
    fields = dict(num_experts=hf.get("num_local_experts") or hf.get("num_experts"), top_k=hf["num_experts_per_tok"],
                  load_balance_weight=hf.get("router_aux_loss_coef", 0.01),
                  intermediate_size=hf["moe_intermediate_size"], normalize_top_k=bool(hf.get("norm_topk_prob", False)),
                  layer_step=hf.get("decoder_sparse_step", 1), dense_layers=tuple(hf.get("mlp_only_layers") or ()))
    if shared_expert:
        fields.update(shared_intermediate_size=hf["shared_expert_intermediate_size"], shared_expert_gate=True)
    return MoESpec(**fields)


def moe_to_hf(config: ModelConfig, shared_expert: bool) -> dict[str, Any]:
    m = dense.moe_spec(config)
    expected = dict(router="softmax", **({"shared_expert_gate": True} if shared_expert
                                         else {"shared_intermediate_size": 0}))
    wrong = {k: getattr(m, k) for k, v in expected.items() if getattr(m, k) != v}
    if shared_expert and not m.shared_intermediate_size:
        wrong["shared_intermediate_size"] = 0
    dense.check_moe(config, wrong)
    hf = {"num_experts_per_tok": m.top_k, "router_aux_loss_coef": m.load_balance_weight, "output_router_logits": False,
          "num_experts": m.num_experts, "moe_intermediate_size": config.moe_intermediate_size,
          "norm_topk_prob": m.normalize_top_k, "decoder_sparse_step": m.layer_step,
          "mlp_only_layers": list(m.dense_layers)}
    if shared_expert:
        hf["shared_expert_intermediate_size"] = m.shared_intermediate_size
    return hf


def qwen_moe(shared_expert: bool) -> dense.MoE:
    return dense.MoE(functools.partial(moe_from_hf, shared_expert=shared_expert),
                     functools.partial(moe_to_hf, shared_expert=shared_expert))


QWEN2 = dense.family("qwen2", "Qwen2ForCausalLM", QWEN2_ATTENTION)
QWEN3 = dense.family("qwen3", "Qwen3ForCausalLM", QWEN3_ATTENTION)
QWEN2_MOE = dense.family("qwen2_moe", "Qwen2MoeForCausalLM", QWEN2_ATTENTION, qwen_moe(shared_expert=True))
QWEN3_MOE = dense.family("qwen3_moe", "Qwen3MoeForCausalLM", QWEN3_ATTENTION, qwen_moe(shared_expert=False))
