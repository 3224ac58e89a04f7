"""The GGUF architectures we import: one table entry each.

An entry holds what differs between families on the GGUF side: its metadata key prefix (the table
key, llama.cpp's `general.architecture`), the Hugging Face family it becomes, llama.cpp's tensor
names for it, per-tensor transforms that undo what llama.cpp's converter did to the weights, and two
hooks: `hf_config` (metadata -> Hugging Face config dict) and `layout` (that dict -> config.json and
every tensor's shape, validated by our own model). What the family itself is (biases, QK-norm) stays
with `jaxaccel.hf.config_from_hf`.

Adding a family is one entry; Gemma 2 / 3 (`gemma.py`) list their extra norms in `block_tensors`, a
transform storing norms back as w - 1 and their own config builder, with `permute_qk=False`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxaccel.gguf_import.config import hf_config_from_metadata
from jaxaccel.gguf_import.gemma import (END_OF_TURN, GEMMA2_BLOCK_TENSORS, GEMMA3_BLOCK_TENSORS, gemma_hf_config,
                                        unshift_norms)
from jaxaccel.gguf_import.layout import our_layout
from jaxaccel.gguf_import.names import GLOBAL_TENSORS, LLAMA_BLOCK_TENSORS

# (Hugging Face tensor name, weight in HF layout, num_heads, num_kv_heads) -> the weight as HF stores it.
Transform = Callable[[str, np.ndarray, int, int], np.ndarray]


def unpermute_qk(name: str, w: np.ndarray, num_heads: int, num_kv_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row order: it stores each head's rotary halves interleaved (pairs),
    Hugging Face stores them as two halves. A bias is a one-column matrix here."""
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        n = num_heads
    elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        n = num_kv_heads
    else:
        return w
    rows, cols = w.shape[0], int(np.prod(w.shape[1:]))
    return w.reshape(n, rows // n // 2, 2, cols).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class GGUFFamily:
    model_type: str  # the Hugging Face model_type (= our ModelConfig.family) it becomes
    permute_qk: bool  # llama.cpp permuted q/k rows for its rotary layout (Llama-layout files)
    block_tensors: dict[str, str] = dataclasses.field(default_factory=lambda: dict(LLAMA_BLOCK_TENSORS))
    transforms: tuple[Transform, ...] = ()  # applied in order after dequantizing, before the shape check
    hf_config: Callable = hf_config_from_metadata  # (meta, arch, family, tensor names, path) -> HF config dict
    layout: Callable = our_layout  # (HF config dict, path) -> Layout
    stop_tokens: tuple[str, ...] = ()  # end-of-turn tokens the metadata does not name, added to eos

    def all_transforms(self) -> tuple[Transform, ...]:
        return ((unpermute_qk,) if self.permute_qk else ()) + self.transforms

    def hf_name(self, gguf_name: str) -> str | None:
        """The Hugging Face name of a llama.cpp tensor, or None if this family has no such tensor."""
        stem, _, suffix = gguf_name.rpartition(".")
        if suffix not in ("weight", "bias"):
            return None
        parts = stem.split(".")
        if len(parts) == 1 and parts[0] in GLOBAL_TENSORS:
            return f"{GLOBAL_TENSORS[parts[0]]}.{suffix}"
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in self.block_tensors:
            return f"model.layers.{parts[1]}.{self.block_tensors[parts[2]]}.{suffix}"
        return None


# Keyed by `general.architecture`, which is also the prefix of the family's metadata keys. llama.cpp
# writes Mistral (and SmolLM2) files as "llama"; "mistral" is accepted for writers that say so.
GGUF_FAMILIES = {
    "llama": GGUFFamily("llama", permute_qk=True),
    "mistral": GGUFFamily("mistral", permute_qk=True),
    "qwen2": GGUFFamily("qwen2", permute_qk=False),
    "qwen3": GGUFFamily("qwen3", permute_qk=False),
    "gemma3": GGUFFamily("gemma3_text", permute_qk=False, block_tensors=GEMMA3_BLOCK_TENSORS,
                         transforms=(unshift_norms,), hf_config=gemma_hf_config, stop_tokens=(END_OF_TURN,)),
    "gemma2": GGUFFamily("gemma2", permute_qk=False, block_tensors=GEMMA2_BLOCK_TENSORS,
                         transforms=(unshift_norms,), hf_config=gemma_hf_config, stop_tokens=(END_OF_TURN,)),
}
