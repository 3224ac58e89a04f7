"""Dense KV entry (full attention): slot t holds the token at position t."""

from __future__ import annotations

import jax
from flax import struct

from jaxaccel.caches.rows import compact_rows


@struct.dataclass
class DenseEntry:
    """Keys and values of every position, slot t = position t (full attention, duo's retrieval heads)."""
    keys: jax.Array  # [B, T, Hkv, D]
    values: jax.Array  # [B, T, Hkv, D]

    @property
    def max_len(self) -> int:
        """Slots per row."""
        return self.keys.shape[1]

    def advance(self, lengths_b: jax.Array, count_b: jax.Array) -> DenseEntry:
        """Commits a prefix of the last pass's tokens (KVCache.advance): they are already in place."""
        return self  # the forward pass already wrote the K/V at their slots

    def keep(self, lengths_b: jax.Array, offsets_bk: jax.Array, count_b: jax.Array) -> DenseEntry:
        """Moves the accepted tokens' K/V (offsets_bk past lengths_b) to the slots right after lengths_b."""
        return DenseEntry(keys=compact_rows(self.keys, lengths_b, offsets_bk),
                          values=compact_rows(self.values, lengths_b, offsets_bk))
