"""HeadsConfig: the architecture of a set of draft heads (frozen, hashable: a static `jit` argument)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

@dataclass(frozen=True)
class HeadsConfig:
    """Draft heads over a base model's last hidden states.

    `kind` names a trained drafter's record (jaxaccel.drafters.registry). Depth k (0-based) drafts the token k + 2 places after the position whose hidden state it
    reads; the base model itself predicts the token 1 place after. `num_heads` is that depth for
    every kind: the number of heads (medusa, hydra) or of autoregressive draft steps (eagle).
    """

    kind: str = "medusa"
    num_heads: int = 4
    num_blocks: int = 1  # residual SiLU blocks per head (medusa, hydra)
    share_lm_head: bool = False  # the base's frozen LM head instead of trained copies of it (kinds whose record takes it)
    prefix_layer: bool = False  # hydra++: one causal decoder layer over the base hidden states (likewise)
    draft_vocab_size: int = 0  # a trimmed draft LM head over this many tokens (jaxaccel.draft_vocab); 0: all

    def __post_init__(self):
        from jaxaccel.drafters.registry import RECORDS, heads_kinds  # the records import this module

        if self.kind not in heads_kinds():
            raise ValueError(f"unknown heads kind {self.kind!r}; expected one of {sorted(heads_kinds())}")
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}")
        if self.draft_vocab_size < 0:
            raise ValueError(f"draft_vocab_size must be >= 0 (0: the whole vocabulary), got {self.draft_vocab_size}")
        for option in ("prefix_layer", "share_lm_head", "draft_vocab_size"):  # each kind's record says which it takes
            if getattr(self, option) and option not in RECORDS[self.kind].heads_options:
                takers = [name for name in heads_kinds() if option in RECORDS[name].heads_options]
                raise ValueError(f"{option} is a {' / '.join(takers)} option, not one of {self.kind!r}")

    def replace(self, **overrides: Any) -> HeadsConfig:
        """A copy with some fields changed (validated again)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown heads config field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-ready values (heads_config.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadsConfig:
        """The config from `to_dict`'s output."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown heads config field(s) {unknown}")
        return cls(**d)
