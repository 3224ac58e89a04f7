"""Training draft heads on cached features: the shared parts.

The EAGLE-3 trainer (jaxaccel.training.eagle3) and the Hydra / Hydra++ one
(jaxaccel.training.hydra_features) never run the base: they read train.features shards (the
base's own greedy answers, its hidden states over them) and distil each draft step from the base's
next-token distribution restricted to a draft vocabulary. What they share lives here:

- FeatureTrainConfig: the hyper-parameters (recorded in the checkpoints' metadata);
- FeatureSet: the shards, the held-out split, batches as a pure function of (seed, step, shards);
- fixed_draft_vocab: the run's d2t, fixed at its first start (OUT/draft_vocab.npy);
- `depth_targets`: step k at row t drafts the token at t + k + 2, the base's prediction at t + k + 1;
- loss_and_metrics / agreement_counts / heldout_agreement: the KL divergence from the restricted
  teacher with per-depth loss and top-1, and the held-out agreement (per depth, chains);
- FeatureTraining: the trainable / fixed split of the head's parameters, the optimizer and the
  jitted step; a head kind gives what its loss reads of the base, its loss (and its evaluation).

Held out: the sequences whose key hashes to 0 mod `holdout_mod` (stable as shards are added).
Batches are a pure function of (seed, step, the shards present): a resumed run continues as an
uninterrupted one over the same shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxaccel.draft_vocab import checked_d2t, coverage, draft_vocab
from jaxaccel.heads.common import shift_left
from jaxaccel.heads.config import HeadsConfig
from jaxaccel.heads.registry import HeadParts
from jaxaccel.training import optim
from jaxaccel.training.features import read_shard
from jaxaccel.training.prompts import HOLDOUT_MOD, is_heldout


@dataclass(frozen=True)
class FeatureTrainConfig:
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
    holdout_mod: int = HOLDOUT_MOD
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    # > 0: windows anywhere in a sequence, its prompt tokens weighing this much in the loss (the base's
    # states over human-written text: more varied inputs than its own answers); 0: answers only.
    prompt_weight: float = 0.0

    # May change between a run and its resumption (prompt_weight, like added shards, changes the data).
    RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoints", "prompt_weight")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class FeatureSet:
    """Every complete feature shard under one or more directories, checked against the base and the
    head's layers. Sequences of held-out prompts are held out; with several directories (say the
    model's greedy answers, then sampled answers to the same prompts) only the first directory's
    are evaluated on, and the others' held-out prompts are skipped, so that adding data never
    changes the held-out set nor trains on its prompts."""

    def __init__(self, directories: str | os.PathLike | Sequence[str | os.PathLike], fingerprint: dict,
                 layers: tuple[int, ...], holdout_mod: int):
        if isinstance(directories, (str, os.PathLike)):
            directories = [directories]
        self.paths: list[Path] = []
        first_dir: list[bool] = []
        for n, directory in enumerate(map(Path, directories)):
            if not directory.is_dir():
                raise FileNotFoundError(f"feature directory {directory} does not exist")
            paths = sorted(p for p in directory.glob("features-*") if p.is_dir())
            if not paths:
                raise FileNotFoundError(f"no feature shards (features-*/) in {directory}: run python -m train.features")
            self.paths += paths
            first_dir += [n == 0] * len(paths)
        self.shards = [read_shard(p) for p in self.paths]
        for path, shard in zip(self.paths, self.shards):
            if shard["meta"]["base"] != fingerprint:
                raise ValueError(f"feature shard {path} was computed from another base model")
            if tuple(shard["meta"]["feature_layers"]) != tuple(layers):
                raise ValueError(f"feature shard {path} holds layers {shard['meta']['feature_layers']}, "
                                 f"the head reads {list(layers)}")
        # (shard, start, end, prompt_len) per sequence, split by key.
        self.train_seqs, self.heldout_seqs = [], []
        for i, shard in enumerate(self.shards):
            starts = shard["starts"]
            for r, key in enumerate(shard["meta"]["keys"]):
                seq = (i, int(starts[r]), int(starts[r + 1]), int(shard["prompt_lens"][r]))
                if not is_heldout(key, holdout_mod):
                    self.train_seqs.append(seq)
                elif first_dir[i]:
                    self.heldout_seqs.append(seq)
        if not self.train_seqs or not self.heldout_seqs:
            raise ValueError(f"{', '.join(map(str, directories))} hold too few sequences to split into training "
                             "and held-out ones")

    def answer_counts(self, vocab_size: int, heldout: bool = False) -> np.ndarray:
        """[V] how often the model wrote each token in the training (or held-out) sequences' answers."""
        counts = np.zeros(vocab_size, np.int64)
        for i, start, end, prompt_len in (self.heldout_seqs if heldout else self.train_seqs):
            counts += np.bincount(np.asarray(self.shards[i]["tokens"][start + prompt_len:end]), minlength=vocab_size)
        return counts

    def windows(self, seqs, offsets, seq_len: int, prompt_weight: float = 0.0) -> dict[str, np.ndarray]:
        """Windows of `seq_len` positions from each (sequence, start offset): tokens, layers (float32),
        hidden (float32), `answer` [B, T] (the token at that position is part of the answer) and
        `weight` [B, T] float32 (its weight in the loss: 1 in the answer, `prompt_weight` in the
        prompt, 0 past the sequence's end)."""
        b = len(seqs)
        d = self.shards[0]["hidden"].shape[1]
        k = self.shards[0]["layers"].shape[1]
        out = {"tokens": np.zeros((b, seq_len), np.int32), "layers": np.zeros((b, seq_len, k, d), np.float32),
               "hidden": np.zeros((b, seq_len, d), np.float32), "answer": np.zeros((b, seq_len), bool),
               "weight": np.zeros((b, seq_len), np.float32)}
        for row, ((i, start, end, prompt_len), offset) in enumerate(zip(seqs, offsets)):
            lo, hi = start + offset, min(start + offset + seq_len, end)
            shard, n = self.shards[i], hi - lo
            out["tokens"][row, :n] = shard["tokens"][lo:hi]
            out["layers"][row, :n] = shard["layers"][lo:hi]
            out["hidden"][row, :n] = shard["hidden"][lo:hi]
            out["answer"][row, :n] = np.arange(offset, offset + n) >= prompt_len
            out["weight"][row, :n] = np.where(out["answer"][row, :n], 1.0, prompt_weight)
        return out

    @staticmethod
    def first_offset(seq, seq_len: int) -> int:
        """A window that starts a little before the answer (its context), or at 0."""
        _, start, end, prompt_len = seq
        return max(0, min(prompt_len - seq_len // 8, end - start - seq_len))

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int,
              prompt_weight: float = 0.0) -> dict[str, np.ndarray]:
        """Training batch `step`: random sequences, random windows over their answers (over the
        whole sequence, prompt included, when `prompt_weight` > 0)."""
        rng = np.random.default_rng([seed, step])
        seqs = [self.train_seqs[j] for j in rng.integers(0, len(self.train_seqs), batch_size)]
        offsets = []
        for seq in seqs:
            lo = 0 if prompt_weight > 0 else self.first_offset(seq, seq_len)
            hi = max(0, seq[2] - seq[1] - seq_len // 2)
            offsets.append(int(rng.integers(lo, max(lo, hi) + 1)))
        return self.windows(seqs, offsets, seq_len, prompt_weight)

    def heldout_batches(self, batch_size: int, seq_len: int):
        """The held-out sequences, one window each from just before its answer."""
        seqs = self.heldout_seqs
        for at in range(0, len(seqs), batch_size):
            chunk = seqs[at:at + batch_size]
            yield self.windows(chunk, [self.first_offset(s, seq_len) for s in chunk], seq_len)


def fixed_draft_vocab(out_dir: Path, features: FeatureSet, size: int, vocab_size: int) -> tuple[np.ndarray, dict]:
    """d2t of this run: read back from OUT/draft_vocab.npy, or chosen now from the training
    answers' token counts (and written). Also its coverage of the training and held-out answers."""
    path = out_dir / "draft_vocab.npy"
    counts = features.answer_counts(vocab_size)
    if path.is_file():
        d2t = np.load(path)
        if d2t.shape != (size,):
            raise ValueError(f"{path} holds a draft vocabulary of {d2t.shape[0]} tokens, this run asks for {size}")
        d2t = checked_d2t(d2t, size, vocab_size)
    else:
        d2t = draft_vocab(counts, size)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / "draft_vocab.tmp.npy"
        np.save(tmp, d2t)
        os.replace(tmp, path)
    held = features.answer_counts(vocab_size, heldout=True)
    return d2t, {"size": size, "sha256": hashlib.sha256(d2t.tobytes()).hexdigest(),
                 "coverage_train": float(counts[d2t].sum() / max(counts.sum(), 1)),
                 "coverage_heldout": float(held[d2t].sum() / max(held.sum(), 1)),
                 "train_coverage_by_size": coverage(counts, [1024, 2048, 4096, 8192, 16384, 32768])}


class DepthOutputs(NamedTuple):
    """A head's drafts over a batch of windows, per draft step k (depth, or head) and row t."""
    logits_kbtn: jax.Array  # the head's logits over the draft vocabulary
    target_kbtn: jax.Array  # the base's logits for the token it drafts, restricted to the draft vocabulary
    greedy_kbt: jax.Array  # that token (the base's greedy answer)
    mask_kbt: jax.Array  # the entries that count (an answer token inside the window)
    weight_kbt: jax.Array  # each entry's weight in the loss (answer tokens 1, prompt tokens the prompt weight)


def depth_targets(teacher_btn: jax.Array, batch: dict, depth: int) -> tuple[jax.Array, ...]:
    """Step k at row t drafts the token at t + k + 2 (the base's prediction at t + k + 1): from the
    base's restricted logits after each position [B, T, N], the targets [K, B, T, N], the tokens
    [K, B, T], the entries that count [K, B, T] (False past a window's end, as is the target's row)
    and their loss weights [K, B, T] (the batch's `weight`, or the answer mask)."""
    weight_bt = batch["weight"] if "weight" in batch else batch["answer"].astype(jnp.float32)
    return (jnp.stack([shift_left(teacher_btn, k + 1) for k in range(depth)]),
            jnp.stack([shift_left(batch["tokens"], k + 2) for k in range(depth)]),
            jnp.stack([shift_left(batch["answer"], k + 2) for k in range(depth)]),
            jnp.stack([shift_left(weight_bt, k + 2) for k in range(depth)]))


def _hits(out: DepthOutputs, d2t_n: jax.Array | None) -> jax.Array:
    """[K, B, T] the head's top draft (mapped through d2t, if any) is the base's greedy token."""
    top_kbt = jnp.argmax(out.logits_kbtn, axis=-1)
    return (top_kbt if d2t_n is None else d2t_n[top_kbt]) == out.greedy_kbt


def loss_and_metrics(out: DepthOutputs, d2t_n: jax.Array | None, depth_decay: float):
    """(depth-weighted KL divergence from the base's restricted distribution, {loss, loss_k, top1_k}):
    each entry weighted by its loss weight (the answer's tokens 1), step k by `depth_decay ** k`;
    top-1 over the answer's tokens. d2t_n maps the head's draft indices to token ids (None: they
    are token ids)."""
    depth = out.logits_kbtn.shape[0]
    logp_kbtn = jax.nn.log_softmax(out.target_kbtn, axis=-1)  # KL(p || q): the cross-entropy less p's entropy
    kl_kbt = jnp.sum(jnp.exp(logp_kbtn) * (logp_kbtn - jax.nn.log_softmax(out.logits_kbtn, axis=-1)), axis=-1)
    count_k = jnp.maximum(out.mask_kbt.sum(axis=(1, 2)), 1)
    loss_k = jnp.sum(kl_kbt * out.weight_kbt, axis=(1, 2)) / jnp.maximum(out.weight_kbt.sum(axis=(1, 2)), 1e-6)
    top1_k = jnp.sum(_hits(out, d2t_n) & out.mask_kbt, axis=(1, 2)) / count_k
    weights_k = depth_decay ** jnp.arange(depth)
    loss = jnp.sum(weights_k * loss_k) / jnp.sum(weights_k)
    return loss, {"loss": loss, **{f"loss_{k}": loss_k[k] for k in range(depth)},
                  **{f"top1_{k}": top1_k[k] for k in range(depth)}}


def agreement_counts(out: DepthOutputs, d2t_n: jax.Array | None):
    """Per step: (greedy tokens matched, entries); chains: (sum of consecutive matches from step 0,
    chains with every step inside the answer)."""
    hit_kbt = _hits(out, d2t_n) & out.mask_kbt
    full_bt = jnp.all(out.mask_kbt, axis=0)
    run_bt = jnp.sum(jnp.cumprod(hit_kbt, axis=0), axis=0)  # consecutive hits from step 0
    return hit_kbt.sum(axis=(1, 2)), out.mask_kbt.sum(axis=(1, 2)), jnp.sum(run_bt * full_bt), full_bt.sum()


def heldout_agreement(counts: Callable[[dict], tuple], features: FeatureSet, seq_len: int, batch_size: int,
                      depth: int, draft_vocab_size: int) -> dict:
    """Per-depth top-1 agreement with the base's greedy answers on the held-out sequences, and the
    mean accepted tokens of a chain drafted with the head (the base's own token counted).
    counts(batch): `agreement_counts` of the head over one held-out batch."""
    hits, entries, runs, chains = np.zeros(depth), np.zeros(depth), 0.0, 0.0
    for batch in features.heldout_batches(batch_size, seq_len):
        h, e, r, c = jax.device_get(counts(batch))
        hits, entries, runs, chains = hits + h, entries + e, runs + r, chains + c
    return {"draft_vocab_size": draft_vocab_size, "sequences": len(features.heldout_seqs), "seq_len": seq_len,
            "depths": [{"depth": k, "top1": float(hits[k] / max(entries[k], 1)), "entries": int(entries[k])}
                       for k in range(depth)],
            "mean_accepted_chain": 1.0 + float(runs / max(chains, 1)), "chains": int(chains)}


class FeatureTraining:
    """One run: the feature set, the head's parameters and optimizer state, the jitted step.

    A head kind (`KIND`) gives `base_context(base, d2t)`, what its loss reads of the base (an
    argument of the step, never differentiated), and `loss(heads, context, batch)`. The head's
    non-float parameters (its d2t token map) are fixed; the others are trained."""

    KIND: str = ""

    def __init__(self, base, heads_config: HeadsConfig, config: FeatureTrainConfig, features: FeatureSet,
                 d2t: np.ndarray | None):
        if heads_config.kind != self.KIND:
            raise ValueError(f"feature-cache training here is for {self.KIND} heads, not {heads_config.kind!r}")
        self.heads_config, self.config, self.features = heads_config, config, features
        self.parts = HeadParts(heads_config, base.config)
        self.context = self.base_context(base, d2t)
        heads = self.parts.make(nnx.Rngs(config.seed))
        heads.init_from_base(base, d2t)
        params = self.parts.params(heads)
        self.fixed = {name: v for name, v in params.items() if not jnp.issubdtype(v.dtype, jnp.floating)}  # d2t
        self.initial = {name: v for name, v in params.items() if name not in self.fixed}
        self.schedule = optim.lr_schedule(config.lr, config.steps, config.warmup_steps, config.min_lr_ratio)
        self.optimizer = optim.make_optimizer(self.schedule, weight_decay=config.weight_decay,
                                              clip_norm=config.clip_norm)
        self._step = jax.jit(self._update, donate_argnums=0)

    def base_context(self, base, d2t: np.ndarray | None) -> Any:
        """What the loss reads of the base (a pytree of arrays; a head kind's)."""
        raise NotImplementedError

    def loss(self, heads: nnx.Module, context: Any, batch: dict):
        """(loss, metrics) of the head over a batch (a head kind's)."""
        raise NotImplementedError

    def _update(self, state: dict, context: Any, batch: dict) -> tuple[dict, dict]:
        loss_fn = lambda trainable: self.loss(self.merge(trainable), context, batch)  # noqa: E731
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = self.optimizer.update(grads, state["opt"], state["params"])
        metrics["lr"] = self.schedule(state["step"])
        metrics["grad_norm"] = optax.tree.norm(grads)
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt,
                "step": state["step"] + 1}, metrics

    def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One update (the train loop's step_fn); the state is donated."""
        return self._step(state, self.context, batch)

    def merge(self, trainable) -> nnx.Module:
        """The head with these trainable parameters (and its fixed token map)."""
        return self.parts.merge({**trainable, **self.fixed})

    def init_state(self) -> dict:
        return {"params": self.initial, "opt": self.optimizer.init(self.initial), "step": jnp.int32(0)}

    def prepare(self, batch: dict) -> dict:
        """A FeatureSet batch as the head kind reads it (all of it, unless a kind says otherwise)."""
        return batch

    def batch(self, step: int) -> dict:
        c = self.config
        return self.prepare(self.features.batch(c.seed, step, c.batch_size, c.seq_len, c.prompt_weight))

    def heads(self, trainable) -> nnx.Module:
        """The head as a module (for save_heads)."""
        return self.merge(jax.tree.map(jnp.asarray, trainable))
