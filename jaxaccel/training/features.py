"""The base model's features over its own answers, computed once and cached on disk for head training.

EAGLE-3's draft layer reads a fusion of a low, a middle and a high layer of the base (the residual
stream after those layers) and trains against the base's next-token distribution (its final,
normed hidden state through the LM head). Head epochs must not rerun a 30-layer base, so one pass
over every answered prompt stores, per token: the three layers' states and the final hidden state,
in float16 (the heads train in float32; float16 keeps 11 bits, enough for inputs and for logits
recomputed from the hidden state over a trimmed vocabulary).

A shard directory (`features-00000/`, one per responses shard, renamed into place when complete):
    tokens.npy        [N] int32     every sequence (prompt + answer) concatenated
    starts.npy        [R + 1] int64 sequence r is tokens[starts[r]:starts[r + 1]]
    prompt_lens.npy   [R] int32     its first prompt_lens[r] tokens are the prompt
    layers.npy        [N, 3, d] float16   residual stream after each of `feature_layers`
    hidden.npy        [N, d] float16      final hidden state (after the final norm)
    meta.json         keys, feature layers, model fingerprint
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxaccel.model import Transformer, run_layers

FILES = ("tokens.npy", "starts.npy", "prompt_lens.npy", "layers.npy", "hidden.npy", "meta.json")


def feature_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low, middle and high layers (0-based, the state after that layer): 2, L // 2, L - 3."""
    if num_layers < 4:
        return (0, num_layers // 2, num_layers - 1)
    return (2, num_layers // 2, num_layers - 3)


def layer_features(model: Transformer, tokens_bt: jax.Array, layers: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(states after each of `layers` [B, T, len(layers), d], final normed hidden [B, T, d]) of full
    causal sequences: the same computation as `model.forward` without a cache, read at the cuts."""
    if list(layers) != sorted(layers) or not 0 <= layers[0] <= layers[-1] < len(model.layers):
        raise ValueError(f"feature layers must be ascending layer indices of the model, got {layers}")
    x_btd = model.embed_tokens(tokens_bt)
    states, done = [], 0
    for cut in (*layers, len(model.layers) - 1):
        if cut + 1 > done:  # a repeated cut reads the same state again
            x_btd, _, _ = run_layers(model.layers[done:cut + 1], x_btd)
            done = cut + 1
        states.append(x_btd)
    return jnp.stack(states[:-1], axis=2), model.norm(states[-1])


@functools.partial(jax.jit, static_argnums=3)
def _features(graphdef, params, tokens_bt, layers):
    return layer_features(nnx.merge(graphdef, params), tokens_bt, layers)


class FeatureExtractor:
    """Runs `layer_features` jitted over padded batches (lengths bucketed to multiples of 64)."""

    def __init__(self, model: Transformer, layers: tuple[int, ...] | None = None):
        self.layers = tuple(layers or feature_layers(model.config.num_layers))
        self.graphdef, self.params = nnx.split(model)
        self.context = model.config.max_position_embeddings

    def __call__(self, sequences: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence: (layers [T, k, d] float16, hidden [T, d] float16)."""
        longest = max(map(len, sequences))
        if longest > self.context:
            raise ValueError(f"a sequence of {longest} tokens is longer than the model's context ({self.context})")
        width = min(-(-longest // 64) * 64, self.context)
        tokens_bt = np.zeros((len(sequences), width), np.int32)  # right padding: causal, so it changes nothing
        for row, seq in zip(tokens_bt, sequences):
            row[:len(seq)] = seq
        layers_btkd, hidden_btd = jax.device_get(_features(self.graphdef, self.params, tokens_bt, self.layers))
        return [(layers_btkd[b, :len(s)].astype(np.float16), hidden_btd[b, :len(s)].astype(np.float16))
                for b, s in enumerate(sequences)]


def write_shard(out: Path, records: list[dict], extractor: FeatureExtractor, fingerprint: dict,
                batch_size: int = 4) -> Path:
    """Features of every record (`prompt_ids` + `response_ids`) into the shard directory `out`,
    built under a temporary name and renamed into place when complete."""
    sequences = [r["prompt_ids"] + r["response_ids"] for r in records]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths batch together
    computed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for i, feats in zip(rows, extractor([sequences[i] for i in rows])):
            computed[i] = feats
    starts = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        np.save(build / "tokens.npy", np.concatenate([np.asarray(s, np.int32) for s in sequences]))
        np.save(build / "starts.npy", starts)
        np.save(build / "prompt_lens.npy", np.array([len(r["prompt_ids"]) for r in records], np.int32))
        np.save(build / "layers.npy", np.concatenate([computed[i][0] for i in range(len(sequences))]))
        np.save(build / "hidden.npy", np.concatenate([computed[i][1] for i in range(len(sequences))]))
        (build / "meta.json").write_text(json.dumps({"keys": [r["key"] for r in records],
                                                     "feature_layers": list(extractor.layers),
                                                     "base": fingerprint}))
        build.chmod(0o755)
        os.replace(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return out


def read_shard(path: str | os.PathLike, mmap: bool = True) -> dict:
    """A feature shard's arrays (memory-mapped) and meta; a missing file is named."""
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"feature shard {path} is incomplete: missing {missing}")
    mode = "r" if mmap else None
    shard = {f.removesuffix(".npy"): np.load(path / f, mmap_mode=mode) for f in FILES if f.endswith(".npy")}
    shard["meta"] = json.loads((path / "meta.json").read_text())
    return shard
