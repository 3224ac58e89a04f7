"""Passkey retrieval built from corpus text: a needle line `PASSKEY = 48213` hidden at a random
depth in real (Python standard-library) code, then `assert PASSKEY == ` and the key's digits.

Used to optimise DuoAttention's gates (train.retrieval_heads) and to measure retrieval accuracy
(infer.bench --long-context). Accuracy is exact match of greedy decoding, computed in one pass:
the prompt is prefilled into the cache and the answer is scored teacher-forced over the cache
(every kind's multi-token cache pass equals step-by-step decoding), so all answer tokens argmax
right <=> greedy decoding writes the key.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

NEEDLE = "\nPASSKEY = {key}\n"
QUESTION = "\nassert PASSKEY == "


@dataclass(frozen=True)
class PasskeyBatch:
    tokens_bt: np.ndarray  # [B, T] int32: filler with the needle, the question, the answer
    answer_start: int  # the answer's tokens are tokens_bt[:, answer_start:]
    keys: tuple[str, ...]

    @property
    def answer_len(self) -> int:
        return self.tokens_bt.shape[1] - self.answer_start


def passkey_batch(tokenizer, filler_tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                  digits: int = 5) -> PasskeyBatch:
    """`batch_size` sequences of exactly `seq_len` tokens; filler windows from `filler_tokens` (a
    token stream of one split), needle depth uniform over the filler. Keys have `digits` digits and
    each is tokenized the same length (re-drawn otherwise), so that the batch is rectangular."""
    rng = np.random.default_rng(seed)
    question = tokenizer.encode(QUESTION).ids
    rows, keys, answer_len = [], [], None
    while len(rows) < batch_size:
        key = str(rng.integers(10 ** (digits - 1), 10**digits))
        answer = tokenizer.encode(key).ids
        if answer_len is not None and len(answer) != answer_len:
            continue
        answer_len = len(answer)
        needle = tokenizer.encode(NEEDLE.format(key=key)).ids
        filler_len = seq_len - len(needle) - len(question) - len(answer)
        if filler_len < 1 or len(filler_tokens) <= filler_len:
            raise ValueError(f"seq_len {seq_len} leaves no room for filler around the passkey, "
                             f"or the filler stream ({len(filler_tokens)} tokens) is too short")
        start = int(rng.integers(0, len(filler_tokens) - filler_len))
        filler = filler_tokens[start:start + filler_len].tolist()
        depth = int(rng.integers(0, filler_len + 1))
        rows.append(filler[:depth] + needle + filler[depth:] + question + answer)
        keys.append(key)
    return PasskeyBatch(np.asarray(rows, np.int32), seq_len - answer_len, tuple(keys))


def passkey_accuracy(model, batch: PasskeyBatch, cache_len: int | None = None) -> float:
    """Fraction of rows whose key greedy decoding would write exactly (see the module docstring)."""
    from jaxaccel.cache import KVCache
    from flax import nnx

    tokens = jnp.asarray(batch.tokens_bt)
    b, t = tokens.shape
    split = batch.answer_start - 1  # the last question token predicts the first answer token
    graphdef, state = nnx.split(model)
    cache = KVCache.create(model.config, b, cache_len or t)
    right_b = np.asarray(_score(graphdef, state, cache, tokens, split))
    return float(right_b.mean())


@functools.partial(jax.jit, static_argnums=(0, 4))
def _score(graphdef, state, cache, tokens_bt, split):
    from flax import nnx

    model = nnx.merge(graphdef, state)
    b = tokens_bt.shape[0]
    cache = model.prefill(tokens_bt[:, :split], jnp.full((b,), split, jnp.int32), cache).cache
    logits = model.forward(tokens_bt[:, split:-1], cache=cache).logits
    return jnp.all(jnp.argmax(logits, -1) == tokens_bt[:, split + 1:], axis=-1)
