"""Medusa: K independent heads over the base's last verified hidden state (jaxaccel.heads.medusa).

State: HeadsState(cache=None, head_input_bd = the base's hidden state at position L - 1), with L
the base cache's length. Head k's top-r tokens fill every depth-(k+1) node of rank r (Medusa's
Cartesian tree). Heads over a trimmed draft vocabulary propose only its tokens (top ranks mapped
through d2t); verification still scores the whole vocabulary, so the output is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jaxaccel.decoding.tree import Tree
from jaxaccel.drafters.common import HeadsState, at_last_accepted, last_prompt_state, root_only, top_draft_tokens
from jaxaccel.drafters.protocol import Draft, Prefill, Verified
from jaxaccel.drafters.record import DrafterRecord
from jaxaccel.heads.medusa import MedusaHeads


@dataclass(frozen=True)
class MedusaDrafter:
    """Drafts a static tree of rank paths with medusa heads."""

    tree: Tree
    module: MedusaHeads | None = field(default=None, compare=False, repr=False)

    def start(self, base, heads, prefill: Prefill) -> HeadsState:
        return HeadsState(cache=None, head_input_bd=last_prompt_state(prefill.hidden_bsd, prefill.lengths_b))

    def draft(self, base, heads, state: HeadsState, root_b, cache) -> Draft:
        tree = self.tree
        top_kbr = top_draft_tokens(heads, heads(base, state.head_input_bd, tree.depth), tree.max_rank)
        nodes = np.arange(1, tree.num_nodes)
        tokens_bn = root_only(tree, root_b).at[:, nodes].set(top_kbr[tree.depth_n[nodes] - 1, :, tree.rank_n[nodes]].T)
        return Draft(tokens_bn, tree.batch(root_b.shape[0]))

    def commit(self, base, heads, state: HeadsState, verified: Verified) -> HeadsState:
        return HeadsState(cache=None, head_input_bd=at_last_accepted(verified.hidden_bnd, verified.verdict))


RECORD = DrafterRecord(
    name="medusa", summary="Medusa heads: one head per depth over the last verified hidden state (trained)",
    make=lambda tree, module: MedusaDrafter(tree, module), module=MedusaHeads,
    # One distribution per depth: most nodes go to the first levels.
    default_tree=Tree(((0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0),
                       (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0, 0))),
    train_depth=lambda heads_config, distill_config: heads_config.num_heads,
    heads_options=("share_lm_head", "draft_vocab_size"), depth_per_head=True)
