"""One speculative step, laid open: the drafted tree, the base model's verdict, the accepted path.

    view = inspect_step(decoder, prompt_ids)          # decoder: a SpeculativeDecoder
    view.parent_n[i], view.depth_n[i]                  # the drafted tree (static, or EAGLE-2's own)
    view.tokens_n[i], view.target_n[i]                 # node i's draft, the base's greedy choice after it
    view.accepted                                      # nodes root .. last accepted
    x_n, y_n = tree_layout(view.parent_n)              # coordinates for drawing the tree

The step is the speculative loop's own (the decoder's drafter, `Transformer.forward` over the
tree, `verify_tree`), run once right after prefilling the prompt, so what it shows is what
`SpeculativeDecoder.generate` does on its first step: the root is the base's first token, the
emitted tokens are the accepted drafts below the root and then the bonus token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.decoding.sampling import Greedy, Policy
from jaxaccel.decoding.speculative import draft_and_verify, merge_parts


@dataclass(frozen=True)
class StepView:
    """One row's speculative step."""

    parent_n: np.ndarray  # [N] parent node of each node (-1 for the root)
    depth_n: np.ndarray  # [N] depth of each node (root 0)
    tokens_n: np.ndarray  # [N] drafted token of each node (node 0: the base's own next token)
    target_n: np.ndarray  # [N] the base model's argmax after each node (what a greedy verifier accepts)
    accepted: tuple[int, ...]  # nodes root .. last accepted, in order
    bonus: int  # the base model's token after the last accepted node

    @property
    def num_nodes(self) -> int:
        """N, the root included."""
        return len(self.parent_n)

    @property
    def emitted(self) -> list[int]:
        """Tokens the step adds after the root: accepted drafts below it, then the bonus token."""
        return [int(self.tokens_n[i]) for i in self.accepted[1:]] + [self.bonus]


def _draft_and_verify(graphdef, params, module_graphdef, module_params, state, *, policy, drafter):
    model, module = merge_parts(graphdef, params, module_graphdef, module_params)
    draft, out, verdict = draft_and_verify(model, module, state, policy=policy, drafter=drafter)
    return draft.tokens_bn, draft.tree, jnp.argmax(out.logits, axis=-1), verdict


_draft_and_verify_jit = jax.jit(_draft_and_verify, static_argnums=(0, 2), static_argnames=("policy", "drafter"))


def inspect_step(decoder, prompt: Sequence[int], *, policy: Policy = Greedy(), seed: int = 0) -> StepView:
    """The first speculative step of `decoder` (a SpeculativeDecoder) after prefilling `prompt`."""
    if len(prompt) == 0:
        raise ValueError("inspect_step needs a non-empty prompt")
    state, _ = decoder.start([list(prompt)], policy=policy, max_new_tokens=decoder.tree.depth + 2, seed=seed)
    draft_bn, tree_b, target_bn, verdict = jax.device_get(_draft_and_verify_jit(
        decoder.graphdef, decoder.params, decoder.module_graphdef, decoder.module_params, state, policy=policy,
        drafter=decoder.drafter))
    count = int(verdict.num_nodes_b[0])
    return StepView(parent_n=np.asarray(tree_b.parent_bn[0]), depth_n=np.asarray(tree_b.depth_bn[0]),
                    tokens_n=np.asarray(draft_bn[0]), target_n=np.asarray(target_bn[0]),
                    accepted=tuple(int(i) for i in verdict.path_bd[0, :count]), bonus=int(verdict.bonus_b[0]))


def tree_layout(parent_n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x_n, y_n) for drawing a tree given each node's parent (-1 for the root, node 0): y = -depth;
    leaves one unit apart in depth-first order (children in index order), parents centred over
    their children."""
    parent_n = np.asarray(parent_n)
    if parent_n[0] != -1 or np.any(parent_n[1:] < 0):
        raise ValueError(f"node 0 must be the only root (parent -1), got parents {parent_n.tolist()}")
    kids = [[] for _ in parent_n]
    for node, parent in enumerate(parent_n[1:], start=1):
        kids[parent].append(node)
    x_n, y_n = np.zeros(len(parent_n)), np.zeros(len(parent_n))
    next_leaf = [0.0]

    def place(node: int, depth: int) -> float:
        y_n[node] = -depth
        if kids[node]:
            x_n[node] = np.mean([place(c, depth + 1) for c in kids[node]])
        else:
            x_n[node], next_leaf[0] = next_leaf[0], next_leaf[0] + 1.0
        return x_n[node]

    place(0, 0)
    return x_n, y_n
