"""Dense KV entry (full attention): slot t holds the token at position t."""

from __future__ import annotations

import jax
from flax import struct

from jaxaccel.caches.rows import compact_rows


@struct.dataclass
class DenseEntry:
    keys: jax.Array  # [B, T, Hkv, D]
    values: jax.Array  # [B, T, Hkv, D]

    @property
    def max_len(self) -> int:
        return self.keys.shape[1]

    def advance(self, lengths_b: jax.Array, count_b: jax.Array) -> DenseEntry:
        return self  # the forward pass already wrote the K/V at their slots

    def keep(self, lengths_b: jax.Array, offsets_bk: jax.Array, count_b: jax.Array) -> DenseEntry:
        return DenseEntry(keys=compact_rows(self.keys, lengths_b, offsets_bk),
                          values=compact_rows(self.values, lengths_b, offsets_bk))
