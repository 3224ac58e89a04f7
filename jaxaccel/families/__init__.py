"""Model families as adapters over the one Transformer, and their registry.

A family module (llama, mixtral, qwen, gemma) states its Hugging Face model_type and architecture,
its config.json mapping both ways, its architectural flags and any tensor names of its own, as
`Family` records (common.py). Adding a family is one module plus one registry line below, plus its
name in jaxaccel.config.FAMILIES (which cannot import this package: the adapters import it).
"""

from jaxaccel.families import gemma, llama, mixtral, qwen
from jaxaccel.families.common import Family, FamilyConfigError, hf_dimensions

# Hugging Face model_type -> family.
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    llama.LLAMA, llama.MISTRAL, mixtral.MIXTRAL,
    qwen.QWEN2, qwen.QWEN3, qwen.QWEN2_MOE, qwen.QWEN3_MOE,
    gemma.GEMMA2, gemma.GEMMA3,
)}
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES.values()}  # ModelConfig.family -> family

__all__ = ["BY_NAME", "FAMILIES", "Family", "FamilyConfigError", "family_for", "hf_dimensions", "named"]


def family_for(model_type: str) -> Family:
    """The family of a config.json's model_type."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def named(name: str) -> Family:
    """The family a ModelConfig.family names."""
    if name not in BY_NAME:
        raise ValueError(f"unknown model family {name!r}; supported: {sorted(BY_NAME)}")
    return BY_NAME[name]
