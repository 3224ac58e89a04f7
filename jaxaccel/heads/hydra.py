"""Hydra: sequentially dependent heads — head k also sees the tokens before the one it drafts.

Head k reads the hidden state h_t at the last verified position t and the embeddings (the base's
table) of the k + 1 tokens at t+1 .. t+k+1 — the base's next token, then the tokens drafted by
heads 0..k-1 — and drafts the token at t + k + 2. Its input [h_t, e_1, ..., e_{k+1}] is projected
to d (starting as the identity on h_t), then residual SiLU blocks and an LM head as in medusa.
In training the tokens are teacher-forced from the text.

Hydra++ option `prefix_layer`: one causal decoder layer over the base's hidden states, whose
output replaces h_t. It has a KV cache of its own (a one-layer KVCache) at inference.

Drafting API (issue 6), static shapes per depth:

    h_bnd, pcache = heads.prefix(base_hidden_bnd, positions_bn, cache=pcache)   # only with prefix_layer:
        # run it over the newly verified tokens' hidden states, then pcache.advance / keep as the base's cache
    logits_bnn = heads.head(base, k, h_bnd, path_tokens_bnj)   # j = k + 1 tokens per tree node at depth k
    tokens_bnr = heads.target_tokens(top ranks of logits_bnn)

where path_tokens_bnj[b, i] are the tokens on the path to node i of depth k (the root token
first) and h_bnd is h_t broadcast over the n nodes. With a trimmed draft vocabulary
(`draft_vocab_size` N > 0) the logits cover the N draft tokens and `target_tokens` maps their
ranks through `d2t` (jaxaccel.heads.common); otherwise N = V. The path's tokens are target ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxaccel.cache import KVCache
from jaxaccel.config import ModelConfig
from jaxaccel.draft_vocab import DraftVocab
from jaxaccel.heads.common import (DraftOutput, DraftVocabMixin, ResidualHeads, decoder_config, param,
                                   run_decoder_layer, shift_left, zero_residual_branches)
from jaxaccel.heads.config import HeadsConfig
from jaxaccel.model import DecoderLayer, Transformer


class HydraHeads(DraftVocabMixin, nnx.Module):
    """Hydra heads: head k reads the base's state and the drafted path's token embeddings
    (sequentially dependent drafts), with an optional prefix layer (Hydra++).
    `init_from_base(base, d2t)` (DraftVocabMixin) sets them up."""

    def __init__(self, config: HeadsConfig, base_config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.layer_config = decoder_config(base_config)
        self.prefix_layer = DecoderLayer(self.layer_config, rngs=rngs) if config.prefix_layer else None
        if self.prefix_layer is not None:
            zero_residual_branches(self.prefix_layer)  # starts as the identity on the base's hidden states
        d, pdt = base_config.hidden_size, jnp.dtype(base_config.param_dtype)
        # Head k's input projection [(k + 2) d, d]: the identity on h_t, zero on the token embeddings.
        self.in_kernels = nnx.List([param(jnp.asarray(np.eye((k + 2) * d, d), pdt), (None, "embed"))
                                    for k in range(config.num_heads)])
        self.vocab_size = base_config.vocab_size
        self.heads = ResidualHeads(config.num_heads, config.num_blocks, config.share_lm_head, base_config,
                                   config.draft_vocab_size)
        self.d2t = DraftVocab(jnp.arange(config.draft_vocab_size, dtype=jnp.int32)) if config.draft_vocab_size else None

    def init_cache(self, batch_size: int, max_len: int) -> KVCache | None:
        """An empty cache for the prefix layer (None without one)."""
        return None if self.prefix_layer is None else KVCache.create(self.layer_config, batch_size, max_len)

    def prefix(self, hidden_bnd: jax.Array, positions_bn: jax.Array | None = None, *,
               cache: KVCache | None = None, mask: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """The heads' input states: the prefix layer over base hidden states (as Transformer.forward:
        K/V written at each row's length, not committed), or the hidden states themselves."""
        if self.prefix_layer is None:
            return hidden_bnd, cache
        return run_decoder_layer(self.prefix_layer, hidden_bnd, positions_bn, cache=cache, mask=mask)

    def head(self, base: Transformer, k: int, hidden_d: jax.Array, tokens_j: jax.Array) -> jax.Array:
        """Head k's logits [..., N] (float32, over the draft vocabulary) from heads' input states
        [..., d] and, per state, the k + 1 tokens that follow its position, tokens_j [..., k + 1]."""
        one = slice(k, k + 1)
        x_1_d = self.heads.blocks(self._project(base, k, hidden_d, tokens_j)[None], one)
        return self.heads.logits(base, x_1_d, one, self.draft_map())[0]

    def _project(self, base: Transformer, k: int, hidden_d: jax.Array, tokens_j: jax.Array) -> jax.Array:
        """Head k's input [h, e(tok_1), ..., e(tok_{k+1})] projected to [..., d]."""
        if tokens_j.shape[-1] != k + 1:
            raise ValueError(f"hydra head {k} takes {k + 1} tokens per state, got {tokens_j.shape[-1]}")
        embeds_jd = base.embed_tokens(tokens_j)
        x_d = jnp.concatenate([hidden_d.astype(embeds_jd.dtype),
                               embeds_jd.reshape(embeds_jd.shape[:-2] + (-1,))], axis=-1)
        return x_d @ self.in_kernels[k][...].astype(x_d.dtype)

    def teacher_forced(self, base: Transformer, hidden_btd: jax.Array, tokens_bt: jax.Array, depth: int) -> DraftOutput:
        """The first `depth` heads at every position, fed the text's tokens (their residual blocks and
        LM heads run batched over the heads, as in medusa); logits over the draft vocabulary."""
        h_btd, _ = self.prefix(hidden_btd)
        next_btj = jnp.stack([shift_left(tokens_bt, j) for j in range(1, depth + 1)], axis=-1)
        x_kbtd = jnp.stack([self._project(base, k, h_btd, next_btj[..., :k + 1]) for k in range(depth)])
        heads = slice(0, depth)
        logits_kbtn = self.heads.logits(base, self.heads.blocks(x_kbtd, heads), heads, self.draft_map())
        return DraftOutput(logits_kbtv=logits_kbtn)
