"""Constant-size cache of a streaming head: the first `sink` tokens plus a ring of recent ones.

Slots 0..sink_slots-1 hold positions 0..sink_slots-1; recent slot sink_slots + i holds the latest
committed position q >= sink_slots with (q - sink_slots) % ring_slots == i. A forward pass does
not touch the ring: it leaves the n new K/V in `pending` (any n, a whole prompt included), and
`advance` / `keep` write only the committed ones — so uncommitted tree nodes and prompt padding
never overwrite a recent token that is still needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxaccel.caches.rows import take_rows


def slot_positions(lengths_b: jax.Array, sink_slots: int, ring_slots: int) -> tuple[jax.Array, jax.Array]:
    """(position [B, S+R] held by each slot after lengths_b tokens, whether the slot holds one)."""
    slot = jnp.arange(sink_slots + ring_slots)
    last_b1 = lengths_b[:, None] - 1
    # The latest q <= L - 1 with (q - sink) % ring == slot - sink (meaningless for sink slots).
    ring_pos = last_b1 - jnp.mod(last_b1 - sink_slots - (slot[None, :] - sink_slots), ring_slots)
    position = jnp.where(slot[None, :] < sink_slots, slot[None, :], ring_pos)
    held = jnp.where(slot[None, :] < sink_slots, slot[None, :] < lengths_b[:, None], ring_pos >= sink_slots)
    return position, held


def commit_to_ring(ring_bshd: jax.Array, new_bnhd: jax.Array, lengths_b: jax.Array, count_b: jax.Array,
                   sink_slots: int) -> jax.Array:
    """The ring after committing new_bnhd[b, :count_b[b]] at positions lengths_b[b]..: a gather, so
    that a prompt longer than the ring writes each slot once (its latest position)."""
    ring_slots = ring_bshd.shape[1] - sink_slots
    position_bs, held_bs = slot_positions(lengths_b + count_b, sink_slots, ring_slots)
    offset_bs = position_bs - lengths_b[:, None]  # index among the new tokens
    fresh_bs = held_bs & (offset_bs >= 0)
    new_bshd = take_rows(new_bnhd, offset_bs).astype(ring_bshd.dtype)
    return jnp.where(fresh_bs[:, :, None, None], new_bshd, ring_bshd)


@struct.dataclass
class StreamingEntry:
    """Sink + recent ring of a layer's streaming heads, with the last pass's K/V pending (module doc)."""
    keys: jax.Array  # [B, sink_slots + ring_slots, Hs, D]
    values: jax.Array
    pending_keys: jax.Array | None = None  # [B, n, Hs, D]: the last forward pass's, not committed
    pending_values: jax.Array | None = None
    sink_slots: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def create(cls, batch_size: int, num_heads: int, head_dim: int, sink: int, recent: int, max_len: int,
               dtype) -> StreamingEntry:
        """Room for `sink` + `recent` tokens, or less when no row can grow that long (max_len)."""
        sink_slots = min(sink, max_len)
        ring_slots = max(1, min(recent, max_len - sink_slots))
        shape = (batch_size, sink_slots + ring_slots, num_heads, head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype), sink_slots=sink_slots)

    @property
    def ring_slots(self) -> int:
        """Slots of the recent ring."""
        return self.keys.shape[1] - self.sink_slots

    def with_pending(self, keys_bnhd: jax.Array, values_bnhd: jax.Array) -> StreamingEntry:
        """This entry with a forward pass's new K/V pending (not yet committed)."""
        return self.replace(pending_keys=keys_bnhd, pending_values=values_bnhd)

    def held(self, lengths_b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(position, held) of every slot for rows of lengths_b committed tokens."""
        return slot_positions(lengths_b, self.sink_slots, self.ring_slots)

    def advance(self, lengths_b: jax.Array, count_b: jax.Array) -> StreamingEntry:
        """Writes the first count_b pending tokens into the sink / ring (KVCache.advance)."""
        if self.pending_keys is None:
            return self
        count_b = jnp.asarray(count_b, jnp.int32)
        return StreamingEntry(
            keys=commit_to_ring(self.keys, self.pending_keys, lengths_b, count_b, self.sink_slots),
            values=commit_to_ring(self.values, self.pending_values, lengths_b, count_b, self.sink_slots),
            sink_slots=self.sink_slots)

    def keep(self, lengths_b: jax.Array, offsets_bk: jax.Array, count_b: jax.Array) -> StreamingEntry:
        """Writes the pending tokens at offsets_bk, in order, into the sink / ring (KVCache.keep)."""
        if self.pending_keys is None:
            return self
        path = self.replace(pending_keys=take_rows(self.pending_keys, offsets_bk),
                            pending_values=take_rows(self.pending_values, offsets_bk))
        return path.advance(lengths_b, count_b)
