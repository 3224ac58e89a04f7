"""DuoAttention's retrieval-head identification: one gate per (layer, KV head) in [0, 1].

A duo layer under gates computes gate * full + (1 - gate) * streaming attention per KV head
(DuoAttention.gated). Starting from gates of 1 (the base model exactly), optax minimises
    ||h(gates) - h(1)||^2 / ||h(1)||^2 at the answer positions of passkey sequences  +  l1 * mean(gates)
(h: final hidden states after the last norm), clamping the gates to [0, 1] after every step; the
heads whose gates end lowest — a `sparsity` fraction of them — become streaming heads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxaccel.config import AttentionSpec
from jaxaccel.model import Transformer, run_layers


@dataclass(frozen=True)
class GateConfig:
    steps: int = 100
    lr: float = 0.02
    l1: float = 0.05
    sparsity: float = 0.5
    sink_size: int = 16
    recent_size: int = 64

    def __post_init__(self):
        if not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {self.sparsity}")
        if self.steps < 0 or self.lr <= 0 or self.l1 < 0:
            raise ValueError(f"need steps >= 0, lr > 0, l1 >= 0; got {self.steps}, {self.lr}, {self.l1}")


def as_duo(model: Transformer, retrieval_heads: tuple[tuple[bool, ...], ...], sink_size: int,
           recent_size: int) -> Transformer:
    """The same weights as a duo model (every layer duo) with these retrieval heads."""
    kinds = {model.config.layer_kind(i) for i in range(model.config.num_layers)}
    if not kinds <= {"full", "duo"}:
        raise ValueError(f"retrieval heads are found in full-attention models; this one has {sorted(kinds)}")
    spec = AttentionSpec(kinds=("duo",), retrieval_heads=retrieval_heads, sink_size=sink_size, recent_size=recent_size)
    shell = nnx.eval_shape(lambda: Transformer(model.config.replace(attention=spec), rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(shell), nnx.state(model))


def gated_hidden(model: Transformer, tokens_bt: jax.Array, gates_lk: jax.Array) -> jax.Array:
    """Final hidden states [B, T, d] with every duo layer mixing full and streaming attention."""
    x_btd, _, _ = run_layers(model.layers, model.embed_tokens(tokens_bt), duo_gates=gates_lk)
    return model.norm(x_btd)


def gate_loss(gates_lk, graphdef, state, tokens_bt, answer_from: int, l1: float):
    model = nnx.merge(graphdef, state)
    teacher = jax.lax.stop_gradient(gated_hidden(model, tokens_bt, jnp.ones_like(gates_lk)))[:, answer_from:]
    student = gated_hidden(model, tokens_bt, gates_lk)[:, answer_from:]
    distill = jnp.sum((student - teacher) ** 2) / jnp.sum(teacher**2)
    return distill + l1 * jnp.mean(jnp.abs(gates_lk)), distill


@functools.partial(jax.jit, static_argnums=(1, 5, 6, 7))
def _gate_step(gates_lk, graphdef, state, opt_state, tokens_bt, answer_from, l1, optimizer):
    (loss, distill), grad = jax.value_and_grad(gate_loss, has_aux=True)(gates_lk, graphdef, state, tokens_bt,
                                                                        answer_from, l1)
    updates, opt_state = optimizer.update(grad, opt_state, gates_lk)
    return jnp.clip(optax.apply_updates(gates_lk, updates), 0.0, 1.0), opt_state, loss, distill


def optimise_gates(model: Transformer, batches: Callable[[int], tuple[np.ndarray, int]], config: GateConfig,
                   on_step: Callable[[int, dict], None] | None = None) -> np.ndarray:
    """Gates [layers, Hkv] after `config.steps` Adam steps; batches(step) -> (tokens [B, T], answer_from)
    where the hidden states from answer_from on are distilled (those predicting the answer)."""
    c = model.config
    everyone = tuple((True,) * c.num_kv_heads for _ in range(c.num_layers))
    duo = as_duo(model, everyone, config.sink_size, config.recent_size)
    graphdef, state = nnx.split(duo)
    optimizer = optax.adam(config.lr)
    gates = jnp.ones((c.num_layers, c.num_kv_heads), jnp.float32)
    opt_state = optimizer.init(gates)
    for step in range(config.steps):
        tokens, answer_from = batches(step)
        gates, opt_state, loss, distill = _gate_step(gates, graphdef, state, opt_state, jnp.asarray(tokens),
                                                     answer_from, config.l1, optimizer)
        if on_step is not None:
            on_step(step, {"loss": float(loss), "distill": float(distill), "mean_gate": float(gates.mean())})
    return np.asarray(gates)


def retrieval_heads_from_gates(gates_lk: np.ndarray, sparsity: float) -> tuple[tuple[bool, ...], ...]:
    """The lowest-gated round(sparsity * heads) heads stream (ties: the earlier head); the rest retrieve."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    flat = np.asarray(gates_lk, np.float64).ravel()
    streaming = np.argsort(flat, kind="stable")[:round(sparsity * flat.size)]
    retrieval = np.ones(flat.size, bool)
    retrieval[streaming] = False
    return tuple(tuple(bool(r) for r in row) for row in retrieval.reshape(gates_lk.shape))
