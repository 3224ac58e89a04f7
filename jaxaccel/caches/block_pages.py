"""Dense KV entry plus per-page key bounds (Quest): for each page of `page_size` slots, the
elementwise min and max of its keys, from which an upper bound of q · k over the page follows.

Only complete pages (all slots committed) are ever ranked, and a page becomes complete in the
commit that writes its last slot — so a commit recomputes just the pages the last forward pass
wrote to, O(n) per step whatever the context length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxaccel.caches.rows import compact_rows


@struct.dataclass
class PagedEntry:
    """Dense K/V in pages of page_size slots, with each page's key min / max for Quest's ranking."""
    keys: jax.Array  # [B, num_pages * page_size, Hkv, D]
    values: jax.Array
    page_min: jax.Array  # [B, num_pages, Hkv, D]
    page_max: jax.Array
    page_size: int = struct.field(pytree_node=False, default=1)
    written: int = struct.field(pytree_node=False, default=0)  # n of the last forward pass; 0 once committed

    @classmethod
    def create(cls, batch_size: int, num_heads: int, head_dim: int, page_size: int, max_len: int, dtype) -> PagedEntry:
        """Empty pages enough for max_len slots."""
        num_pages = -(-max_len // page_size)
        kv = (batch_size, num_pages * page_size, num_heads, head_dim)
        pages = (batch_size, num_pages, num_heads, head_dim)
        return cls(keys=jnp.zeros(kv, dtype), values=jnp.zeros(kv, dtype), page_min=jnp.zeros(pages, dtype),
                   page_max=jnp.zeros(pages, dtype), page_size=page_size)

    @property
    def num_pages(self) -> int:
        """Pages per row."""
        return self.page_min.shape[1]

    def with_written(self, keys, values, n: int) -> PagedEntry:
        """This entry after a forward pass wrote n new K/V at the rows' lengths (bounds not yet refreshed)."""
        return self.replace(keys=keys, values=values, written=n)

    def _refresh_pages(self, keys_bthd: jax.Array, lengths_b: jax.Array) -> PagedEntry:
        """Recomputes the bounds of the pages holding slots lengths_b .. lengths_b + written - 1."""
        p = self.page_size
        count = min(self.num_pages, -(-self.written // p) + 1)
        first_b = jnp.minimum(lengths_b // p, self.num_pages - count)

        def one_row(keys_thd, min_phd, max_phd, first):
            pages_cphd = jax.lax.dynamic_slice_in_dim(keys_thd, first * p, count * p).reshape(
                (count, p) + keys_thd.shape[1:])
            new_min = jax.lax.dynamic_update_slice_in_dim(min_phd, pages_cphd.min(axis=1), first, 0)
            new_max = jax.lax.dynamic_update_slice_in_dim(max_phd, pages_cphd.max(axis=1), first, 0)
            return new_min, new_max

        page_min, page_max = jax.vmap(one_row)(keys_bthd, self.page_min, self.page_max, first_b)
        return self.replace(keys=keys_bthd, page_min=page_min, page_max=page_max, written=0)

    def advance(self, lengths_b: jax.Array, count_b: jax.Array) -> PagedEntry:
        """Commits a prefix of the last pass's tokens and refreshes the bounds of the pages they fill."""
        if self.written == 0:
            return self
        return self._refresh_pages(self.keys, lengths_b)

    def keep(self, lengths_b: jax.Array, offsets_bk: jax.Array, count_b: jax.Array) -> PagedEntry:
        """Moves the accepted path's K/V into place and refreshes the bounds of the pages they fill."""
        if self.written == 0:
            return self
        moved = self.replace(values=compact_rows(self.values, lengths_b, offsets_bk))
        return moved._refresh_pages(compact_rows(self.keys, lengths_b, offsets_bk), lengths_b)
