"""The registry of attention kinds: name -> (layer class, cache-entry factory).

A layer class takes (config, layer_index, rngs=) and is called as
`layer(x_bnd, ctx: ForwardContext, entry) -> (out_bnd, entry)` in all three forward modes
(training: entry None; prefill and tree verification: the layer's cache entry). The factory
makes that layer's empty entry: `create_entry(config, layer_index, batch_size, max_len, dtype)`
(the full kind's also takes `sliding`: a ring or a dense entry for a sliding-window layer).
Which kind each layer runs is `config.layer_kind(i)` (ModelConfig.attention, an AttentionSpec).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flax import nnx

from jaxaccel.config import ATTENTION_KINDS, ModelConfig
from jaxaccel.layers.block_sparse import BlockSparseAttention, create_paged_entry
from jaxaccel.layers.duo import DuoAttention, create_duo_entry
from jaxaccel.layers.full import FullAttention, create_dense_entry
from jaxaccel.layers.linear_attention import LinearAttention, create_linear_entry


@dataclass(frozen=True)
class AttentionKind:
    """One entry of the registry: the layer class and the factory of its cache entry."""
    name: str
    layer: type[nnx.Module]
    create_entry: Callable


KINDS = {
    "full": AttentionKind("full", FullAttention, create_dense_entry),
    "duo": AttentionKind("duo", DuoAttention, create_duo_entry),
    "block_sparse": AttentionKind("block_sparse", BlockSparseAttention, create_paged_entry),
    "linear": AttentionKind("linear", LinearAttention, create_linear_entry),
}
assert tuple(KINDS) == ATTENTION_KINDS


def attention_kind(name: str) -> AttentionKind:
    """The registry entry of `name`; an unknown name is an error that lists the kinds."""
    if name not in KINDS:
        raise ValueError(f"unknown attention kind {name!r}; expected one of {tuple(KINDS)}")
    return KINDS[name]


def make_attention(config: ModelConfig, layer_index: int | None, *, rngs: nnx.Rngs) -> nnx.Module:
    """The attention module of layer `layer_index` (None: a draft head's own layer, full attention)."""
    kind = "full" if layer_index is None else config.layer_kind(layer_index)
    return attention_kind(kind).layer(config, layer_index or 0, rngs=rngs)
