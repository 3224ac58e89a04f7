"""Mixtral: Mistral's attention with a MoE MLP in every layer, under Mixtral's own tensor names.

Its experts are intermediate_size wide and their top-k weights are normalised; the checkpoint calls
the MoE MLP `block_sparse_moe` and an expert's projections w1 (gate), w2 (down), w3 (up).
"""

from __future__ import annotations

from typing import Any

from jaxaccel.config import ModelConfig, MoESpec
from jaxaccel.families import dense
from jaxaccel.families.llama import MISTRAL_ATTENTION


def moe_from_hf(hf: dict[str, Any]) -> MoESpec:
    return MoESpec(num_experts=hf.get("num_local_experts") or hf.get("num_experts"), top_k=hf["num_experts_per_tok"],
                   load_balance_weight=hf.get("router_aux_loss_coef", 0.01))


def moe_to_hf(config: ModelConfig) -> dict[str, Any]:
    m = dense.moe_spec(config)
    expected = dict(router="softmax", normalize_top_k=True, shared_intermediate_size=0, layer_step=1, dense_layers=())
    wrong = {k: getattr(m, k) for k, v in expected.items() if getattr(m, k) != v}
    if config.moe_intermediate_size != config.intermediate_size:
        wrong["intermediate_size"] = m.intermediate_size
    dense.check_moe(config, wrong)
    return {"num_experts_per_tok": m.top_k, "router_aux_loss_coef": m.load_balance_weight,
            "output_router_logits": False, "num_local_experts": m.num_experts, "router_jitter_noise": 0.0}


MIXTRAL = dense.family("mixtral", "MixtralForCausalLM", MISTRAL_ATTENTION, dense.MoE(moe_from_hf, moe_to_hf),
                       layer_modules={"mlp": "block_sparse_moe"},
                       expert_projections={"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"})
