"""Medusa: K independent heads over the base model's last hidden state.

Head k reads the hidden state h_t at the last verified position t and drafts the token at t + k + 2
(the base's own LM head gives t + 1). Each head is residual SiLU blocks, zero-initialised so that
it starts as the identity on h_t, then an LM head (a trained copy of the base's, or the base's own).

Drafting API (issue 6): all heads at once, on any leading shape,

    logits_kbv = heads(base, hidden_bd)          # [K, B, V]: head k's guess for position t + k + 2

then pick top-k per head and lay the candidates out as a static tree of rank paths. No cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel.config import ModelConfig
from jaxaccel.heads.common import DraftOutput, ResidualHeads
from jaxaccel.heads.config import HeadsConfig
from jaxaccel.model import Transformer


class MedusaHeads(nnx.Module):
    """Medusa heads: K residual heads over the base's last verified hidden state h_t; head k drafts
    the token at t + k + 2."""

    def __init__(self, config: HeadsConfig, base_config: ModelConfig, *, rngs: nnx.Rngs):
        del rngs  # zero-initialised blocks, LM heads copied from the base: nothing random
        self.config = config
        self.heads = ResidualHeads(config.num_heads, config.num_blocks, config.share_lm_head, base_config)

    def init_from_base(self, base: Transformer) -> None:
        """Copies the base's LM head into each head's own (no-op when shared)."""
        self.heads.init_from_base(base)

    def __call__(self, base: Transformer, hidden_d: jax.Array, depth: int | None = None) -> jax.Array:
        """The logits [depth, ..., V] (float32) of the first `depth` heads (default all) from hidden
        states [..., d]."""
        heads = slice(0, self.config.num_heads if depth is None else depth)
        x_k_d = jnp.broadcast_to(hidden_d, (heads.stop,) + hidden_d.shape)
        return self.heads.logits(base, self.heads.blocks(x_k_d, heads), heads)

    def teacher_forced(self, base: Transformer, hidden_btd: jax.Array, tokens_bt: jax.Array, depth: int) -> DraftOutput:
        """The first `depth` heads at every position (tokens are not an input of medusa heads)."""
        return DraftOutput(logits_kbtv=self(base, hidden_btd, depth))
