"""A trimmed draft vocabulary (VocabTrim; EAGLE-3's draft-to-target map).

A draft head's LM head over the whole vocabulary costs as much as a slice of the base (SmolLM2:
49,152 x 576, 113 MB in float32; Gemma 3: 262,144 rows). Drafting over only the N target tokens
the model itself writes most often costs N / V of that, and loses nothing in correctness: the
verify pass still scores the full vocabulary, so a token outside the draft vocabulary is simply
never proposed. What it can lose is acceptance, bounded by how much of the model's own output the
N tokens cover (`coverage`).

`d2t` [N] int32: draft index -> target token id (most frequent first); a draft head's logits over
N rows are mapped back with `d2t[argmax]`, or scattered into V with `to_target_logits`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class DraftVocab(nnx.Variable):
    """A head's d2t map as a module variable: saved with the head, never trained."""


def answer_token_counts(responses_dir: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """[V] int64: how often the model wrote each token in its answers (train.responses shards)."""
    counts = np.zeros(vocab_size, np.int64)
    shards = sorted(Path(responses_dir).glob("shard-*.jsonl"))
    if not shards:
        raise FileNotFoundError(f"no train.responses shards (shard-*.jsonl) in {responses_dir}")
    for shard in shards:
        for line in shard.read_text().splitlines():
            ids = np.asarray(json.loads(line)["response_ids"], np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"{shard} holds token ids outside a vocabulary of {vocab_size}")
            counts += np.bincount(ids, minlength=vocab_size)
    return counts


def draft_vocab(counts_v: np.ndarray, size: int) -> np.ndarray:
    """d2t [size] int32: the `size` most frequent target ids, most frequent first (ties: lower id)."""
    if not 0 < size <= counts_v.shape[0]:
        raise ValueError(f"draft vocabulary size must be in 1..{counts_v.shape[0]}, got {size}")
    order = np.lexsort((np.arange(counts_v.shape[0]), -counts_v))  # by count descending, then id
    return order[:size].astype(np.int32)


def coverage(counts_v: np.ndarray, sizes) -> dict[int, float]:
    """For each size N: the share of the counted tokens that the N most frequent ones cover."""
    total = max(int(counts_v.sum()), 1)
    ranked = np.sort(counts_v)[::-1].cumsum()
    return {int(n): float(ranked[min(n, len(ranked)) - 1] / total) for n in sizes}


def checked_d2t(d2t, size: int, vocab_size: int) -> np.ndarray:
    """d2t as int32 [size], after checking that it is `size` distinct token ids below `vocab_size`."""
    d2t = np.asarray(d2t)
    if d2t.shape != (size,) or not np.issubdtype(d2t.dtype, np.integer):
        raise ValueError(f"d2t must be {size} token ids (the draft vocabulary size), got shape {d2t.shape} "
                         f"of {d2t.dtype}")
    if d2t.min() < 0 or d2t.max() >= vocab_size:
        raise ValueError(f"d2t holds token ids outside a vocabulary of {vocab_size} "
                         f"(range {d2t.min()}..{d2t.max()})")
    if np.unique(d2t).size != size:
        raise ValueError("d2t repeats a token id: a draft vocabulary lists each token once")
    return d2t.astype(np.int32)


def to_target_logits(draft_logits_bn: jax.Array, d2t: jax.Array, vocab_size: int) -> jax.Array:
    """Draft logits [..., N] as target logits [..., V]: -inf outside the draft vocabulary, so a
    sampled or top-k draft can only be a draft-vocabulary token."""
    full = jnp.full((*draft_logits_bn.shape[:-1], vocab_size), -jnp.inf, draft_logits_bn.dtype)
    return full.at[..., d2t].set(draft_logits_bn)
