"""Draft-head distillation: the losses and the jitted train step, with the base model frozen.

Self-distillation: the teacher is the base model's own next-token distribution. Each step runs
the base forward once over the batch (outside the gradient), then the heads' teacher-forced pass
(jaxaccel.heads), whose depth-k row t drafts the token at t + k + 2; its target is the base's
distribution at position t + k + 1, which predicts that same token from the text before it.

The train state is {"params": head params only, "opt": optax state of those, "step"}; the base's
parameters are a separate, non-differentiated argument of the step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxaccel.heads.common import DraftOutput
from jaxaccel.heads.registry import HeadParts
from jaxaccel.training.steps import ModelParts

LOSSES = ("kl", "ce")


@dataclass(frozen=True)
class DistillConfig:
    """Head-distillation hyper-parameters (batch_size is global, per optimizer update)."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    loss: str = "kl"  # kl: the base's distribution (self-distillation); ce: the text's next tokens
    depth_decay: float = 0.8  # depth k's loss weighs depth_decay ** k
    feature_weight: float = 1.0  # eagle: weight of the smooth-L1 feature regression
    unroll: int = 1  # autoregressive drafters (eagle): draft steps unrolled on their own features (1: teacher forcing)
    generated_rows: int = 0  # > 0: a pool of the base's own continuations of train-split prompts
    generated_fraction: float = 0.5  # share of each batch's rows taken from that pool
    generate_temperature: float = 0.0
    corpus_max_bytes: int | None = None  # cap on each split's text (tiny runs); None: all of it
    checkpoint_every: int = 100
    keep_checkpoints: int = 3

    # May differ when a run directory is resumed: they do not change the train state.
    RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoints")

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "unroll", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "generated_rows", "weight_decay", "feature_weight",
                     "generate_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {list(LOSSES)}")
        if not 0 < self.depth_decay <= 1:
            raise ValueError(f"depth_decay must be in (0, 1], got {self.depth_decay}")
        if not 0 <= self.generated_fraction <= 1:
            raise ValueError(f"generated_fraction must be in [0, 1], got {self.generated_fraction}")

    def replace(self, **overrides: Any) -> DistillConfig:
        """A copy with `overrides` applied; an unknown field is a ValueError naming it."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown distillation field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (JSON-serialisable: what checkpoints record as metadata)."""
        return dataclasses.asdict(self)


def train_depth(heads_config, config: DistillConfig) -> int:
    """Draft depths trained per step: the kind's record's training rule (every head, eagle's unrolled steps)."""
    from jaxaccel.drafters.registry import get_record  # the records import the heads modules

    return get_record(heads_config.kind).train_depth(heads_config, config)


def distill_loss(draft: DraftOutput, base_logits_btv: jax.Array, base_hidden_btd: jax.Array,
                 tokens_bt1: jax.Array, config: DistillConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Depth-weighted mean over depths of each depth's loss on its valid rows (t <= T - k - 2).

    kl: KL(base at t + k + 1 || draft); ce: cross-entropy with the text's token t + k + 2. Eagle
    adds feature_weight * smooth-L1 between its predicted features and the base's at t + k + 1.
    Metrics per depth k (1-based in names): loss_k, and top1_k, how often the draft's argmax is the
    base's argmax (teacher-forced on the text).
    """
    depth, _, t, _ = draft.logits_kbtv.shape
    base_logp_btv = jax.nn.log_softmax(base_logits_btv)
    weights = [config.depth_decay ** k for k in range(depth)]
    total, metrics = 0.0, {}
    for k in range(depth):
        rows = t - k - 1  # rows 0..T-k-2 have a target inside the window
        logp_btv = jax.nn.log_softmax(draft.logits_kbtv[k, :, :rows])
        target_logp_btv = base_logp_btv[:, k + 1:]
        if config.loss == "kl":
            loss_bt = jnp.sum(jnp.exp(target_logp_btv) * (target_logp_btv - logp_btv), axis=-1)
        else:
            loss_bt = -jnp.take_along_axis(logp_btv, tokens_bt1[:, k + 2:, None], axis=-1)[..., 0]
        loss = loss_bt.mean()
        if draft.features_kbtd is not None and config.feature_weight:
            feature_loss = optax.huber_loss(draft.features_kbtd[k, :, :rows], base_hidden_btd[:, k + 1:]).mean()
            metrics[f"feature_loss_{k + 1}"] = feature_loss
            loss = loss + config.feature_weight * feature_loss
        metrics[f"loss_{k + 1}"] = loss
        metrics[f"top1_{k + 1}"] = jnp.mean(jnp.argmax(logp_btv, -1) == jnp.argmax(target_logp_btv, -1))
        total = total + weights[k] * loss
    return total / sum(weights), metrics


def init_state_fn(base_parts: ModelParts, head_parts: HeadParts, optimizer: optax.GradientTransformation,
                  seed: int, shardings=None) -> Callable:
    """A jitted base_params -> fresh train state (heads initialised from the base), created with
    its shardings."""
    def init(base_params):
        params = head_parts.init_from_base(base_parts.merge(base_params), seed)
        return {"params": params, "opt": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    return jax.jit(init, out_shardings=shardings)


def make_distill_step(base_parts: ModelParts, head_parts: HeadParts, optimizer: optax.GradientTransformation,
                      schedule: optax.Schedule, config: DistillConfig, state_shardings=None,
                      base_shardings=None, tokens_sharding=None):
    """jit(state, base_params, tokens_bt1) -> (state, metrics); the state is donated.

    tokens_bt1 [B, T+1]: the base reads tokens[:, :-1]; ce targets come from tokens[:, 2:].
    metrics: loss, per-depth loss_k / top1_k (and feature_loss_k), grad_norm, lr.
    """
    depth = train_depth(head_parts.config, config)

    def step(state, base_params, tokens_bt1):
        base = base_parts.merge(base_params)
        out = base.forward(tokens_bt1[:, :-1])
        hidden_btd, logits_btv = jax.lax.stop_gradient(out.hidden), jax.lax.stop_gradient(out.logits)

        def loss_fn(params):
            draft = head_parts.merge(params).teacher_forced(base, hidden_btd, tokens_bt1[:, :-1], depth)
            return distill_loss(draft, logits_btv, hidden_btd, tokens_bt1, config)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt"], state["params"])
        new_state = {"params": optax.apply_updates(state["params"], updates), "opt": opt_state,
                     "step": state["step"] + 1}
        metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        return new_state, metrics

    return jax.jit(step, donate_argnums=0, in_shardings=(state_shardings, base_shardings, tokens_sharding),
                   out_shardings=(state_shardings, None))
