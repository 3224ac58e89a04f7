"""EAGLE-3: the draft layer over the base's fused low/middle/high features (jaxaccel.heads.eagle3),
drafting through its trimmed LM head.

State: HeadsState whose cache holds the draft layer's entries for positions 0 .. L - 2 (entry i
combines the base's fused feature g at i with the token at i + 1), L the base cache's length, and
head_input_bd = g at L - 1. The base's states after the head's `capture` layers arrive with the
prefill and every verify pass (the loop asks for them because the drafter names them in
`capture`). Drafts are top-r in the draft vocabulary, mapped to target ids through d2t: a token
outside it is never proposed, and verification, over the full vocabulary, stays lossless.
`Eagle3Drafter` drafts a static tree; with a DynamicTree the record builds `DynamicEagle3Drafter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from jaxaccel.decoding.tree import DynamicTree, Tree
from jaxaccel.drafters.common import HeadsState, at_last_accepted, last_prompt_state, sample_children, top_ranks
from jaxaccel.drafters.eagle import DynamicEagleDrafter, EagleDrafter
from jaxaccel.drafters.protocol import Draft, Prefill, Verified
from jaxaccel.drafters.record import DrafterRecord
from jaxaccel.heads.eagle3 import Eagle3Heads


@dataclass(frozen=True)
class Eagle3Drafter(EagleDrafter):
    """EagleDrafter's depth-by-depth drafting (every node drafted so far an entry: its parent's
    output state, or the base's fused feature for the root, with its token), ranked through the
    trimmed LM head; its own start and commit over the fused low/middle/high features."""

    tree: Tree
    module: Eagle3Heads | None = field(default=None, compare=False, repr=False)
    capture: tuple[int, ...] = ()  # the base layers whose states the head fuses

    def start(self, base, heads, prefill: Prefill) -> HeadsState:
        # Entries 0 .. len-2: the prompt's fused features with the following prompt token.
        tokens_bs, lengths_b = prefill.tokens_bs, prefill.lengths_b
        fused_bsd = heads.fuse(prefill.captured_bskd)
        next_bs = jnp.concatenate([tokens_bs[:, 1:], tokens_bs[:, :1]], axis=1)
        cache = heads.init_cache(tokens_bs.shape[0], prefill.cache_len)
        _, cache = heads.features(base, fused_bsd, next_bs, cache=cache)
        return HeadsState(cache=cache.advance(lengths_b - 1), head_input_bd=last_prompt_state(fused_bsd, lengths_b))

    def top_tokens(self, base, heads, states_bnd: jax.Array, max_rank: int) -> jax.Array:
        """Top ranks over the trimmed LM head, mapped back to target token ids through d2t."""
        return heads.d2t[...][top_ranks(heads.draft_logits(states_bnd), max_rank)]

    def sampled_tokens(self, base, heads, states_bnd: jax.Array, max_rank: int, policy, key):
        """Drawn over the trimmed LM head (q is 0 outside the draft vocabulary), mapped through d2t."""
        d2t = heads.d2t[...]
        tokens_bnk, q_bnn = sample_children(heads.draft_logits(states_bnd), max_rank, policy, key)
        q_bnv = jnp.zeros(q_bnn.shape[:-1] + (heads.vocab_size,), q_bnn.dtype).at[..., d2t].set(q_bnn)
        return d2t[tokens_bnk], q_bnv

    def commit(self, base, heads, state: HeadsState, verified: Verified) -> HeadsState:
        # Entry j (position L-1+j) combines the fused feature at L-1+j with the accepted token at L+j.
        verdict, draft_bn = verified.verdict, verified.draft.tokens_bn
        path_captured_bdkd = jnp.take_along_axis(verified.captured_bnkd, verdict.path_bd[:, :, None, None], axis=1)
        path_fused_bdd = heads.fuse(path_captured_bdkd)
        feats_bdd = jnp.concatenate([state.head_input_bd[:, None], path_fused_bdd[:, :-1]], axis=1)
        tokens_bd = jnp.take_along_axis(draft_bn, verdict.path_bd, axis=1)
        _, cache = heads.features(base, feats_bdd, tokens_bd, cache=state.cache)
        return HeadsState(cache=cache.advance(verdict.num_nodes_b),
                          head_input_bd=at_last_accepted(path_fused_bdd, verdict, True))


class _TrimmedHeadView:
    """What DynamicEagleDrafter asks of `base`, answered by the EAGLE-3 head: the base's token
    embedding, and logits through the trimmed LM head (-inf outside the draft vocabulary)."""

    def __init__(self, base, heads: Eagle3Heads):
        self.embed_tokens, self.logits = base.embed_tokens, heads.target_logits


@dataclass(frozen=True)
class DynamicEagle3Drafter(Eagle3Drafter):
    """EAGLE-2's per-row tree growth (jaxaccel.drafters.eagle.DynamicEagleDrafter), over this
    head's states and its trimmed LM head: top-k over logits that are -inf outside the draft
    vocabulary picks draft-vocabulary tokens only (k <= N)."""

    tree: DynamicTree = None
    sample_draft = None  # the tree grows by draft score: its drafts are point masses

    def draft(self, base, heads, state: HeadsState, root_b: jax.Array, cache) -> Draft:
        if self.tree.topk > heads.draft_vocab_size:
            raise ValueError(f"a dynamic tree's topk ({self.tree.topk}) exceeds the draft vocabulary "
                             f"({heads.draft_vocab_size} tokens)")
        return DynamicEagleDrafter.draft(self, _TrimmedHeadView(base, heads), heads, state, root_b, cache)


def make(tree: Tree | DynamicTree, module: Eagle3Heads) -> Eagle3Drafter:
    cls = DynamicEagle3Drafter if isinstance(tree, DynamicTree) else Eagle3Drafter
    return cls(tree=tree, module=module, capture=tuple(module.capture))


def _train_depth(heads_config, distill_config) -> int:
    raise ValueError("eagle3 heads train on cached base features, not with train.heads: "
                     "python -m train.eagle3 --model MODEL --features DIR --out DIR")


RECORD = DrafterRecord(
    name="eagle3", summary="EAGLE-3: a draft layer over the base's fused low/middle/high features, "
                           "trimmed draft vocabulary, static or dynamic trees (trained on cached features)",
    make=make, module=Eagle3Heads,
    # Sized for a CPU where a base forward over n tokens costs ~1.2/1.4/1.7x one for n = 2/4/8:
    # 8 nodes, the top-1 chain deepest.
    default_tree=Tree(((0,), (1,), (0, 0), (0, 1), (0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0, 0))),
    train_depth=_train_depth, heads_options=("draft_vocab_size",), dynamic_trees=True,
    trainer="python -m train.eagle3")
