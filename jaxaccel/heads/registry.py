"""Heads modules by kind, and heads <-> flat parameter dicts (for optax, orbax, safetensors).

A kind is a trained drafter's record (jaxaccel.drafters.registry): its `module` is the class built here.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxaccel.config import ModelConfig
from jaxaccel.heads.config import HeadsConfig
from jaxaccel.model import Transformer
from jaxaccel.training.steps import ModelParts

Heads = nnx.Module  # any trained drafter's module (MedusaHeads, HydraHeads, EagleHeads, ...)


def make_heads(config: HeadsConfig, base_config: ModelConfig, *, rngs: nnx.Rngs) -> Heads:
    """The heads module of `config.kind` for a base model of `base_config` (not yet initialised
    from the base: call `init_from_base`)."""
    from jaxaccel.drafters.registry import get_record  # the records import the heads modules

    return get_record(config.kind).module(config, base_config, rngs=rngs)


class HeadParts(ModelParts):
    """A heads module's static graph and parameter templates, to go between modules and flat
    {dotted name: array} dicts (the train state and the safetensors file use the names)."""

    def __init__(self, config: HeadsConfig, base_config: ModelConfig):
        super().__init__(lambda rngs: make_heads(config, base_config, rngs=rngs))
        self.config, self.base_config = config, base_config

    def init_from_base(self, base: Transformer, seed: int) -> dict[str, jax.Array]:
        """Fresh parameters, initialised from the base model (LM-head copies); call inside jit to
        create them sharded."""
        heads = self.make(nnx.Rngs(seed))
        heads.init_from_base(base)
        return self.params(heads)
