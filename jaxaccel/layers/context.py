"""What every attention layer of one forward pass shares: positions, the mask among the new
tokens, the row lengths — and the visibility masks derived from them, built once per pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxaccel.layers.attention import visible_keys


class ForwardContext:
    """Trace-time context of a forward pass over n new tokens per row (not a pytree).

    positions_bn: the new tokens' positions; mask_bnn: (query, key) among them; lengths_b: the
    cache's committed lengths (None without a cache); causal: mask_bnn is the default causal mask
    (kinds with a faster causal path take it); empty_cache: the cache holds nothing yet (a prefill),
    so a layer may attend among the new tokens only while it writes their K/V; duo_gates: see
    DuoAttention. Sliding windows are per layer: each layer asks for its own (`visible(max_len,
    window)`), built once per window.
    """

    def __init__(self, positions_bn: jax.Array, mask_bnn: jax.Array, lengths_b: jax.Array | None, causal: bool,
                 duo_gates: jax.Array | None = None, empty_cache: bool = False):
        self.positions_bn, self.mask_bnn, self.lengths_b = positions_bn, mask_bnn, lengths_b
        self.causal, self.empty_cache = causal, empty_cache
        self.duo_gates = duo_gates  # [layers, Hkv] in [0, 1]: duo's gate optimisation (no cache)
        self._memo: dict = {}

    def _once(self, key, build):
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def visible(self, max_len: int | None, sliding_window: int | None = None) -> jax.Array:
        """max_len None: [B, n, n] among the new tokens; else [B, n, T] over a dense cache of T slots
        (committed slots, then the new tokens at lengths_b..; see `visible_keys`), within a layer's
        `sliding_window` (None: no window)."""
        return self._once(("visible", max_len, sliding_window), lambda: visible_keys(
            self.mask_bnn, self.positions_bn, None if max_len is None else self.lengths_b, max_len,
            sliding_window))

    def key_positions(self, max_len: int | None) -> jax.Array:
        """The position of every key [B, n] (new tokens) or [B, T] (dense cache slots: committed slot
        t holds position t, new slots the new tokens' positions, unused slots -1)."""
        def build():
            if max_len is None:
                return self.positions_bn
            slot_t = jnp.arange(max_len)
            offset_bt = slot_t[None, :] - self.lengths_b[:, None]
            n = self.positions_bn.shape[1]
            new_bt = jnp.take_along_axis(self.positions_bn, jnp.clip(offset_bt, 0, n - 1), axis=1)
            return jnp.where(offset_bt < 0, slot_t[None, :], jnp.where(offset_bt < n, new_bt, -1))
        return self._once(("key_positions", max_len), build)
