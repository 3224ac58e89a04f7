"""Row-wise writes and gathers shared by the cache entries."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_rows(cache_bthd: jax.Array, new_bnhd: jax.Array, start_b: jax.Array) -> jax.Array:
    """Writes new_bnhd[b] at slots start_b[b]..start_b[b]+n-1 of each row."""
    def write_one(row_thd, new_nhd, start):
        start_index = (start,) + (0,) * (row_thd.ndim - 1)
        return jax.lax.dynamic_update_slice(row_thd, new_nhd.astype(row_thd.dtype), start_index)

    return jax.vmap(write_one)(cache_bthd, new_bnhd, start_b)


def take_rows(x_bn_: jax.Array, index_bk: jax.Array) -> jax.Array:
    """x[b, index_bk[b, k]] for an array [B, n, ...] (indices clipped into range)."""
    index_bk = jnp.clip(index_bk, 0, x_bn_.shape[1] - 1)
    return jnp.take_along_axis(x_bn_, index_bk.reshape(index_bk.shape + (1,) * (x_bn_.ndim - 2)), axis=1)


def compact_rows(cache_bthd: jax.Array, lengths_b: jax.Array, offsets_bk: jax.Array) -> jax.Array:
    """Moves the slots lengths_b + offsets_bk[b, i] to lengths_b + i (an accepted tree path). O(k) per row."""
    picked_bkhd = take_rows(cache_bthd, lengths_b[:, None] + offsets_bk)
    return write_rows(cache_bthd, picked_bkhd, lengths_b)
