"""REST's datastore, as static hash tables: for every context of 1..K tokens in a corpus of the
model's own answers, the continuations that followed it most often.

    store = build_store(read_corpus(["data/distill/smollm2-135m-instruct/responses"]),
                        max_ngram=4, depth=2, branches=1, vocab_size=49152)
    drafts_bcd, found_b = lookup(store, recent_bk)     # inside jit

REST (He et al., 2024) retrieves continuations of the longest suffix of the text that occurs in a
datastore (a suffix array) and drafts a trie of the most frequent ones. Here the retrieval is
precomputed: each context (its k tokens) hashes to a slot of one table shared by every k (open
addressing with linear probing, the most frequent contexts placed first, so they sit where their
hash points; a lookup reads `probes` slots, the longest displacement + 1); the slot keeps a 32-bit
fingerprint of the context (a second hash) and its `branches` continuations of `depth` tokens:
the most frequent first tokens, each followed by the continuation written most often after it.
A lookup is two gathers per k, so drafting costs next to nothing inside the compiled loop. A false
fingerprint match (about one in 2^31 lookups) only proposes a wrong draft, which verification
rejects: the output never depends on the store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxaccel.drafters.common import NO_TOKEN

_FNV_PRIME = 0x01000193


@struct.dataclass
class Store:
    fingerprint_h: jax.Array  # [H] uint32: each slot's context fingerprint (0: empty)
    drafts_hcd: jax.Array  # [H, branches, depth] int32 continuations (0 past a text's end)
    probes: int = struct.field(pytree_node=False)  # slots a lookup reads, from the context's hash on


def context_hash(xp, tokens_nk, seed: int):
    """[n] uint32 hash of each row of k tokens (numpy or jax.numpy: the same bits in both)."""
    h = xp.full(tokens_nk.shape[:-1], seed, dtype=xp.uint32)
    for i in range(tokens_nk.shape[-1]):  # FNV-1a over whole tokens, then a murmur finaliser
        h = (h ^ tokens_nk[..., i].astype(xp.uint32)) * xp.uint32(_FNV_PRIME)
    h = (h ^ (h >> 16)) * xp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * xp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _slot_seed(k: int) -> int:
    return (0x811C9DC5 + 0x9E3779B1 * k) % 2**32


def _fingerprint_seed(k: int) -> int:
    return (0x2545F491 + 0x632BE5AB * k) % 2**32


def read_corpus(paths: Iterable[str | os.PathLike]) -> list[list[int]]:
    """The answers (`response_ids`) of every `*.jsonl` under each path (train.responses' shards)."""
    sequences = []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.rglob("*.jsonl"))
        for file in files:
            with file.open() as f:
                sequences += [row["response_ids"] for row in map(json.loads, f) if "response_ids" in row]
    if not sequences:
        raise FileNotFoundError(f"no answers (jsonl rows with response_ids) under {', '.join(map(str, paths))}")
    return sequences


def _flatten(sequences: Sequence[Sequence[int]], depth: int) -> np.ndarray:
    """The texts end to end, each followed by NO_TOKEN, then `depth` more (no window runs off the end)."""
    return np.concatenate([np.append(np.asarray(s, np.int64), NO_TOKEN) for s in sequences] +
                          [np.full(depth, NO_TOKEN)])


def _occurrences(flat: np.ndarray, k: int, depth: int):
    """(contexts [n, k], continuations [n, depth]) at every position of `_flatten`'s texts with k
    tokens before it; a continuation stops (NO_TOKEN) at its text's end."""
    windows = np.lib.stride_tricks.sliding_window_view(flat, k + depth)
    context_nk, continuation_nd = windows[:, :k], windows[:, k:]
    keep = np.all(context_nk >= 0, axis=1) & (continuation_nd[:, 0] >= 0)
    continuation_nd = np.where(np.cumsum(continuation_nd[keep] < 0, axis=1) > 0, NO_TOKEN, continuation_nd[keep])
    return context_nk[keep], continuation_nd


def _group_starts(*columns) -> np.ndarray:
    """Indices where any of the (sorted) columns changes value, 0 included."""
    change = np.zeros(len(columns[0]), bool)
    change[0] = True
    for c in columns:
        change[1:] |= c[1:] != c[:-1]
    return np.flatnonzero(change)


def build_store(sequences: Sequence[Sequence[int]], *, max_ngram: int, depth: int, branches: int,
                vocab_size: int) -> tuple[Store, dict]:
    """The store over `sequences` (token ids < vocab_size) and a summary: contexts, slots, probes."""
    flat = _flatten(sequences, depth)
    separators = len(sequences) + depth  # the only negative entries a valid corpus leaves
    if np.count_nonzero(flat < 0) != separators or flat.max() >= vocab_size:
        raise ValueError(f"the corpus holds token ids outside the model's vocabulary [0, {vocab_size})")
    slot_hash, fingerprint, continuation = [], [], []
    for k in range(1, max_ngram + 1):
        context_nk, continuation_nd = _occurrences(flat, k, depth)
        slot_hash.append(context_hash(np, context_nk, _slot_seed(k)))
        fingerprint.append(context_hash(np, context_nk, _fingerprint_seed(k)) | np.uint32(1))
        continuation.append(continuation_nd)
    # A context is (slot hash, fingerprint): 64 bits.
    key_n = (np.concatenate(slot_hash).astype(np.int64) << 32) | np.concatenate(fingerprint).astype(np.int64)
    rows = np.unique(np.concatenate([key_n[:, None], np.concatenate(continuation)], axis=1), axis=0,
                     return_counts=True)
    rows_nr, count_n = rows
    key_n, first_n = rows_nr[:, 0], rows_nr[:, 1]
    # Per (context, first token): its count and its most frequent continuation (ties: the smallest).
    order = np.lexsort((-count_n, first_n, key_n))  # stable: equal counts keep the sorted order
    rows_nr, count_n, key_n, first_n = rows_nr[order], count_n[order], key_n[order], first_n[order]
    starts = _group_starts(key_n, first_n)
    group_total = np.add.reduceat(count_n, starts)
    group_key, group_first, group_continuation = key_n[starts], first_n[starts], rows_nr[starts, 1:]
    # Per context: its `branches` most frequent first tokens (ties: the smallest token).
    order = np.lexsort((group_first, -group_total, group_key))
    group_key, group_total, group_continuation = group_key[order], group_total[order], group_continuation[order]
    key_starts = _group_starts(group_key)
    rank = np.arange(len(group_key)) - np.repeat(key_starts, np.diff(np.append(key_starts, len(group_key))))
    context_total = np.add.reduceat(group_total, key_starts)
    contexts = len(key_starts)
    size = 1 << int(np.ceil(np.log2(max(2 * contexts, 2))))
    slot_of_context, probes = _place(group_key[key_starts] >> 32, context_total, size)
    fingerprint_h = np.zeros(size, np.uint32)
    drafts_hcd = np.zeros((size, branches, depth), np.int32)
    context_of_group = np.repeat(np.arange(contexts), np.diff(np.append(key_starts, len(group_key))))
    fingerprint_h[slot_of_context] = (group_key[key_starts] & 0xFFFFFFFF).astype(np.uint32)
    use = rank < branches
    drafts_hcd[slot_of_context[context_of_group[use]], rank[use]] = np.maximum(group_continuation[use], 0)
    summary = {"sequences": len(sequences), "tokens": int(flat.size - separators), "contexts": contexts, "slots": size,
               "probes": probes}
    return Store(fingerprint_h=jnp.asarray(fingerprint_h), drafts_hcd=jnp.asarray(drafts_hcd), probes=probes), summary


def _place(slot_hash_c: np.ndarray, priority_c: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """([contexts] each context's slot, probes): in rounds, every context not yet placed tries the
    next slot from its hash; of those trying a free slot, the most frequent takes it."""
    pending = np.argsort(-priority_c, kind="stable")
    slot_c = np.full(len(slot_hash_c), -1, np.int64)
    taken = np.zeros(size, bool)
    probe = 0
    while pending.size:
        target = (slot_hash_c[pending] + probe) & (size - 1)
        free = np.flatnonzero(~taken[target])
        _, first = np.unique(target[free], return_index=True)  # one context per slot: the most frequent
        winners = free[first]
        slot_c[pending[winners]] = target[winners]
        taken[target[winners]] = True
        pending = pending[slot_c[pending] < 0]
        probe += 1
    return slot_c, probe


def lookup(store: Store, recent_bk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """([B, branches, depth] int32 drafts, [B] found) for the longest context among the last k
    tokens of each row (`recent_bk`, NO_TOKEN where the text is shorter) that the store holds."""
    b, max_ngram = recent_bk.shape
    size = store.fingerprint_h.shape[0]
    drafts_bcd = jnp.zeros((b,) + store.drafts_hcd.shape[1:], jnp.int32)
    found_b = jnp.zeros((b,), bool)
    for k in range(max_ngram, 0, -1):  # the longest context first
        context_bk = recent_bk[:, max_ngram - k:]
        fingerprint_b = context_hash(jnp, context_bk, _fingerprint_seed(k)) | jnp.uint32(1)
        slot_bp = context_hash(jnp, context_bk, _slot_seed(k))[:, None] + jnp.arange(store.probes, dtype=jnp.uint32)
        slot_bp = (slot_bp & jnp.uint32(size - 1)).astype(jnp.int32)
        match_bp = store.fingerprint_h[slot_bp] == fingerprint_b[:, None]
        slot_b = jnp.take_along_axis(slot_bp, jnp.argmax(match_bp, axis=1)[:, None], axis=1)[:, 0]
        hit_b = ~found_b & jnp.all(context_bk >= 0, axis=1) & jnp.any(match_bp, axis=1)
        drafts_bcd = jnp.where(hit_b[:, None, None], store.drafts_hcd[slot_b], drafts_bcd)
        found_b |= hit_b
    return drafts_bcd, found_b
