"""Decoder-only Transformer (Llama, Qwen2, Qwen3, Mistral, their MoE variants, Gemma 2 and 3) in Flax NNX.

One forward pass serves three uses:
  training  `model(tokens_bt)`: a full causal sequence, no cache;
  prefill   `model.forward(tokens_bs, cache=empty_cache)`, then `cache.advance(prompt_lengths_b)`;
  verify    `model.forward(tokens_bn, positions_bn, cache=cache, mask=tree_mask_nn)`: n new tokens
            per row at given positions with an [n, n] mask among them, attending to the row's
            cache. Their K/V are written but not committed: `cache.advance` / `cache.keep` decide.
A family is a set of flags on this one model (jaxaccel.families states each family's flags and config.json).
Module names follow the Hugging Face checkpoints, so the weight key map (jaxaccel.hf) is short.
"""

from __future__ import annotations

import weakref
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxaccel.cache import KVCache
from jaxaccel.config import ModelConfig
from jaxaccel.cpu_kernels.decode_attention import available as cpu_attention_available
from jaxaccel.cpu_kernels.panel_matmul import available as panel_kernel_available
from jaxaccel.cpu_kernels.panel_matmul import pack_panels, packable, panel_matmul, reads_panels
from jaxaccel.layers.attention import Attention
from jaxaccel.layers.attention_kinds import make_attention
from jaxaccel.layers.context import ForwardContext
from jaxaccel.layers.linear import INIT_STD, DecodeCopy, Projection, dense
from jaxaccel.layers.mlp import MLP
from jaxaccel.layers.moe import MoE
from jaxaccel.layers.norms import RMSNorm


ModuleT = TypeVar("ModuleT", bound=nnx.Module)


@struct.dataclass
class ForwardOutput:
    """A forward pass's logits (or hidden states) and the cache with the new tokens recorded."""
    logits: jax.Array  # [B, n, V] float32
    hidden: jax.Array  # [B, n, d] last hidden states, after the final norm
    cache: KVCache | None  # with the new tokens' K/V written, not committed
    captured: jax.Array | None = None  # [B, n, k, d] residual stream after each `capture` layer (EAGLE-3's features)


def make_norm(config: ModelConfig, dim: int | None = None) -> RMSNorm:
    """An RMSNorm of the model's kind (Gemma's scales by 1 + w)."""
    return RMSNorm(dim or config.hidden_size, eps=config.rms_norm_eps, param_dtype=jnp.dtype(config.param_dtype),
                   offset=config.norm_offset)


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: the layer's attention kind, then its MLP or MoE block, each residual.

    With `sandwich_norms` (Gemma) the outputs of attention and MLP are normed too before their
    residual add. Names follow the checkpoints: Gemma's `post_attention_layernorm` follows
    attention and `pre_feedforward_layernorm` precedes the MLP, where in the other families
    `post_attention_layernorm` is the pre-MLP norm."""
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, layer_index: int | None = None):
        self.input_layernorm = make_norm(config)
        self.self_attn = make_attention(config, layer_index, rngs=rngs)  # the layer's attention kind
        self.post_attention_layernorm = make_norm(config)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = make_norm(config)
            self.post_feedforward_layernorm = make_norm(config)
        # A MoE block where config.moe asks for one at this index (None: a draft head's own layer, dense).
        moe = layer_index is not None and config.is_moe_layer(layer_index)
        self.mlp = MoE(config, rngs=rngs) if moe else MLP(config, rngs=rngs)

    def __call__(self, x_bnd, ctx: ForwardContext, entry=None):
        h_bnd, entry = self.self_attn(self.input_layernorm(x_bnd), ctx, entry)
        if self.sandwich:
            x_bnd = x_bnd + self.post_attention_layernorm(h_bnd)
            return x_bnd + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x_bnd))), entry
        x_bnd = x_bnd + h_bnd
        x_bnd = x_bnd + self.mlp(self.post_attention_layernorm(x_bnd))
        return x_bnd, entry


class ScaledEmbed(nnx.Embed):
    """Token embeddings, times sqrt(hidden_size) cast to the activation dtype where the model asks (Gemma).
    The table itself is stored unscaled (the tied LM head reads it as is)."""
    def __init__(self, *args, scale: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = super().__call__(tokens)
        return x if self.scale is None else x * jnp.asarray(self.scale, x.dtype)


class Transformer(nnx.Module):
    """The decoder-only Transformer (module doc): embeddings, decoder layers, final norm, LM head."""
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdt = jnp.dtype(config.param_dtype)
        self.embed_tokens = ScaledEmbed(
            config.vocab_size, config.hidden_size, dtype=jnp.dtype(config.dtype), param_dtype=pdt, rngs=rngs,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(INIT_STD), ("vocab", "embed"), eager_sharding=False),
            scale=config.hidden_size**0.5 if config.embed_scale else None)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs, layer_index=i) for i in range(config.num_layers)])
        self.norm = make_norm(config)
        self.lm_head = None if config.tie_embeddings else dense(
            config, config.hidden_size, config.vocab_size, ("embed", "vocab"), False, rngs)
        self.lm_table_dv = nnx.data(None)  # decode-time copies of the tied table, see `decode_layout`
        self.lm_panels = nnx.data(None)

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        """Training use: logits [B, S, V] of a full causal sequence."""
        return self.forward(tokens_bt).logits

    def forward(self, tokens_bn: jax.Array, positions_bn: jax.Array | None = None, *,
                cache: KVCache | None = None, mask: jax.Array | None = None,
                capture: tuple[int, ...] = (), empty_cache: bool = False) -> ForwardOutput:
        """Runs n tokens per row. `positions_bn` default: consecutive after the cache (or from 0).
        `mask` [n, n] or [B, n, n] (query, key) among the new tokens; default causal. `capture`:
        layer indices whose output (the residual stream after the layer) comes back as `captured`.
        `empty_cache`: the caller promises the cache holds nothing yet (a prefill), so attention runs
        among the new tokens only instead of over every slot."""
        check_tokens(tokens_bn, self.config.vocab_size)
        if cache is None and tokens_bn.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {tokens_bn.shape[1]} tokens is longer than the model's context "
                             f"({self.config.max_position_embeddings} positions)")
        x_bnd, new_cache, captured = run_layers(self.layers, self.embed_tokens(tokens_bn), positions_bn, cache=cache,
                                                mask=mask, capture=capture, empty_cache=empty_cache)
        hidden_bnd = self.norm(x_bnd)
        return ForwardOutput(logits=self.logits(hidden_bnd), hidden=hidden_bnd, cache=new_cache, captured=captured)

    def logits(self, hidden_bnd: jax.Array) -> jax.Array:
        """The LM head (tied or not), in float32."""
        if self.lm_head is None:
            # Contract with the [V, d] table as stored. `Embed.attend` (h @ E.T) transposes it, and
            # XLA:CPU fuses that transpose into a naive loop-emitted dot over the whole table
            # (every decode step) instead of calling its library matrix-vector product.
            embed = self.embed_tokens
            if self.lm_panels is not None and reads_panels(hidden_bnd):
                out = panel_matmul(hidden_bnd, self.lm_panels[...])
            elif self.lm_table_dv is not None and hidden_bnd.shape[-2] > 1:
                hidden_bnd, table_dv = embed.promote_dtype((hidden_bnd, self.lm_table_dv[...]), dtype=embed.dtype)
                out = hidden_bnd @ table_dv  # several tokens a row: see `decode_layout`
            else:
                hidden_bnd, table_vd = embed.promote_dtype((hidden_bnd, embed.embedding[...]), dtype=embed.dtype)
                out = jnp.einsum("...d,vd->...v", hidden_bnd, table_vd)
        else:
            out = self.lm_head(hidden_bnd)
        out = out.astype(jnp.float32)
        cap = self.config.final_softcap
        return out if cap is None else jnp.tanh(out / cap) * cap

    def prefill(self, tokens_bs: jax.Array, lengths_b: jax.Array, cache: KVCache) -> ForwardOutput:
        """Prompts right-padded to S, with true lengths, into an empty cache; returns the cache with each
        prompt committed. Padding K/V are written past each row's length and overwritten later."""
        out = self.forward(tokens_bs, cache=cache, empty_cache=True)
        return out.replace(cache=out.cache.advance(lengths_b))


# module -> {path of a weight: (that weight, its decode-time copy)}: one copy per weight, however
# many decoders of the module use it.
_DECODE_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decode_copy(module: nnx.Module, path: str, weight: jax.Array, make) -> DecodeCopy:
    copies = _DECODE_COPIES.setdefault(module, {})
    if path not in copies or copies[path][0] is not weight:  # first use, or the weights were replaced since
        copies[path] = (weight, make(weight))
    return DecodeCopy(copies[path][1])


def _use_cpu_kernels(copy: nnx.Module, original: nnx.Module) -> None:
    """Panel-packed copies of every float32 Projection's kernel in `copy`, and of the plain [K, N]
    kernels a module names in its PANEL_COPIES ({kernel attribute: copy attribute}, multiplied
    through `jaxaccel.layers.linear.times`); softmax attention on the decode-attention kernel."""
    attention_kernel = cpu_attention_available()
    for path, module in nnx.iter_graph(copy):
        name = "/".join(map(str, path))
        if isinstance(module, Attention):
            module.cpu_kernel = attention_kernel
        if isinstance(module, Projection) and packable(module.kernel[...]):
            module.panels = _decode_copy(original, name, module.kernel[...], pack_panels)
        for kernel_name, copy_name in getattr(module, "PANEL_COPIES", {}).items():
            kernel = getattr(module, kernel_name)[...]
            if packable(kernel):
                setattr(module, copy_name, _decode_copy(original, f"{name}/{kernel_name}", kernel, pack_panels))


def _on_one_device(module: nnx.Module) -> bool:
    """A sharded module keeps XLA's products."""
    return all(len(leaf.sharding.device_set) == 1 for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def decode_layout(module: ModuleT) -> ModuleT:
    """`module` (a base model, or draft heads), sharing its weights, with decode-time copies of
    them laid out the way a pass over a few tokens per row (an AR step, drafting, a tree
    verification) reads them fastest; anything else gets `module` back. Only on CPU, where XLA's
    own products are slow at 2-16 rows:

    - with the CPU kernels (jaxaccel.cpu_kernels: x86 AVX2, a C++ compiler), every float32
      projection, a model's tied LM head and the heads' plain kernels (PANEL_COPIES) get a
      panel-packed copy, read as one stream per 16 columns: a pass over 1-8 tokens costs about the
      weights' reading time, where XLA's GEMM re-packs each weight per call; and softmax attention
      over the cache runs on the decode-attention kernel, which reads K and V where they lie;
    - without it, a model's tied LM head keeps its table also as [d, V] (`lm_table_dv`): a product
      of 2-16 rows with the [V, d] table runs at about half the memory bandwidth of the same
      product with [d, V] (the table is 21% of the bytes SmolLM2-135M reads a pass, 63% of Gemma 3
      270M's), while one row is fastest against [V, d].

    The copies cost the weights' size again (once per module: decoders of the same module share
    them), are not Params, and are never trained or saved."""
    if jax.default_backend() != "cpu":
        return module
    is_model = isinstance(module, Transformer)
    panels = (_on_one_device(module) and panel_kernel_available()
              and (not is_model or jnp.dtype(module.config.dtype) == jnp.float32))
    tied_table = is_model and module.lm_head is None
    if not panels and not tied_table:
        return module
    copy = nnx.merge(*nnx.split(module))
    if panels:
        _use_cpu_kernels(copy, module)
    if tied_table:
        table_vd = module.embed_tokens.embedding[...]
        if panels and packable(jax.ShapeDtypeStruct(table_vd.shape[::-1], table_vd.dtype)):
            copy.lm_panels = _decode_copy(module, "lm_panels", table_vd, lambda t: pack_panels(t.T))
        else:
            copy.lm_table_dv = _decode_copy(module, "lm_table_dv", table_vd, jnp.transpose)
    return copy


def run_layers(layers, x_bnd: jax.Array, positions_bn: jax.Array | None = None, *, cache: KVCache | None = None,
               mask: jax.Array | None = None, duo_gates: jax.Array | None = None,
               capture: tuple[int, ...] = (),
               empty_cache: bool = False) -> tuple[jax.Array, KVCache | None, jax.Array | None]:
    """Decoder layers over n new entries per row, with the forward-pass semantics above: positions
    default consecutive after the cache (or from 0), mask [n, n] or [B, n, n] default causal, new
    entries recorded in each layer's cache entry but not committed. What the layers share (which
    keys each query sees) is worked out once per pass in a ForwardContext, not in every layer.
    Also runs the draft heads' own decoder layers (one-layer caches). `duo_gates` [layers, Hkv]
    (training without a cache): duo layers mix full and streaming attention per KV head
    (jaxaccel.training.gates). `empty_cache`: the cache holds nothing yet (a prefill): full-attention
    layers attend among the new tokens only. Returns (x, cache, the states after the `capture` layers
    [B, n, k, d] or None)."""
    b, n = x_bnd.shape[:2]
    if any(not 0 <= i < len(layers) for i in capture):
        raise ValueError(f"capture layers {tuple(capture)} are not all among the {len(layers)} layers")
    if cache is not None:
        check_capacity(cache, n)
    if positions_bn is None:
        start_b = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
        positions_bn = start_b[:, None] + jnp.arange(n, dtype=jnp.int32)
    mask_bnn = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)) if mask is None else mask, (b, n, n))
    # Each layer's attention applies its own window.
    ctx = ForwardContext(positions_bn, mask_bnn, None if cache is None else cache.lengths, causal=mask is None,
                         duo_gates=duo_gates, empty_cache=empty_cache and cache is not None)
    entries, states = [], {}
    for i, layer in enumerate(layers):
        x_bnd, entry = layer(x_bnd, ctx, None if cache is None else cache.layers[i])
        entries.append(entry)
        if i in capture:
            states[i] = x_bnd
    captured = jnp.stack([states[i] for i in capture], axis=2) if capture else None
    return x_bnd, None if cache is None else cache.replace(layers=tuple(entries)), captured


def check_tokens(tokens_bn, vocab_size: int) -> None:
    """Shape/dtype checks always; range checks when the values are known (outside jit)."""
    if tokens_bn.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, length], got shape {tuple(tokens_bn.shape)}")
    if not jnp.issubdtype(tokens_bn.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens_bn.dtype}")
    if tokens_bn.shape[1] == 0:
        raise ValueError("tokens must hold at least one token per row")
    if not isinstance(tokens_bn, jax.core.Tracer):
        lo, hi = int(np.min(tokens_bn)), int(np.max(tokens_bn))
        if lo < 0 or hi >= vocab_size:
            bad = hi if hi >= vocab_size else lo
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {vocab_size}")


def check_capacity(cache: KVCache, n: int) -> None:
    """n new tokens must fit after every row's committed tokens."""
    if n > cache.max_len:
        raise ValueError(f"{n} new tokens do not fit in a cache of {cache.max_len} slots")
    if not isinstance(cache.lengths, jax.core.Tracer):
        longest = int(np.max(cache.lengths))
        if longest + n > cache.max_len:
            raise ValueError(f"sequence longer than the cache: {longest} cached + {n} new tokens "
                             f"> {cache.max_len} slots")
