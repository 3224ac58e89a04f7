"""Hydra: sequentially dependent heads (jaxaccel.heads.hydra), optionally with Hydra++'s prefix layer.

State: HeadsState with head_input_bd = the base's (or the prefix layer's) state at position L - 1,
L the base cache's length; the prefix layer's cache holds positions 0 .. L - 1. Depth by depth,
head k reads each depth-k node's path of tokens and drafts its children. Heads over a trimmed
draft vocabulary propose only its tokens (top ranks mapped through d2t); verification still scores
the whole vocabulary, so the output is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax.numpy as jnp

from jaxaccel.decoding.tree import Tree
from jaxaccel.drafters.common import (HeadsState, at_last_accepted, last_prompt_state, place_children, root_only,
                                      top_draft_tokens)
from jaxaccel.drafters.protocol import Draft, Prefill, Verified
from jaxaccel.drafters.record import DrafterRecord
from jaxaccel.heads.hydra import HydraHeads


@dataclass(frozen=True)
class HydraDrafter:
    """Drafts a static tree of rank paths with hydra heads."""

    tree: Tree
    module: HydraHeads | None = field(default=None, compare=False, repr=False)

    def start(self, base, heads, prefill: Prefill) -> HeadsState:
        cache = heads.init_cache(prefill.hidden_bsd.shape[0], prefill.cache_len)
        h_bsd, cache = heads.prefix(prefill.hidden_bsd, cache=cache)
        if cache is not None:
            cache = cache.advance(prefill.lengths_b)
        return HeadsState(cache=cache, head_input_bd=last_prompt_state(h_bsd, prefill.lengths_b))

    def draft(self, base, heads, state: HeadsState, root_b, cache) -> Draft:
        tree = self.tree
        tokens_bn = root_only(tree, root_b)
        for k in range(tree.depth):
            parents = tree.parents_at(k)
            path_bpj = tokens_bn[:, tree.ancestors_nd[parents][:, :k + 1]]
            h_bpd = jnp.broadcast_to(state.head_input_bd[:, None], path_bpj.shape[:2] + state.head_input_bd.shape[-1:])
            top_bpr = top_draft_tokens(heads, heads.head(base, k, h_bpd, path_bpj), tree.max_rank)
            tokens_bn = place_children(tree, tokens_bn, k + 1, top_bpr, parents)
        return Draft(tokens_bn, tree.batch(root_b.shape[0]))

    def commit(self, base, heads, state: HeadsState, verified: Verified) -> HeadsState:
        verdict = verified.verdict
        if state.cache is None:
            return HeadsState(cache=None, head_input_bd=at_last_accepted(verified.hidden_bnd, verdict))
        # The prefix layer over the accepted nodes' base hidden states (positions L .. L + m).
        path_hidden_bdd = jnp.take_along_axis(verified.hidden_bnd, verdict.path_bd[:, :, None], axis=1)
        positions_bd = verified.lengths_b[:, None] + jnp.arange(verdict.path_bd.shape[1])
        h_bdd, cache = heads.prefix(path_hidden_bdd, positions_bd, cache=state.cache)
        return HeadsState(cache=cache.advance(verdict.num_nodes_b), head_input_bd=at_last_accepted(h_bdd, verdict, True))


RECORD = DrafterRecord(
    name="hydra", summary="Hydra heads: each head also reads the drafted path's tokens; Hydra++ prefix layer (trained)",
    make=lambda tree, module: HydraDrafter(tree, module), module=HydraHeads,
    default_tree=Tree(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0),
                       (1, 0, 0), (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 0, 0))),
    train_depth=lambda heads_config, distill_config: heads_config.num_heads,
    heads_options=("share_lm_head", "prefix_layer", "draft_vocab_size"), depth_per_head=True,
    trainer="python -m train.heads --kind hydra (on the base's text), or python -m train.hydra (on cached features)")
