"""Medusa: K independent heads over the base model's last hidden state.

Head k reads the hidden state h_t at the last verified position t and drafts the token at t + k + 2
(the base's own LM head gives t + 1). Each head is residual SiLU blocks, zero-initialised so that
it starts as the identity on h_t, then an LM head (a trained copy of the base's, or the base's own).

Drafting API (issue 6): all heads at once, on any leading shape,

    logits_kbn = heads(base, hidden_bd)          # [K, B, N]: head k's guess for position t + k + 2
    tokens_kbr = heads.target_tokens(top ranks of logits_kbn)

then pick top-k per head and lay the candidates out as a static tree of rank paths. No cache.
With a trimmed draft vocabulary (`draft_vocab_size` N > 0) the logits cover the N draft tokens
and `target_tokens` maps their ranks through `d2t` (jaxaccel.heads.common); otherwise N = V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel.config import ModelConfig
from jaxaccel.draft_vocab import DraftVocab
from jaxaccel.heads.common import DraftOutput, DraftVocabMixin, ResidualHeads
from jaxaccel.heads.config import HeadsConfig
from jaxaccel.model import Transformer


class MedusaHeads(DraftVocabMixin, nnx.Module):
    """Medusa heads: K residual heads over the base's last verified hidden state h_t; head k drafts
    the token at t + k + 2. `init_from_base(base, d2t)` (DraftVocabMixin) sets them up."""

    def __init__(self, config: HeadsConfig, base_config: ModelConfig, *, rngs: nnx.Rngs):
        del rngs  # zero-initialised blocks, LM heads copied from the base: nothing random
        self.config = config
        self.vocab_size = base_config.vocab_size
        self.heads = ResidualHeads(config.num_heads, config.num_blocks, config.share_lm_head, base_config,
                                   config.draft_vocab_size)
        self.d2t = DraftVocab(jnp.arange(config.draft_vocab_size, dtype=jnp.int32)) if config.draft_vocab_size else None

    def __call__(self, base: Transformer, hidden_d: jax.Array, depth: int | None = None) -> jax.Array:
        """The logits [depth, ..., N] (float32, over the draft vocabulary) of the first `depth` heads
        (default all) from hidden states [..., d]."""
        heads = slice(0, self.config.num_heads if depth is None else depth)
        x_k_d = jnp.broadcast_to(hidden_d, (heads.stop,) + hidden_d.shape)
        return self.heads.logits(base, self.heads.blocks(x_k_d, heads), heads, self.draft_map())

    def teacher_forced(self, base: Transformer, hidden_btd: jax.Array, tokens_bt: jax.Array, depth: int) -> DraftOutput:
        """The first `depth` heads at every position (tokens are not an input of medusa heads);
        logits over the draft vocabulary."""
        return DraftOutput(logits_kbtv=self(base, hidden_btd, depth))
