"""Losses. Logits are float32 (the model casts its LM head output), so the softmax is too."""

from __future__ import annotations

from typing import Callable

import jax
import optax

from jaxaccel.layers.moe import call_with_moe_stats


def next_token_nll(model: Callable[[jax.Array], jax.Array], tokens_bt1: jax.Array) -> jax.Array:
    """Per-position negative log-likelihood [B, T] (nats) of tokens[:, 1:] given tokens[:, :-1];
    `model` maps tokens [B, T] to float32 logits [B, T, V] (a Transformer)."""
    logits_btv = model(tokens_bt1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt1[:, 1:])


def next_token_nll_and_moe_stats(model, tokens_bt1: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`next_token_nll` of a Transformer, plus its MoE router statistics averaged over MoE blocks
    ({load_balance, z_loss, dropped, load [E]}; empty for a dense model)."""
    return call_with_moe_stats(next_token_nll, model, tokens_bt1)


def moe_aux_loss(stats: dict[str, jax.Array], config) -> jax.Array | float:
    """The MoE terms of the training loss: load_balance_weight * load-balancing loss +
    z_loss_weight * router z-loss (0 for a dense model)."""
    if not stats:
        return 0.0
    return config.moe.load_balance_weight * stats["load_balance"] + config.moe.z_loss_weight * stats["z_loss"]


def moe_metrics(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Flat metrics of the MoE statistics: moe_load_balance, moe_z_loss, moe_dropped, moe_load_max
    (the busiest expert's share times E; 1 = balanced) and moe_load_<e> per expert."""
    if not stats:
        return {}
    load_e = stats["load"]
    out = {"moe_load_balance": stats["load_balance"], "moe_z_loss": stats["z_loss"], "moe_dropped": stats["dropped"],
           "moe_load_max": load_e.max() * load_e.shape[0]}
    out.update({f"moe_load_{e}": load_e[e] for e in range(load_e.shape[0])})
    return out
