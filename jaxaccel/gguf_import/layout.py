"""What a converted directory must hold: the config.json it gets and every tensor's name and shape.

A family's `layout` hook turns the Hugging Face config dict built from the metadata into a `Layout`.
`our_layout` validates through our own `ModelConfig` and `Transformer`, so a family we import is one
our model runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxaccel.gguf_import.reader import GGUFError


@dataclasses.dataclass(frozen=True)
class Layout:
    config_json: dict[str, Any]  # written as config.json
    shapes: dict[str, tuple[int, ...]]  # Hugging Face tensor name -> shape (numpy order)
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    family: str  # named in error messages


def our_layout(hf: dict[str, Any], path: Path) -> Layout:
    """The layout of our `Transformer` for `hf` (which `config_from_hf` must accept)."""
    from flax import nnx

    from jaxaccel.hf import config_from_hf, config_to_hf, hf_name
    from jaxaccel.model import Transformer

    try:
        config = config_from_hf(hf)
    except (ValueError, KeyError) as e:
        raise GGUFError(f"{path}: metadata gives an unusable config: {e}") from None
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    shapes = {}
    for param_path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name, transposed = hf_name(param_path, config.family)
        shapes[name] = tuple(variable.shape)[::-1] if transposed else tuple(variable.shape)
    return Layout(config_to_hf(config), shapes, config.num_heads, config.num_kv_heads, config.vocab_size,
                  config.family)
