"""Pieces the head kinds share: the teacher-forced output, residual SiLU blocks, LM-head copies.

Alignment, the same for every kind: in a teacher-forced pass over tokens_bt (positions 0..T-1)
with the base's hidden states hidden_btd, row t of depth k reads hidden_btd[:, t] (and, for hydra
and eagle, the tokens at t+1 .. t+k+1) and drafts the token at t + k + 2. Rows whose inputs run
past T - 1 are padding (their token inputs are 0): only t <= T - k - 2 is meaningful.

A trimmed draft vocabulary (HeadsConfig.draft_vocab_size = N > 0, jaxaccel.draft_vocab): the
residual heads' LM heads cover only N tokens, `d2t` [N] maps their logits' index -> target token
id, and the heads' logits are [..., N]. N = 0 keeps the whole vocabulary (no d2t): [..., V].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxaccel.cache import KVCache
from jaxaccel.config import ModelConfig
from jaxaccel.draft_vocab import checked_d2t
from jaxaccel.model import Transformer, run_layers


@struct.dataclass
class DraftOutput:
    """A heads forward pass for training: logits per depth (and eagle's predicted features)."""
    logits_kbtv: jax.Array  # [depth, B, T, V] float32 (the last axis N over a trimmed draft vocabulary)
    features_kbtd: jax.Array | None = None  # eagle: the predicted base hidden state of each draft step


def shift_left(x_bt: jax.Array, j: int) -> jax.Array:
    """x_bt[:, t + j] at column t (tokens, states, masks: any trailing axes), zero (False) past the end (j >= 0)."""
    if j == 0:
        return x_bt
    t = x_bt.shape[1]
    return jnp.pad(x_bt[:, j:], [(0, 0), (0, min(j, t))] + [(0, 0)] * (x_bt.ndim - 2))[:, :t]


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter annotated with its logical axes (see jaxaccel.sharding)."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def base_lm_kernel(base: Transformer) -> jax.Array:
    """The base model's LM head as a [d, V] matrix (the embedding table, transposed, when tied)."""
    if base.lm_head is None:
        return base.embed_tokens.embedding[...].T
    return base.lm_head.kernel[...]


def base_logits_over(base: Transformer, x_d: jax.Array, d2t_n: jax.Array | None) -> jax.Array:
    """The base's own LM head restricted to the tokens d2t [N]: float32 logits [..., N], equal to
    `base.logits(x)[..., d2t]` (final softcap included) without the other V - N columns.
    d2t None: `base.logits(x)`, over the whole vocabulary."""
    if d2t_n is None:
        return base.logits(x_d)
    dtype = jnp.dtype(base.config.dtype)
    kernel_dn = jnp.take(base_lm_kernel(base), d2t_n, axis=1).astype(dtype)
    out = jnp.einsum("...d,dn->...n", x_d.astype(dtype), kernel_dn).astype(jnp.float32)
    cap = base.config.final_softcap
    return out if cap is None else jnp.tanh(out / cap) * cap


class ResidualHeads(nnx.Module):
    """K heads of `num_blocks` residual SiLU blocks (x + silu(x W + b)), then an LM head each.

    The blocks start at zero, so each head starts as the identity on its input; the LM heads are
    trained copies of the base's (`init_from_base`), or the base's own frozen one when shared.
    Over a trimmed draft vocabulary of N tokens (`draft_vocab_size` > 0) each LM head is [d, N]:
    the base's columns of the draft tokens (shared: read from the base's LM head at each call).
    Parameters are stacked over heads, so all K heads run as one einsum.
    """

    def __init__(self, num_heads: int, num_blocks: int, share_lm_head: bool, base_config: ModelConfig,
                 draft_vocab_size: int = 0):
        d, v = base_config.hidden_size, base_config.vocab_size
        if draft_vocab_size > v:
            raise ValueError(f"a draft vocabulary of {draft_vocab_size} tokens is larger than the base model's "
                             f"vocabulary ({v} tokens)")
        n = draft_vocab_size or v
        pdt = jnp.dtype(base_config.param_dtype)
        self.dtype = jnp.dtype(base_config.dtype)
        self.num_blocks = num_blocks
        self.block_kernel = param(jnp.zeros((num_heads, num_blocks, d, d), pdt), (None, None, "embed", "embed"))
        self.block_bias = param(jnp.zeros((num_heads, num_blocks, d), pdt), (None, None, "embed"))
        self.lm_kernel = None if share_lm_head else param(jnp.zeros((num_heads, d, n), pdt), (None, "embed", "vocab"))

    def init_from_base(self, base: Transformer, d2t_n: jax.Array | None = None) -> None:
        """Each head's LM head := a copy of the base's (its columns d2t [N] over a trimmed vocabulary)."""
        if self.lm_kernel is not None:
            kernel_dv = base_lm_kernel(base)
            if d2t_n is not None:
                kernel_dv = jnp.take(kernel_dv, d2t_n, axis=1)
            self.lm_kernel[...] = jnp.broadcast_to(kernel_dv.astype(self.lm_kernel.dtype), self.lm_kernel.shape)

    def blocks(self, x_k_d: jax.Array, heads: slice = slice(None)) -> jax.Array:
        """The residual blocks of `heads` on x [k, ..., d], one input per head (k = len(heads))."""
        x = x_k_d.astype(self.dtype)
        kernel_kndd, bias_knd = self.block_kernel[heads].astype(self.dtype), self.block_bias[heads].astype(self.dtype)
        bias_shape = (bias_knd.shape[0],) + (1,) * (x.ndim - 2) + (bias_knd.shape[-1],)
        for i in range(self.num_blocks):
            h = jnp.einsum("k...d,kde->k...e", x, kernel_kndd[:, i]) + bias_knd[:, i].reshape(bias_shape)
            x = x + jax.nn.silu(h)
        return x

    def logits(self, base: Transformer, x_k_d: jax.Array, heads: slice = slice(None),
               d2t_n: jax.Array | None = None) -> jax.Array:
        """The LM heads of `heads` on x [k, ..., d] -> float32 logits [k, ..., N] over the draft
        vocabulary d2t [N] (None: over the whole vocabulary, N = V)."""
        if self.lm_kernel is None:
            return base_logits_over(base, x_k_d, d2t_n)
        kernel_kdn = self.lm_kernel[heads].astype(self.dtype)
        return jnp.einsum("k...d,kdn->k...n", x_k_d.astype(self.dtype), kernel_kdn).astype(jnp.float32)


class DraftVocabMixin:
    """The draft vocabulary of heads whose LM heads are `self.heads` (ResidualHeads): medusa and
    hydra. `self.d2t` is a DraftVocab [N] when trimmed, else None; `self.vocab_size` is V."""

    @property
    def draft_vocab_size(self) -> int:
        """N: the tokens the heads' logits cover (V without a trimmed vocabulary)."""
        return self.vocab_size if self.d2t is None else self.d2t[...].shape[0]

    def draft_map(self) -> jax.Array | None:
        """d2t [N] int32, or None when the heads' logits are over the whole vocabulary."""
        return None if self.d2t is None else self.d2t[...]

    def target_tokens(self, draft_ids: jax.Array) -> jax.Array:
        """Indices into the heads' logits (argmax, top ranks) -> target token ids."""
        return draft_ids if self.d2t is None else self.d2t[...][draft_ids]

    def init_from_base(self, base: Transformer, d2t=None) -> None:
        """Sets the draft vocabulary (trimmed heads only; d2t [N] distinct token ids, most frequent
        first by convention; default: ids 0..N-1) and copies the base's LM head, or its columns of
        the draft tokens, into each head's own (no-op when shared)."""
        if d2t is not None:
            if self.d2t is None:
                raise ValueError("these heads cover the whole vocabulary (draft_vocab_size 0): there is no d2t to set")
            self.d2t[...] = jnp.asarray(checked_d2t(d2t, self.draft_vocab_size, self.vocab_size))
        self.heads.init_from_base(base, self.draft_map())


def decoder_config(base_config: ModelConfig) -> ModelConfig:
    """The config of a one-layer draft decoder over the base's features: full attention."""
    return base_config.replace(num_layers=1, sliding_window=None, attention=None, layer_types=None,
                               local_rope_theta=None)


def zero_residual_branches(layer) -> None:
    """Zeroes a DecoderLayer's output projections, so that it starts as the identity."""
    for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
        linear.kernel[...] = jnp.zeros_like(linear.kernel[...])
        if linear.bias is not None:
            linear.bias[...] = jnp.zeros_like(linear.bias[...])


def run_decoder_layer(layer, x_bnd: jax.Array, positions_bn: jax.Array | None = None, *,
                      cache: KVCache | None = None, mask: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
    """One DecoderLayer with the base model's forward semantics (a one-layer KVCache)."""
    x_bnd, cache, _ = run_layers([layer], x_bnd, positions_bn, cache=cache, mask=mask)
    return x_bnd, cache
