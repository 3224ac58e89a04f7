"""Draft heads over a frozen base model's hidden states: medusa, hydra, eagle.

Every kind is an NNX module built as `make_heads(config, base_config, rngs=...)`, initialised
from the base with `heads.init_from_base(base)`, and trained through one method,

    heads.teacher_forced(base, hidden_btd, tokens_bt, depth) -> DraftOutput(logits_kbtv, features_kbtd)

whose row t of depth k drafts the token at t + k + 2 (see jaxaccel.heads.common; over a trimmed
draft vocabulary, `draft_vocab_size` N > 0, the logits cover N tokens that `d2t` maps to target
ids, set by `init_from_base(base, d2t)`: medusa, hydra, eagle3). The base model
is an argument, never an attribute: its parameters stay out of the heads' state (frozen, not in
the optimizer). Each kind's module docstring gives its drafting API for the speculative loop;
`load_heads` reads a heads directory after checking that it belongs to the base model. Each kind
is a trained drafter's record (jaxaccel.drafters.registry): its module, default tree, training
rule and options; the drafting strategies live in jaxaccel.drafters.
"""

from jaxaccel.heads.common import DraftOutput
from jaxaccel.heads.config import HeadsConfig
from jaxaccel.heads.eagle import EagleHeads, EagleOutput
from jaxaccel.heads.hydra import HydraHeads
from jaxaccel.heads.io import HeadsMismatchError, base_fingerprint, load_heads, read_heads_config, save_heads
from jaxaccel.heads.medusa import MedusaHeads
from jaxaccel.heads.registry import HeadParts, Heads, make_heads

__all__ = ["DraftOutput", "EagleHeads", "EagleOutput", "HeadParts", "Heads", "HeadsConfig",
           "HeadsMismatchError", "HydraHeads", "MedusaHeads", "base_fingerprint", "load_heads", "make_heads",
           "read_heads_config", "save_heads"]
