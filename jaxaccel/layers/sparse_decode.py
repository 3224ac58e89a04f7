"""Sparse decoding over a dense cache: each query reads only the slots it may see — a sink, a
local window, (Quest) selected pages and the new tokens — gathered into a short key list, so a
step's cost follows the token budget instead of the context length.

Slots are positions (a committed slot s holds position s). Segments never overlap (pages skip
the sink and the local window; the local window skips the sink), so softmax sees every visible
key exactly once: the result equals masked attention over the whole cache with the same mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxaccel.layers.attention import MASKED


def top_pages(bounds_bknp: jax.Array, candidate_bnp: jax.Array, budget_pages: int) -> tuple[jax.Array, jax.Array]:
    """(page index [B, Hkv, n, K], chosen [B, Hkv, n, K]): the best K = min(budget, P) candidates."""
    scores = jnp.where(candidate_bnp[:, None], bounds_bknp, -jnp.inf)
    values, index = jax.lax.top_k(scores, min(budget_pages, scores.shape[-1]))
    return index, values > -jnp.inf


def segment_slots(lengths_b, pos_bn, num_heads: int, sink_len: int, local_start_bn, local_len: int,
                  page_index_bknk=None, page_chosen_bknk=None, page_size: int = 1):
    """Committed slots a query reads, [B, Hkv, n, S], and whether each is real (a visible key)."""
    b, n = pos_bn.shape
    committed = lengths_b[:, None, None]
    sink = jnp.broadcast_to(jnp.arange(sink_len), (b, n, sink_len))
    local = local_start_bn[:, :, None] + jnp.arange(local_len)
    parts = [(sink, sink < committed), (local, (local >= sink_len) & (local < committed))]
    slots = jnp.concatenate([s for s, _ in parts], axis=-1)
    real = jnp.concatenate([r for _, r in parts], axis=-1)
    slots = jnp.broadcast_to(slots[:, None], (b, num_heads) + slots.shape[1:])
    real = jnp.broadcast_to(real[:, None], slots.shape)
    if page_index_bknk is not None:
        pages = (page_index_bknk[..., None] * page_size + jnp.arange(page_size)).reshape(b, num_heads, n, -1)
        chosen = jnp.repeat(page_chosen_bknk, page_size, axis=-1)
        outside = (pages >= sink_len) & (pages < local_start_bn[:, None, :, None]) & (pages < committed[:, None])
        slots = jnp.concatenate([slots, pages], axis=-1)
        real = jnp.concatenate([real, chosen & outside], axis=-1)
    return slots, real


def gathered_attention(q_bnkgd, keys_bthd, values_bthd, slots_bkns, real_bkns, lengths_b, new_visible_bknn):
    """Softmax over the gathered committed slots plus the n new tokens (at slots lengths_b..)."""
    b, n, hkv, group, d = q_bnkgd.shape
    t = keys_bthd.shape[1]
    new_slots = lengths_b[:, None] + jnp.arange(n)
    slots = jnp.concatenate([slots_bkns, jnp.broadcast_to(new_slots[:, None, None], (b, hkv, n, n))], axis=-1)
    real = jnp.concatenate([real_bkns, new_visible_bknn], axis=-1)
    slots = jnp.clip(slots, 0, t - 1)

    def gather(cache_bthd):  # -> [B, Hkv, n, S, D]
        per_head = cache_bthd.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
        flat = slots.reshape(b, hkv, -1)
        return jnp.take_along_axis(per_head, flat[..., None], axis=2).reshape(slots.shape + (d,))

    k_bknsd, v_bknsd = gather(keys_bthd), gather(values_bthd)
    scores = jnp.einsum("bnkgd,bknsd->bkgns", q_bnkgd, k_bknsd, preferred_element_type=jnp.float32) * d**-0.5
    scores = jnp.where(real[:, :, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bknsd.dtype)
    return jnp.einsum("bkgns,bknsd->bnkgd", probs, v_bknsd).reshape(b, n, hkv * group, d)
