"""Training an EAGLE-3 head (jaxaccel.heads.eagle3) on cached base features, never re-running the base.

The features (train.features: the base's states after its low/middle/high layers and its final
hidden state over its own greedy answers) are all the base contributes, plus its embedding table
(frozen token inputs) and its LM-head rows of the draft vocabulary (the targets). The loss, at
each of the `depth` unrolled draft steps (training-time test), is the cross-entropy of the head's
draft-vocabulary distribution against the base's next-token distribution restricted to the
draft vocabulary (softmax of the cached hidden state over those LM-head rows; reported as the
KL divergence, the same gradient), on answer tokens
only, step s weighted `depth_decay ** s`. No feature regression (EAGLE-3 drops it).

    FEATURES_DIR/features-0000k/    train.features shards (one base, the head's feature layers)
    OUT/draft_vocab.npy             d2t, fixed at the run's first start (answer-token counts of its shards)
    OUT/checkpoints/                orbax train states: rerun the same command to resume
    OUT/metrics.jsonl, tb/          loss and per-depth top-1 per step
    OUT/heads.safetensors, heads_config.json, eval.json

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

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxaccel.draft_vocab import coverage, draft_vocab
from jaxaccel.heads.config import HeadsConfig
from jaxaccel.heads.common import base_lm_kernel
from jaxaccel.heads.eagle3 import Eagle3Heads, truncate_draft_vocab
from jaxaccel.heads.registry import HeadParts
from jaxaccel.training import optim
from jaxaccel.training.features import read_shard
from jaxaccel.training.prompts import HOLDOUT_MOD, is_heldout


@dataclass(frozen=True)
class Eagle3TrainConfig:
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

    RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoints")  # may change between a run and its resumption

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class FeatureSet:
    """Every complete feature shard under a directory, checked against the base and the head's layers."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict, layers: tuple[int, ...], holdout_mod: int):
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"feature directory {directory} does not exist")
        paths = sorted(p for p in directory.glob("features-*") if p.is_dir())
        if not paths:
            raise FileNotFoundError(f"no feature shards (features-*/) in {directory}: run python -m train.features")
        self.shards = [read_shard(p) for p in paths]
        self.names = [p.name for p in paths]
        for name, shard in zip(self.names, self.shards):
            if shard["meta"]["base"] != fingerprint:
                raise ValueError(f"feature shard {directory / name} was computed from another base model")
            if tuple(shard["meta"]["feature_layers"]) != tuple(layers):
                raise ValueError(f"feature shard {directory / name} holds layers {shard['meta']['feature_layers']}, "
                                 f"the head reads {list(layers)}")
        # (shard, start, end, prompt_len) per sequence, split by key.
        self.train_seqs, self.heldout_seqs = [], []
        for i, shard in enumerate(self.shards):
            starts = shard["starts"]
            for r, key in enumerate(shard["meta"]["keys"]):
                seq = (i, int(starts[r]), int(starts[r + 1]), int(shard["prompt_lens"][r]))
                held = is_heldout(key, holdout_mod)
                (self.heldout_seqs if held else self.train_seqs).append(seq)
        if not self.train_seqs or not self.heldout_seqs:
            raise ValueError(f"{directory} holds too few sequences to split into training and held-out ones")

    def answer_counts(self, vocab_size: int, heldout: bool = False) -> np.ndarray:
        """[V] how often the model wrote each token in the training (or held-out) sequences' answers."""
        counts = np.zeros(vocab_size, np.int64)
        for i, start, end, prompt_len in (self.heldout_seqs if heldout else self.train_seqs):
            counts += np.bincount(np.asarray(self.shards[i]["tokens"][start + prompt_len:end]), minlength=vocab_size)
        return counts

    def windows(self, seqs, offsets, seq_len: int) -> dict[str, np.ndarray]:
        """Windows of `seq_len` positions from each (sequence, start offset): tokens, layers (float32),
        hidden (float32), and `answer` [B, T] (the token at that position is part of the answer)."""
        b = len(seqs)
        d = self.shards[0]["hidden"].shape[1]
        k = self.shards[0]["layers"].shape[1]
        out = {"tokens": np.zeros((b, seq_len), np.int32), "layers": np.zeros((b, seq_len, k, d), np.float32),
               "hidden": np.zeros((b, seq_len, d), np.float32), "answer": np.zeros((b, seq_len), bool)}
        for row, ((i, start, end, prompt_len), offset) in enumerate(zip(seqs, offsets)):
            lo, hi = start + offset, min(start + offset + seq_len, end)
            shard, n = self.shards[i], hi - lo
            out["tokens"][row, :n] = shard["tokens"][lo:hi]
            out["layers"][row, :n] = shard["layers"][lo:hi]
            out["hidden"][row, :n] = shard["hidden"][lo:hi]
            out["answer"][row, :n] = np.arange(offset, offset + n) >= prompt_len
        return out

    @staticmethod
    def first_offset(seq, seq_len: int) -> int:
        """A window that starts a little before the answer (its context), or at 0."""
        _, start, end, prompt_len = seq
        return max(0, min(prompt_len - seq_len // 8, end - start - seq_len))

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        """Training batch `step`: random sequences, random windows over their answers."""
        rng = np.random.default_rng([seed, step])
        seqs = [self.train_seqs[j] for j in rng.integers(0, len(self.train_seqs), batch_size)]
        offsets = []
        for seq in seqs:
            lo, hi = self.first_offset(seq, seq_len), max(0, seq[2] - seq[1] - seq_len // 2)
            offsets.append(int(rng.integers(lo, max(lo, hi) + 1)))
        return self.windows(seqs, offsets, seq_len)

    def heldout_batches(self, batch_size: int, seq_len: int):
        """The held-out sequences, one window each from just before its answer."""
        seqs = self.heldout_seqs
        for at in range(0, len(seqs), batch_size):
            chunk = seqs[at:at + batch_size]
            yield self.windows(chunk, [self.first_offset(s, seq_len) for s in chunk], seq_len)


def _shift(x_bt, j: int):
    """x[:, t + j] at row t, zero-padded past the end."""
    pad = [(0, 0), (0, j)] + [(0, 0)] * (x_bt.ndim - 2)
    return jnp.pad(x_bt[:, j:], pad)


def unrolled_outputs(heads: Eagle3Heads, embed_vd: jax.Array, rows_dn: jax.Array, batch: dict, depth: int):
    """The head's draft logits [D, B, T, N] over a batch of windows, the base's target logits for
    each step restricted to the draft vocabulary (`rows_dn`: its LM-head rows) [D, B, T, N], the
    greedy token each entry drafts [D, B, T] and the entries that count (answer tokens) [D, B, T]."""
    tokens_bt = batch["tokens"]
    fused_btd = heads.fuse(batch["layers"])
    embeds_btd = embed_vd[_shift(tokens_bt, 1)]
    states_kbtd = heads.unrolled(fused_btd, embeds_btd, depth)
    logits_kbtn = heads.draft_logits(states_kbtd)
    target_btn = batch["hidden"] @ rows_dn  # the base's logits after each position, draft rows only
    targets, greedy, masks = [], [], []
    for s in range(depth):  # step s at row t drafts the token at t + s + 2 (the base's prediction at t + s + 1)
        targets.append(_shift(target_btn, s + 1))
        greedy.append(_shift(tokens_bt, s + 2))
        masks.append(_shift(batch["answer"], s + 2))  # False past a window's end, so is the target's row
    return logits_kbtn, jnp.stack(targets), jnp.stack(greedy), jnp.stack(masks)


def loss_and_metrics(heads: Eagle3Heads, embed_vd: jax.Array, rows_dn: jax.Array, batch: dict, depth: int,
                     depth_decay: float):
    """(weighted KL divergence from the base's restricted distribution, {loss_k, top1_k}) over a batch of windows."""
    logits_kbtn, target_kbtn, greedy_kbt, mask_kbt = unrolled_outputs(heads, embed_vd, rows_dn, batch, depth)
    logp_kbtn = jax.nn.log_softmax(target_kbtn, axis=-1)  # KL(p || q): the cross-entropy less p's entropy
    ce_kbt = jnp.sum(jnp.exp(logp_kbtn) * (logp_kbtn - jax.nn.log_softmax(logits_kbtn, axis=-1)), axis=-1)
    count_k = jnp.maximum(mask_kbt.sum(axis=(1, 2)), 1)
    loss_k = jnp.sum(ce_kbt * mask_kbt, axis=(1, 2)) / count_k
    hit_kbt = heads.d2t[...][jnp.argmax(logits_kbtn, axis=-1)] == greedy_kbt
    top1_k = jnp.sum(hit_kbt & mask_kbt, axis=(1, 2)) / count_k
    weights_k = depth_decay ** jnp.arange(depth)
    loss = jnp.sum(weights_k * loss_k) / jnp.sum(weights_k)
    metrics = {"loss": loss, **{f"loss_{s}": loss_k[s] for s in range(depth)},
               **{f"top1_{s}": top1_k[s] for s in range(depth)}}
    return loss, metrics


def agreement_counts(heads: Eagle3Heads, embed_vd: jax.Array, rows_dn: jax.Array, batch: dict, depth: int):
    """Per step: (greedy tokens matched, entries); chains: (sum of consecutive matches from step 0,
    chains with every step inside the answer)."""
    logits_kbtn, _, greedy_kbt, mask_kbt = unrolled_outputs(heads, embed_vd, rows_dn, batch, depth)
    hit_kbt = (heads.d2t[...][jnp.argmax(logits_kbtn, axis=-1)] == greedy_kbt) & mask_kbt
    full_bt = jnp.all(mask_kbt, axis=0)
    run_bt = jnp.sum(jnp.cumprod(hit_kbt, axis=0), axis=0)  # consecutive hits from step 0
    return hit_kbt.sum(axis=(1, 2)), mask_kbt.sum(axis=(1, 2)), jnp.sum(run_bt * full_bt), full_bt.sum()


class Eagle3Training:
    """One run: the feature set, the head's parameters and optimizer state, the jitted step."""

    def __init__(self, base, heads_config: HeadsConfig, config: Eagle3TrainConfig, features: FeatureSet,
                 out_dir: str | os.PathLike, d2t: np.ndarray):
        self.heads_config, self.config, self.features = heads_config, config, features
        self.out_dir = Path(out_dir)
        self.parts = HeadParts(heads_config, base.config)
        # All the base contributes: its (frozen) token embeddings and its LM-head rows of the draft tokens.
        self.embed_vd = jnp.asarray(base.embed_tokens.embedding[...])
        self.rows_dn = base_lm_kernel(base)[:, jnp.asarray(d2t)]
        heads = Eagle3Heads(heads_config, base.config, rngs=nnx.Rngs(config.seed))
        heads.init_from_base(base, d2t)
        params = self.parts.params(heads)
        self.fixed = {name: v for name, v in params.items() if not jnp.issubdtype(v.dtype, jnp.floating)}
        self.initial = {name: v for name, v in params.items() if name not in self.fixed}
        self.schedule = optim.lr_schedule(config.lr, config.steps, config.warmup_steps, config.min_lr_ratio)
        self.optimizer = optim.make_optimizer(self.schedule, weight_decay=config.weight_decay, clip_norm=config.clip_norm)
        depth, decay = heads_config.num_heads, config.depth_decay

        def loss_fn(trainable, batch):
            return loss_and_metrics(self.merge(trainable), self.embed_vd, self.rows_dn, batch, depth, decay)

        def step(state, batch):
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
            updates, opt = self.optimizer.update(grads, state["opt"], state["params"])
            metrics["lr"] = self.schedule(state["step"])
            metrics["grad_norm"] = optax.global_norm(grads)
            return {"params": optax.apply_updates(state["params"], updates), "opt": opt,
                    "step": state["step"] + 1}, metrics

        self.step = jax.jit(step, donate_argnums=0)

    def merge(self, trainable) -> Eagle3Heads:
        """The head with these trainable parameters (and its fixed token map)."""
        return self.parts.merge({**trainable, **self.fixed})

    def init_state(self) -> dict:
        return {"params": self.initial, "opt": self.optimizer.init(self.initial), "step": jnp.int32(0)}

    def batch(self, step: int) -> dict:
        c = self.config
        return self.features.batch(c.seed, step, c.batch_size, c.seq_len)

    def evaluate(self, trainable, size: int | None = None) -> dict:
        """Held-out agreement (`heldout_agreement`) of the head, or of it cut to its `size` most
        frequent draft tokens (`truncate_draft_vocab`)."""
        heads, rows_dn = self.heads(trainable), self.rows_dn
        if size is not None:
            heads, rows_dn = truncate_draft_vocab(heads, size), rows_dn[:, :size]
        return heldout_agreement(heads, self.embed_vd, rows_dn, self.features, self.config.seq_len,
                                 self.config.batch_size)

    def heads(self, trainable) -> Eagle3Heads:
        """The head as a module (for save_heads)."""
        return self.merge(jax.tree.map(jnp.asarray, trainable))


def heldout_agreement(heads: Eagle3Heads, embed_vd: jax.Array, rows_dn: jax.Array, features: FeatureSet,
                      seq_len: int, batch_size: int) -> dict:
    """Per-depth top-1 agreement with the base's greedy answers on the held-out sequences, and the
    mean accepted tokens of a chain drafted with the head (the base's own token counted)."""
    depth = heads.config.num_heads
    graphdef, state = nnx.split(heads)
    counts = jax.jit(lambda state, batch: agreement_counts(nnx.merge(graphdef, state), embed_vd, rows_dn, batch, depth))
    hits, entries, runs, chains = np.zeros(depth), np.zeros(depth), 0.0, 0.0
    for batch in features.heldout_batches(batch_size, seq_len):
        h, e, r, c = jax.device_get(counts(state, batch))
        hits, entries, runs, chains = hits + h, entries + e, runs + r, chains + c
    return {"draft_vocab_size": heads.draft_vocab_size, "sequences": len(features.heldout_seqs), "seq_len": seq_len,
            "depths": [{"depth": s, "top1": float(hits[s] / max(entries[s], 1)), "entries": int(entries[s])}
                       for s in range(depth)],
            "mean_accepted_chain": 1.0 + float(runs / max(chains, 1)), "chains": int(chains)}


def fixed_draft_vocab(out_dir: Path, features: FeatureSet, size: int, vocab_size: int) -> tuple[np.ndarray, dict]:
    """d2t of this run: read back from OUT/draft_vocab.npy, or chosen now from the training
    answers' token counts (and written). Also its coverage of the training and held-out answers."""
    path = out_dir / "draft_vocab.npy"
    counts = features.answer_counts(vocab_size)
    if path.is_file():
        d2t = np.load(path)
        if d2t.shape != (size,):
            raise ValueError(f"{path} holds a draft vocabulary of {d2t.shape[0]} tokens, this run asks for {size}")
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

