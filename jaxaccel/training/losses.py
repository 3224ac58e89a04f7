"""Losses. Logits are float32 (the model casts its LM head output), so the softmax is too."""

from __future__ import annotations

from typing import Callable

import jax
import optax


def next_token_nll(model: Callable[[jax.Array], jax.Array], tokens_bt1: jax.Array) -> jax.Array:
    """Per-position negative log-likelihood [B, T] (nats) of tokens[:, 1:] given tokens[:, :-1];
    `model` maps tokens [B, T] to float32 logits [B, T, V] (a Transformer)."""
    logits_btv = model(tokens_bt1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt1[:, 1:])
