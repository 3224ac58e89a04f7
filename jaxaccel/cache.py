"""The model's cache as one pytree: a cache entry per layer (its attention kind's) and the row lengths.

The cache holds `lengths[b]` committed tokens per row; a token's position is its index in the
row. A forward pass over n new tokens records them *without* committing them (dense kinds write
their K/V at slots lengths[b]..lengths[b]+n-1, others keep them pending); the caller then keeps
what it accepts: `advance(count_b)` keeps a prefix (prefill, plain decoding, chains),
`keep(offsets_bk, count_b)` keeps the new tokens at the given offsets, in order (an accepted path
through a token tree). Entry types live in jaxaccel.caches; which one a layer gets is the
attention kind's (jaxaccel.layers.attention_kinds).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxaccel.caches.rows import write_rows  # noqa: F401  (re-exported: layers write K/V rows with it)
from jaxaccel.config import ModelConfig


@struct.dataclass
class KVCache:
    """The whole model's cache: one entry per layer (its attention kind's type) and the rows' lengths."""
    layers: tuple  # one cache entry per layer (jaxaccel.caches)
    lengths: jax.Array  # [B] int32
    max_len: int = struct.field(pytree_node=False, default=0)  # tokens a row can hold (positions 0..max_len-1)

    @classmethod
    def create(cls, config: ModelConfig, batch_size: int, max_len: int, dtype=None, sliding: str = "ring") -> KVCache:
        """An empty cache for `batch_size` rows of up to `max_len` tokens each. Sliding-window layers
        of the full kind keep a ring of `sliding_window` slots (sliding="ring") or, as a reference
        that must give the same output, a dense cache like every other layer ("dense")."""
        from jaxaccel.layers.attention_kinds import attention_kind  # the kinds import this module

        if max_len > config.max_position_embeddings:
            raise ValueError(
                f"cache length {max_len} is longer than the model's context "
                f"({config.max_position_embeddings} positions)")
        if sliding not in ("ring", "dense"):
            raise ValueError(f"unknown sliding cache {sliding!r}; expected 'ring' or 'dense'")
        dtype = jnp.dtype(dtype or config.dtype)

        def entry(i: int):
            kind = config.layer_kind(i)
            extra = {"sliding": sliding} if kind == "full" else {}
            return attention_kind(kind).create_entry(config, i, batch_size, max_len, dtype, **extra)

        # Every layer gets its own buffers, so that the cache can be donated.
        entries = tuple(entry(i) for i in range(config.num_layers))
        return cls(layers=entries, lengths=jnp.zeros((batch_size,), jnp.int32), max_len=max_len)

    @property
    def batch_size(self) -> int:
        """Rows in the cache."""
        return self.lengths.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (every entry's buffers and the lengths)."""
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def advance(self, count_b: jax.Array) -> KVCache:
        """Commits the first count_b[b] tokens written by the last forward pass."""
        count_b = jnp.broadcast_to(jnp.asarray(count_b, jnp.int32), self.lengths.shape)
        return self.replace(layers=tuple(e.advance(self.lengths, count_b) for e in self.layers),
                            lengths=self.lengths + count_b)

    def keep(self, offsets_bk: jax.Array, count_b: jax.Array) -> KVCache:
        """Commits the new tokens at offsets_bk[b, :count_b[b]] (relative to lengths[b]), in that order.

        Entries of offsets_bk past count_b are ignored. The cost is O(k) per layer (plus the
        page bounds of block-sparse layers), independent of the cache length.
        """
        count_b = jnp.broadcast_to(jnp.asarray(count_b, jnp.int32), self.lengths.shape)
        return self.replace(layers=tuple(e.keep(self.lengths, offsets_bk, count_b) for e in self.layers),
                            lengths=self.lengths + count_b)
