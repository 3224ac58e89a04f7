"""KV cache as a pytree.

The cache holds `lengths[b]` committed tokens per row, at slots 0..lengths[b]-1, and slot t holds
the token at position t. A forward pass over n new tokens writes their K/V at slots
lengths[b]..lengths[b]+n-1 *without* committing them; the caller then keeps what it accepts:
`advance(count_b)` keeps a prefix (prefill, plain decoding, chains), `keep(offsets_bk, count_b)`
keeps the new tokens at the given offsets, in order (an accepted path through a token tree).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxaccel.config import ModelConfig


@struct.dataclass
class KVCache:
    keys: tuple[jax.Array, ...]  # per layer [B, T, Hkv, D]
    values: tuple[jax.Array, ...]  # per layer [B, T, Hkv, D]
    lengths: jax.Array  # [B] int32

    @classmethod
    def create(cls, config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache for `batch_size` rows of up to `max_len` tokens each."""
        if max_len > config.max_position_embeddings:
            raise ValueError(
                f"cache length {max_len} is longer than the model's context "
                f"({config.max_position_embeddings} positions)")
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (batch_size, max_len, config.num_kv_heads, config.resolved_head_dim)
        # Every layer's keys and values get their own buffer, so that the cache can be donated.
        def zeros():
            return tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))

        return cls(keys=zeros(), values=zeros(), lengths=jnp.zeros((batch_size,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.keys + self.values)

    def advance(self, count_b: jax.Array) -> KVCache:
        """Commits the first count_b[b] tokens written by the last forward pass."""
        return self.replace(lengths=self.lengths + jnp.asarray(count_b, jnp.int32))

    def keep(self, offsets_bk: jax.Array, count_b: jax.Array) -> KVCache:
        """Commits the new tokens at offsets_bk[b, :count_b[b]] (relative to lengths[b]), in that order.

        Entries of offsets_bk past count_b are ignored. Moving K/V rows costs O(k) per layer,
        independent of the cache length.
        """
        slots_bk = self.lengths[:, None] + offsets_bk

        def compact(cache_bthd):
            picked_bkhd = jnp.take_along_axis(cache_bthd, slots_bk[:, :, None, None], axis=1)
            return write_rows(cache_bthd, picked_bkhd, self.lengths)

        return KVCache(
            keys=tuple(compact(k) for k in self.keys),
            values=tuple(compact(v) for v in self.values),
            lengths=self.lengths + jnp.asarray(count_b, jnp.int32),
        )


def write_rows(cache_bthd: jax.Array, new_bnhd: jax.Array, start_b: jax.Array) -> jax.Array:
    """Writes new_bnhd[b] at slots start_b[b]..start_b[b]+n-1 of each row."""
    def write_one(row_thd, new_nhd, start):
        return jax.lax.dynamic_update_slice(row_thd, new_nhd.astype(row_thd.dtype), (start, 0, 0))

    return jax.vmap(write_one)(cache_bthd, new_bnhd, start_b)
