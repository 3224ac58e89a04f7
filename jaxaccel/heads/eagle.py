"""EAGLE-style draft heads: one decoder layer that drafts autoregressively over features.

Entry i of the draft sequence sits at position i and fuses the feature at i (the base's last
hidden state there, or the drafter's own prediction of it) with the embedding of the token at
i + 1: x_i = fc([f_i, e(tok_{i+1})]). The decoder layer (causal attention over the entries, its
own KV cache) turns x_i into a prediction of the feature at i + 1, and the base's LM head turns
that into logits for the token at i + 2. The base's embedding table and LM head are reused,
frozen. fc starts as the identity on the feature (plus a small random map of the embedding).

Training (teacher_forced, depth D) unrolls D draft steps on the drafter's own predicted features,
as inference does (EAGLE-3's training-time test): draft step s for the chain starting at real
entry i sits at position i + s and attends to the real entries 0..i and to its own chain's
earlier draft entries — a block mask over the D copies of the sequence.

Drafting API (issue 6), the base model's forward semantics with a one-layer KVCache:

    cache = heads.init_cache(B, max_len)
    # after the base's prefill of right-padded prompts: entry i = (base hidden at i, token at i + 1),
    # where the token after each prompt's last one is the base's first sampled token
    out = heads.forward(base, base_hidden_bsd, next_tokens_bs, cache=cache)
    cache = out.cache.advance(prompt_lengths_b)
    # then per draft step: n entries at given positions, with a mask among them
    out = heads.forward(base, feats_bnd, tokens_bn, positions_bn, cache=cache, mask=tree_mask_nn)
    # out.features [B, n, d]: predicted feature at position + 1; out.logits [B, n, V]: token at
    # position + 2; out.cache: the n entries written at lengths.. but not committed

A chain drafts one entry per call, committing each (advance(1)) and restoring `lengths` after
(tests/test_heads.py drafts one this way, jitted). A tree drafts depth by depth, passing all its
nodes so far as the new entries with their ancestor mask (earlier depths are recomputed: one
layer over a few dozen entries). After verification, run the accepted positions' base hidden
states and next tokens through `forward` (they overwrite the draft entries) and commit them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxaccel.cache import KVCache
from jaxaccel.config import ModelConfig
from jaxaccel.heads.common import DraftOutput, decoder_config, param, run_decoder_layer, shift_left
from jaxaccel.heads.config import HeadsConfig
from jaxaccel.layers.linear import INIT_STD
from jaxaccel.model import DecoderLayer, Transformer


@struct.dataclass
class EagleOutput:
    """The EAGLE layer's predicted features and the cache with its new entries."""
    features: jax.Array  # [B, n, d] predicted base hidden state at position + 1
    logits: jax.Array  # [B, n, V] float32, for the token at position + 2
    cache: KVCache | None


def unroll_mask(length: int, steps: int) -> np.ndarray:
    """[steps*T, steps*T] visibility among `steps` copies of a T-entry sequence: copy 0 is causal;
    copy s >= 1 entry i sees entries 0..i of copy 0 and entry i of copies 1..s."""
    causal, eye = np.tril(np.ones((length, length), bool)), np.eye(length, dtype=bool)
    blocks = [[causal if k == 0 else eye if k <= q else np.zeros_like(eye) for k in range(steps)]
              for q in range(steps)]
    return np.block(blocks)


class EagleHeads(nnx.Module):
    """The EAGLE draft layer (the module doc gives its drafting API; jaxaccel.drafters.eagle drafts with it)."""

    def __init__(self, config: HeadsConfig, base_config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.layer_config = decoder_config(base_config)
        d, pdt = base_config.hidden_size, jnp.dtype(base_config.param_dtype)
        embed_part = INIT_STD * jax.random.normal(rngs.params(), (d, d), pdt)
        self.fc_kernel = param(jnp.concatenate([jnp.eye(d, dtype=pdt), embed_part]), (None, "embed"))
        self.fc_bias = param(jnp.zeros((d,), pdt), ("embed",))
        self.layer = DecoderLayer(self.layer_config, rngs=rngs)

    def init_from_base(self, base: Transformer) -> None:
        """Nothing to copy: the base's embedding and LM head are used as they are."""

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty one-layer cache for the draft entries."""
        return KVCache.create(self.layer_config, batch_size, max_len)

    def fuse(self, base: Transformer, features_d: jax.Array, tokens: jax.Array) -> jax.Array:
        """fc([feature, embedding of the next token]) -> the decoder layer's input [..., d]."""
        embeds_d = base.embed_tokens(tokens)
        x = jnp.concatenate([features_d.astype(embeds_d.dtype), embeds_d], axis=-1)
        return x @ self.fc_kernel[...].astype(x.dtype) + self.fc_bias[...].astype(x.dtype)

    def forward(self, base: Transformer, features_bnd: jax.Array, tokens_bn: jax.Array,
                positions_bn: jax.Array | None = None, *, cache: KVCache | None = None,
                mask: jax.Array | None = None) -> EagleOutput:
        """n entries per row: features at their positions and the tokens one position later.
        Positions default to consecutive after the cache; mask [n, n] or [B, n, n] among the new
        entries, default causal."""
        feats_bnd, cache = self.features(base, features_bnd, tokens_bn, positions_bn, cache=cache, mask=mask)
        return EagleOutput(features=feats_bnd, logits=base.logits(feats_bnd), cache=cache)

    def features(self, base: Transformer, features_bnd: jax.Array, tokens_bn: jax.Array,
                 positions_bn: jax.Array | None = None, *, cache: KVCache | None = None,
                 mask: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """`forward` without the LM head: the predicted features [B, n, d] and the cache (drafting
        projects only the entries it expands)."""
        x_bnd = self.fuse(base, features_bnd, tokens_bn)
        return run_decoder_layer(self.layer, x_bnd, positions_bn, cache=cache, mask=mask)

    def teacher_forced(self, base: Transformer, hidden_btd: jax.Array, tokens_bt: jax.Array, depth: int) -> DraftOutput:
        """`depth` draft steps from every position, each on the previous step's predicted features."""
        b, t = tokens_bt.shape
        inputs = [self.fuse(base, hidden_btd, shift_left(tokens_bt, 1))]
        features = []
        for s in range(depth):
            positions_bn = jnp.broadcast_to(np.concatenate([np.arange(t, dtype=np.int32) + i for i in range(s + 1)]), (b, (s + 1) * t))
            out_bnd, _ = run_decoder_layer(self.layer, jnp.concatenate(inputs, axis=1), positions_bn,
                                           mask=unroll_mask(t, s + 1))
            features.append(out_bnd[:, s * t:])
            if s + 1 < depth:
                inputs.append(self.fuse(base, features[-1], shift_left(tokens_bt, s + 2)))
        features_kbtd = jnp.stack(features)
        return DraftOutput(logits_kbtv=base.logits(features_kbtd), features_kbtd=features_kbtd)
