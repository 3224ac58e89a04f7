"""DuoAttention entry: retrieval heads in a dense cache, streaming heads in a sink + recent ring."""

from __future__ import annotations

import jax
from flax import struct

from jaxaccel.caches.dense import DenseEntry
from jaxaccel.caches.streaming import StreamingEntry


@struct.dataclass
class DuoEntry:
    """A duo layer's cache: its retrieval heads' dense entry and its streaming heads' ring."""
    retrieval: DenseEntry | None  # [B, T, H_retrieval, D]; None when every head streams
    streaming: StreamingEntry | None  # None when every head is a retrieval head

    def advance(self, lengths_b: jax.Array, count_b: jax.Array) -> DuoEntry:
        """Commits a prefix of the last pass's tokens in both parts (KVCache.advance)."""
        return DuoEntry(*(None if part is None else part.advance(lengths_b, count_b)
                          for part in (self.retrieval, self.streaming)))

    def keep(self, lengths_b: jax.Array, offsets_bk: jax.Array, count_b: jax.Array) -> DuoEntry:
        """Commits the accepted path's tokens in both parts (KVCache.keep)."""
        return DuoEntry(*(None if part is None else part.keep(lengths_b, offsets_bk, count_b)
                          for part in (self.retrieval, self.streaming)))
