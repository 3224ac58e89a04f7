"""Recurrent state of a linear-attention layer: S = sum_s exp(G_last - G_s) k_s v_s^T, [B, H, D, D].

A forward pass leaves the new tokens' k, v and log-decays in `pending`; `advance` / `keep` fold
the committed ones into the state, in order (for a tree: the accepted path). Memory is constant
in the context length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxaccel.caches.rows import take_rows


def fold_into_state(state_bhde: jax.Array, k_bnhd: jax.Array, v_bnhd: jax.Array, log_decay_bnh: jax.Array,
                    count_b: jax.Array) -> jax.Array:
    """The state after the first count_b[b] of n tokens (exponents are all <= 0)."""
    n = k_bnhd.shape[1]
    live_bn = jnp.arange(n)[None, :] < count_b[:, None]
    g_bnh = jnp.where(live_bn[:, :, None], log_decay_bnh.astype(jnp.float32), 0.0)
    cum_bnh = jnp.cumsum(g_bnh, axis=1)
    total_bh = cum_bnh[:, -1]
    weight_bnh = jnp.exp(jnp.where(live_bn[:, :, None], total_bh[:, None] - cum_bnh, -jnp.inf))
    update = jnp.einsum("bnh,bnhd,bnhe->bhde", weight_bnh, k_bnhd.astype(jnp.float32), v_bnhd.astype(jnp.float32))
    return jnp.exp(total_bh)[:, :, None, None] * state_bhde + update


@struct.dataclass
class LinearStateEntry:
    """A linear-attention layer's recurrent state, with the last pass's k, v and decays pending."""
    state: jax.Array  # [B, H, D, D] float32
    pending_keys: jax.Array | None = None  # [B, n, H, D]
    pending_values: jax.Array | None = None
    pending_log_decay: jax.Array | None = None  # [B, n, H]

    @classmethod
    def create(cls, batch_size: int, num_heads: int, head_dim: int) -> LinearStateEntry:
        """A zero state."""
        return cls(state=jnp.zeros((batch_size, num_heads, head_dim, head_dim), jnp.float32))

    def with_pending(self, k_bnhd, v_bnhd, log_decay_bnh) -> LinearStateEntry:
        """This entry with a forward pass's new k, v and log-decays pending (not yet folded in)."""
        return self.replace(pending_keys=k_bnhd, pending_values=v_bnhd, pending_log_decay=log_decay_bnh)

    def advance(self, lengths_b: jax.Array, count_b: jax.Array) -> LinearStateEntry:
        """Folds the first count_b pending tokens into the state (KVCache.advance)."""
        if self.pending_keys is None:
            return self
        count_b = jnp.broadcast_to(jnp.asarray(count_b, jnp.int32), lengths_b.shape)
        return LinearStateEntry(state=fold_into_state(self.state, self.pending_keys, self.pending_values,
                                                      self.pending_log_decay, count_b))

    def keep(self, lengths_b: jax.Array, offsets_bk: jax.Array, count_b: jax.Array) -> LinearStateEntry:
        """Folds the pending tokens at offsets_bk, in order, into the state (KVCache.keep)."""
        if self.pending_keys is None:
            return self
        path = self.with_pending(take_rows(self.pending_keys, offsets_bk), take_rows(self.pending_values, offsets_bk),
                                 take_rows(self.pending_log_decay, offsets_bk))
        return path.advance(lengths_b, count_b)
