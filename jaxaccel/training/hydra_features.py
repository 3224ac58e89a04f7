"""Training Hydra / Hydra++ heads (jaxaccel.heads.hydra) on cached base features, never re-running the base.

The features (train.features) hold, per token of the base's own greedy answers, its final hidden
state after the final norm: exactly what the Hydra drafter feeds the heads at inference (the
prefill's and every verify pass's `hidden`). The base contributes only its token embeddings (the
heads' frozen token inputs) and its LM-head columns of the draft vocabulary (the teacher).

Loss (teacher distillation): head k at row t reads the heads' state at t (Hydra++: the prefix
layer run causally over the window's hidden states) and the text's tokens t+1 .. t+k+1, and drafts
the token at t + k + 2. Its target is the base's next-token distribution at t + k + 1 restricted
to the draft vocabulary (softmax of the cached hidden state over those LM-head columns): the KL
divergence from it, on answer tokens only, head k weighted `depth_decay ** k`. The text is the
base's greedy answer, so teacher forcing on it is drafting along an accepted path.

The run's layout is train.eagle3's (FeatureSet, fixed_draft_vocab and the held-out split come
from jaxaccel.training.eagle3):

    OUT/draft_vocab.npy             d2t, fixed at the run's first start (absent with --draft-vocab 0)
    OUT/checkpoints/                orbax train states: rerun the same command to resume
    OUT/metrics.jsonl, tb/          loss and per-head top-1 per step
    OUT/heads.safetensors, heads_config.json, eval.json
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxaccel.heads.common import base_logits_over
from jaxaccel.heads.config import HeadsConfig
from jaxaccel.heads.hydra import HydraHeads
from jaxaccel.heads.registry import HeadParts
from jaxaccel.model import Transformer
from jaxaccel.training import optim
from jaxaccel.training.eagle3 import FeatureSet


@dataclass(frozen=True)
class HydraFeaturesConfig:
    """Hyper-parameters of a feature-cache run (recorded in the checkpoints' metadata)."""
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 128  # positions per window (mostly answer: a few prompt tokens before it)
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    depth_decay: float = 0.8
    seed: int = 0
    holdout_mod: int = 32
    checkpoint_every: int = 50
    keep_checkpoints: int = 2

    RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoints")  # may change between a run and its resumption

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _shift(x_bt: jax.Array, j: int) -> jax.Array:
    """x[:, t + j] at row t, zero (False) past the end."""
    return jnp.pad(x_bt[:, j:], [(0, 0), (0, j)] + [(0, 0)] * (x_bt.ndim - 2))


def teacher_forced_outputs(heads: HydraHeads, base: Transformer, batch: dict, depth: int):
    """Over a batch of windows (tokens, hidden, answer): the heads' logits over the draft
    vocabulary [K, B, T, N], the base's logits for the token each row drafts, restricted to the
    draft vocabulary [K, B, T, N], that token (the base's greedy answer) [K, B, T] and the rows
    that count (it is an answer token inside the window) [K, B, T]."""
    tokens_bt, hidden_btd = batch["tokens"], batch["hidden"]
    logits_kbtn = heads.teacher_forced(base, hidden_btd, tokens_bt, depth).logits_kbtv
    teacher_btn = base_logits_over(base, hidden_btd, heads.draft_map())  # the base's next token after each position
    # Head k at row t drafts the token at t + k + 2: the base's prediction at t + k + 1.
    targets = jnp.stack([_shift(teacher_btn, k + 1) for k in range(depth)])
    greedy = jnp.stack([_shift(tokens_bt, k + 2) for k in range(depth)])
    masks = jnp.stack([_shift(batch["answer"], k + 2) for k in range(depth)])
    return logits_kbtn, targets, greedy, masks


def loss_and_metrics(heads: HydraHeads, base: Transformer, batch: dict, depth: int, depth_decay: float):
    """(head-weighted KL divergence from the base's restricted distribution, {loss_k, top1_k})."""
    logits_kbtn, target_kbtn, greedy_kbt, mask_kbt = teacher_forced_outputs(heads, base, batch, depth)
    logp_kbtn = jax.nn.log_softmax(target_kbtn, axis=-1)
    kl_kbt = jnp.sum(jnp.exp(logp_kbtn) * (logp_kbtn - jax.nn.log_softmax(logits_kbtn, axis=-1)), axis=-1)
    count_k = jnp.maximum(mask_kbt.sum(axis=(1, 2)), 1)
    loss_k = jnp.sum(kl_kbt * mask_kbt, axis=(1, 2)) / count_k
    hit_kbt = heads.target_tokens(jnp.argmax(logits_kbtn, axis=-1)) == greedy_kbt
    top1_k = jnp.sum(hit_kbt & mask_kbt, axis=(1, 2)) / count_k
    weights_k = depth_decay ** jnp.arange(depth)
    loss = jnp.sum(weights_k * loss_k) / jnp.sum(weights_k)
    return loss, {"loss": loss, **{f"loss_{k}": loss_k[k] for k in range(depth)},
                  **{f"top1_{k}": top1_k[k] for k in range(depth)}}


def agreement_counts(heads: HydraHeads, base: Transformer, batch: dict, depth: int):
    """Per head: (greedy tokens matched, rows); chains: (sum of consecutive matches from head 0,
    chains with every head's token inside the answer)."""
    logits_kbtn, _, greedy_kbt, mask_kbt = teacher_forced_outputs(heads, base, batch, depth)
    hit_kbt = (heads.target_tokens(jnp.argmax(logits_kbtn, axis=-1)) == greedy_kbt) & mask_kbt
    full_bt = jnp.all(mask_kbt, axis=0)
    run_bt = jnp.sum(jnp.cumprod(hit_kbt, axis=0), axis=0)
    return hit_kbt.sum(axis=(1, 2)), mask_kbt.sum(axis=(1, 2)), jnp.sum(run_bt * full_bt), full_bt.sum()


def heldout_agreement(heads: HydraHeads, base: Transformer, features: FeatureSet, seq_len: int,
                      batch_size: int) -> dict:
    """Per-head top-1 agreement with the base's greedy answers on the held-out sequences, and the
    mean accepted tokens of a chain drafted with the heads (the base's own token counted)."""
    depth = heads.config.num_heads
    counts = nnx.jit(lambda heads, base, batch: agreement_counts(heads, base, batch, depth))
    hits, rows, runs, chains = np.zeros(depth), np.zeros(depth), 0.0, 0.0
    for batch in features.heldout_batches(batch_size, seq_len):
        h, r, n, c = jax.device_get(counts(heads, base, _without_layers(batch)))
        hits, rows, runs, chains = hits + h, rows + r, runs + n, chains + c
    return {"draft_vocab_size": heads.draft_vocab_size, "sequences": len(features.heldout_seqs), "seq_len": seq_len,
            "depths": [{"depth": k, "top1": float(hits[k] / max(rows[k], 1)), "entries": int(rows[k])}
                       for k in range(depth)],
            "mean_accepted_chain": 1.0 + float(runs / max(chains, 1)), "chains": int(chains)}


def _without_layers(batch: dict) -> dict:
    """A FeatureSet batch without the low/middle/high layer states (hydra reads the final hidden state only)."""
    return {name: value for name, value in batch.items() if name != "layers"}


class HydraFeatureTraining:
    """One run: the feature set, the heads' parameters and optimizer state, the jitted step.

    The base is an argument of the step, never differentiated: only its embedding table and LM
    head are read (the rest of it is pruned from the compiled step)."""

    def __init__(self, base: Transformer, heads_config: HeadsConfig, config: HydraFeaturesConfig,
                 features: FeatureSet, d2t: np.ndarray | None):
        if heads_config.kind != "hydra":
            raise ValueError(f"feature-cache training here is for hydra heads, not {heads_config.kind!r}")
        self.heads_config, self.config, self.features = heads_config, config, features
        self.parts = HeadParts(heads_config, base.config)
        self.base_graphdef, self.base_state = nnx.split(base)
        heads = HydraHeads(heads_config, base.config, rngs=nnx.Rngs(config.seed))
        heads.init_from_base(base, d2t)
        params = self.parts.params(heads)
        self.fixed = {name: v for name, v in params.items() if not jnp.issubdtype(v.dtype, jnp.floating)}  # d2t
        self.initial = {name: v for name, v in params.items() if name not in self.fixed}
        self.schedule = optim.lr_schedule(config.lr, config.steps, config.warmup_steps, config.min_lr_ratio)
        self.optimizer = optim.make_optimizer(self.schedule, weight_decay=config.weight_decay,
                                              clip_norm=config.clip_norm)
        depth, decay = heads_config.num_heads, config.depth_decay

        def step(state, base_state, batch):
            base = nnx.merge(self.base_graphdef, base_state)
            loss_fn = lambda trainable: loss_and_metrics(self.merge(trainable), base, batch, depth, decay)  # noqa: E731
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt = self.optimizer.update(grads, state["opt"], state["params"])
            metrics["lr"] = self.schedule(state["step"])
            metrics["grad_norm"] = optax.tree.norm(grads)
            return {"params": optax.apply_updates(state["params"], updates), "opt": opt,
                    "step": state["step"] + 1}, metrics

        self._step = jax.jit(step, donate_argnums=0)

    def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One update (the train loop's step_fn); the state is donated."""
        return self._step(state, self.base_state, batch)

    def merge(self, trainable) -> HydraHeads:
        """The heads with these trainable parameters (and their fixed token map)."""
        return self.parts.merge({**trainable, **self.fixed})

    def init_state(self) -> dict:
        return {"params": self.initial, "opt": self.optimizer.init(self.initial), "step": jnp.int32(0)}

    def batch(self, step: int) -> dict:
        c = self.config
        return _without_layers(self.features.batch(c.seed, step, c.batch_size, c.seq_len))

    def heads(self, trainable) -> HydraHeads:
        """The heads as a module (for save_heads)."""
        return self.merge(jax.tree.map(jnp.asarray, trainable))

    def evaluate(self, trainable) -> dict:
        """Held-out agreement of the heads (`heldout_agreement`)."""
        base = nnx.merge(self.base_graphdef, self.base_state)
        return heldout_agreement(self.heads(trainable), base, self.features, self.config.seq_len,
                                 self.config.batch_size)
