"""The optimizer: AdamW with linear warmup + cosine decay and global-norm clipping (optax).

Gradient accumulation is not an optimizer wrapper here: the train step averages the gradients
of its micro-batches itself (see jaxaccel.training.steps), so one step is one optimizer update
whatever the accumulation, and the learning-rate schedule counts optimizer updates.
"""

from __future__ import annotations

import jax
import optax


def lr_schedule(lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.1) -> optax.Schedule:
    """0 -> `lr` linearly over `warmup_steps`, then cosine down to `lr * min_lr_ratio` at `total_steps`."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=lr * min_lr_ratio)


def decay_mask(params):
    """Weight decay on matrices (kernels, embeddings) only, not on norm scales and biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.1, clip_norm: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8) -> optax.GradientTransformation:
    """Clip by global norm (None: no clipping), then AdamW with the schedule."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
