"""Pieces the head kinds share: the teacher-forced output, residual SiLU blocks, LM-head copies.

Alignment, the same for every kind: in a teacher-forced pass over tokens_bt (positions 0..T-1)
with the base's hidden states hidden_btd, row t of depth k reads hidden_btd[:, t] (and, for hydra
and eagle, the tokens at t+1 .. t+k+1) and drafts the token at t + k + 2. Rows whose inputs run
past T - 1 are padding (their token inputs are 0): only t <= T - k - 2 is meaningful.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxaccel.cache import KVCache
from jaxaccel.config import ModelConfig
from jaxaccel.model import Transformer, run_layers


@struct.dataclass
class DraftOutput:
    """A heads forward pass for training: logits per depth (and eagle's predicted features)."""
    logits_kbtv: jax.Array  # [depth, B, T, V] float32
    features_kbtd: jax.Array | None = None  # eagle: the predicted base hidden state of each draft step


def shift_left(tokens_bt: jax.Array, j: int) -> jax.Array:
    """tokens_bt[:, t + j] at column t, zero-padded past the end (j >= 0)."""
    if j == 0:
        return tokens_bt
    return jnp.pad(tokens_bt[:, j:], ((0, 0), (0, min(j, tokens_bt.shape[1]))))[:, :tokens_bt.shape[1]]


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter annotated with its logical axes (see jaxaccel.sharding)."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def base_lm_kernel(base: Transformer) -> jax.Array:
    """The base model's LM head as a [d, V] matrix (the embedding table, transposed, when tied)."""
    if base.lm_head is None:
        return base.embed_tokens.embedding[...].T
    return base.lm_head.kernel[...]


class ResidualHeads(nnx.Module):
    """K heads of `num_blocks` residual SiLU blocks (x + silu(x W + b)), then an LM head each.

    The blocks start at zero, so each head starts as the identity on its input; the LM heads are
    trained copies of the base's (`init_from_base`), or the base's own frozen one when shared.
    Parameters are stacked over heads, so all K heads run as one einsum.
    """

    def __init__(self, num_heads: int, num_blocks: int, share_lm_head: bool, base_config: ModelConfig):
        d, v = base_config.hidden_size, base_config.vocab_size
        pdt = jnp.dtype(base_config.param_dtype)
        self.dtype = jnp.dtype(base_config.dtype)
        self.num_blocks = num_blocks
        self.block_kernel = param(jnp.zeros((num_heads, num_blocks, d, d), pdt), (None, None, "embed", "embed"))
        self.block_bias = param(jnp.zeros((num_heads, num_blocks, d), pdt), (None, None, "embed"))
        self.lm_kernel = None if share_lm_head else param(jnp.zeros((num_heads, d, v), pdt), (None, "embed", "vocab"))

    def init_from_base(self, base: Transformer) -> None:
        """Each head's LM head := a copy of the base's."""
        if self.lm_kernel is not None:
            kernel_dv = base_lm_kernel(base).astype(self.lm_kernel.dtype)
            self.lm_kernel[...] = jnp.broadcast_to(kernel_dv, self.lm_kernel.shape)

    def blocks(self, x_k_d: jax.Array, heads: slice = slice(None)) -> jax.Array:
        """The residual blocks of `heads` on x [k, ..., d], one input per head (k = len(heads))."""
        x = x_k_d.astype(self.dtype)
        kernel_kndd, bias_knd = self.block_kernel[heads].astype(self.dtype), self.block_bias[heads].astype(self.dtype)
        bias_shape = (bias_knd.shape[0],) + (1,) * (x.ndim - 2) + (bias_knd.shape[-1],)
        for i in range(self.num_blocks):
            h = jnp.einsum("k...d,kde->k...e", x, kernel_kndd[:, i]) + bias_knd[:, i].reshape(bias_shape)
            x = x + jax.nn.silu(h)
        return x

    def logits(self, base: Transformer, x_k_d: jax.Array, heads: slice = slice(None)) -> jax.Array:
        """The LM heads of `heads` on x [k, ..., d] -> float32 logits [k, ..., V]."""
        if self.lm_kernel is None:
            return base.logits(x_k_d)
        kernel_kdv = self.lm_kernel[heads].astype(self.dtype)
        return jnp.einsum("k...d,kdv->k...v", x_k_d.astype(self.dtype), kernel_kdv).astype(jnp.float32)


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
