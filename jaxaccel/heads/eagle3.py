"""EAGLE-3 draft head: a fused low/middle/high feature, one decoder layer, a trimmed LM head.

The base's residual stream after three layers (EAGLE-3's low, middle and high: `capture`) is
fused by a linear map 3d -> d into g_i. Entry i of the draft sequence sits at position i and
combines a feature with the embedding of the token at i + 1 (the base's embedding, frozen):
x_i = combine([feature_i, e(tok_{i+1})]), 2d -> d. The decoder layer (causal attention over the
entries, its own KV cache) turns x_i into its output state h_i; the head's own final norm and its
own LM head over the N draft-vocabulary tokens turn h_i into logits for the token at i + 2. The
feature at the first draft step is the base's fused g; at later steps it is the draft layer's own
output h of the step before (EAGLE-3 feeds its own states back and has no feature-regression loss:
h need not imitate any base state). `d2t` [N] maps draft index -> target token id
(jaxaccel.draft_vocab); it is stored with the head, and the LM head starts as the base's LM-head
rows of those tokens. N = V (d2t the identity) when `draft_vocab_size` is 0.

Training-time test (`unrolled`, depth D): D draft steps from every position, each on the previous
step's own output states, under heads.eagle's `unroll_mask` (step s for the chain starting at real
entry i sits at position i + s and sees real entries 0..i and its own chain's earlier steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxaccel.cache import KVCache
from jaxaccel.config import ModelConfig
from jaxaccel.draft_vocab import DraftVocab, checked_d2t, to_target_logits
from jaxaccel.heads.common import DraftOutput, base_lm_kernel, decoder_config, param, run_decoder_layer, shift_left
from jaxaccel.heads.config import HeadsConfig
from jaxaccel.heads.eagle import unroll_mask
from jaxaccel.layers.linear import INIT_STD, times
from jaxaccel.layers.norms import RMSNorm
from jaxaccel.model import DecoderLayer, Transformer
from jaxaccel.training.features import feature_layers


class Eagle3Heads(nnx.Module):
    """The EAGLE-3 draft layer (module doc); jaxaccel.drafters.eagle3 drafts with it."""

    # Decode-time panel copies of the plain products' kernels (jaxaccel.model.decode_layout).
    PANEL_COPIES = {"fuse_kernel": "fuse_panels", "combine_kernel": "combine_panels", "lm_kernel": "lm_panels"}

    def __init__(self, config: HeadsConfig, base_config: ModelConfig, *, rngs: nnx.Rngs):
        self.config, self.base_config = config, base_config
        self.layer_config = decoder_config(base_config)
        self.capture = feature_layers(base_config.num_layers)  # the base layers it reads (static)
        self.vocab_size = base_config.vocab_size
        d, pdt = base_config.hidden_size, jnp.dtype(base_config.param_dtype)
        n = config.draft_vocab_size or base_config.vocab_size
        k = len(self.capture)
        # fuse starts by passing the high layer's state through; combine as the identity on the feature.
        self.fuse_kernel = param(jnp.concatenate([jnp.zeros(((k - 1) * d, d), pdt), jnp.eye(d, dtype=pdt)]), (None, "embed"))
        embed_part = INIT_STD * jax.random.normal(rngs.params(), (d, d), pdt)
        self.combine_kernel = param(jnp.concatenate([jnp.eye(d, dtype=pdt), embed_part]), (None, "embed"))
        self.combine_bias = param(jnp.zeros((d,), pdt), ("embed",))
        self.layer = DecoderLayer(self.layer_config, rngs=rngs)
        self.norm = RMSNorm(d, eps=base_config.rms_norm_eps, param_dtype=pdt)
        self.lm_kernel = param(INIT_STD * jax.random.normal(rngs.params(), (d, n), pdt), ("embed", "vocab"))
        self.d2t = DraftVocab(jnp.arange(n, dtype=jnp.int32))
        self.fuse_panels = nnx.data(None)
        self.combine_panels = nnx.data(None)
        self.lm_panels = nnx.data(None)

    @property
    def draft_vocab_size(self) -> int:
        return self.d2t[...].shape[0]

    def init_from_base(self, base: Transformer, d2t: np.ndarray | None = None) -> None:
        """Sets the draft vocabulary (if given) and copies the base's final norm and its LM-head
        rows of the draft tokens."""
        if d2t is not None:
            self.d2t[...] = jnp.asarray(checked_d2t(d2t, self.draft_vocab_size, self.vocab_size))
        kernel_dv = base_lm_kernel(base)
        self.lm_kernel[...] = kernel_dv[:, self.d2t[...]].astype(self.lm_kernel.dtype)
        self.norm.scale[...] = base.norm.scale[...].astype(self.norm.scale.dtype)

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty one-layer cache for the draft entries."""
        return KVCache.create(self.layer_config, batch_size, max_len)

    def fuse(self, captured_nkd: jax.Array) -> jax.Array:
        """The base's low/middle/high states [..., k, d] -> the fused feature [..., d]."""
        x = captured_nkd.reshape(*captured_nkd.shape[:-2], -1)
        return times(x, self.fuse_kernel[...], self.fuse_panels)

    def combine(self, features_d: jax.Array, embeds_d: jax.Array) -> jax.Array:
        """combine([feature, embedding of the next token]) -> the decoder layer's input [..., d]."""
        x = jnp.concatenate([features_d.astype(embeds_d.dtype), embeds_d], axis=-1)
        return times(x, self.combine_kernel[...], self.combine_panels) + self.combine_bias[...].astype(x.dtype)

    def step(self, features_bnd: jax.Array, embeds_bnd: jax.Array, positions_bn: jax.Array | None = None, *,
             cache: KVCache | None = None, mask: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """n entries per row (features at their positions, embeddings of the tokens one later) ->
        the layer's output states [B, n, d] and the cache with the entries written, not committed.
        Positions default to consecutive after the cache; mask [n, n] or [B, n, n], default causal."""
        return run_decoder_layer(self.layer, self.combine(features_bnd, embeds_bnd), positions_bn, cache=cache, mask=mask)

    def features(self, base: Transformer, features_bnd: jax.Array, tokens_bn: jax.Array,
                 positions_bn: jax.Array | None = None, *, cache: KVCache | None = None,
                 mask: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """`step` with the tokens embedded by the base."""
        return self.step(features_bnd, base.embed_tokens(tokens_bn), positions_bn, cache=cache, mask=mask)

    def draft_logits(self, states_nd: jax.Array) -> jax.Array:
        """Output states [..., d] -> float32 logits over the draft vocabulary [..., N]."""
        x = self.norm(states_nd)
        return times(x, self.lm_kernel[...], self.lm_panels).astype(jnp.float32)

    def target_logits(self, states_nd: jax.Array) -> jax.Array:
        """Logits over the whole vocabulary [..., V]: -inf outside the draft vocabulary."""
        return to_target_logits(self.draft_logits(states_nd), self.d2t[...], self.vocab_size)

    def unrolled(self, fused_btd: jax.Array, embeds_btd: jax.Array, depth: int) -> jax.Array:
        """Training-time test: `depth` draft steps from every position, each on the previous step's
        own output states. embeds_btd[:, t] embeds the token at t + 1 (zero past the end); step s
        at row t reads the token at t + s + 1. Returns the output states [depth, B, T, d]: step s
        at row t drafts the token at t + s + 2."""
        b, t = embeds_btd.shape[:2]
        inputs, states = [self.combine(fused_btd, embeds_btd)], []
        for s in range(depth):
            positions_bn = jnp.broadcast_to(np.concatenate([np.arange(t, dtype=np.int32) + i for i in range(s + 1)]),
                                            (b, (s + 1) * t))
            out_bnd, _ = run_decoder_layer(self.layer, jnp.concatenate(inputs, axis=1), positions_bn,
                                           mask=unroll_mask(t, s + 1))
            states.append(out_bnd[:, s * t:])
            if s + 1 < depth:
                inputs.append(self.combine(states[-1], shift_left(embeds_btd, s + 1)))
        return jnp.stack(states)


    def teacher_forced(self, base: Transformer, captured_btkd: jax.Array, tokens_bt: jax.Array, depth: int) -> DraftOutput:
        """`unrolled` along the true tokens from the base's captured states (jaxaccel.decoding.tune):
        logits over the draft vocabulary [depth, B, T, N] (step s at row t drafts the token at t + s + 2)."""
        embeds_btd = base.embed_tokens(shift_left(tokens_bt, 1))
        states_kbtd = self.unrolled(self.fuse(captured_btkd), embeds_btd, depth)
        return DraftOutput(logits_kbtv=self.draft_logits(states_kbtd), features_kbtd=states_kbtd)


def truncate_draft_vocab(heads: Eagle3Heads, size: int) -> Eagle3Heads:
    """The same head over the first `size` tokens of its draft vocabulary (d2t is most frequent
    first, so these are the `size` most frequent): the LM head keeps those rows."""
    if not 0 < size <= heads.draft_vocab_size:
        raise ValueError(f"a draft vocabulary of {heads.draft_vocab_size} tokens cannot be cut to {size}")
    _, state = nnx.split(heads)
    smaller = nnx.eval_shape(lambda: Eagle3Heads(heads.config.replace(draft_vocab_size=size), heads.base_config,
                                                 rngs=nnx.Rngs(0)))
    small_graphdef, small_state = nnx.split(smaller)
    flat = dict(nnx.to_flat_state(state))
    cut = {("lm_kernel",): lambda x: x[:, :size], ("d2t",): lambda x: x[:size]}
    values = [(path, var.replace(cut.get(path, lambda x: x)(flat[path].get_value())))
              for path, var in nnx.to_flat_state(small_state)]
    return nnx.merge(small_graphdef, nnx.from_flat_state(values))
