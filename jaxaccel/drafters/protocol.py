"""The drafter protocol: what the speculative loop asks of every drafting method.

A drafter is a frozen, hashable object (a static `jit` argument) with

    tree                                      a Tree or DynamicTree: the static size of what it drafts
    module                                    its trained parameters (an NNX module), or None
    capture  (optional)                       base layer indices whose outputs it reads (EAGLE-3's
                                              low/middle/high features): they arrive as `captured`
                                              in Prefill and Verified
    start(base, module, prefill) -> state     once, after the base's prefill
    draft(base, module, state, root_b, cache) -> Draft
                                              `cache`: the base's KVCache, committed through the
                                              position before the root (layer skipping drafts with
                                              the base's own K/V); read-only in effect: what a
                                              drafter writes into its copy never reaches the loop,
                                              whose verify pass writes every node's K/V itself
    commit(base, module, state, verified) -> state   after every verify pass; it reads the pass
                                              through node indices (`verdict`, the draft's tokens),
                                              never its own tree's layout: composed with heads
                                              (jaxaccel.drafters.compose) it gets the union's pass

Optional, the capability to carry state across calls (Token Recycling keeps its table from one
query to the next; REST's datastore arrives this way, as arrays rather than constants):

    empty_carry(base) -> carried              what a decoder's first call starts from
    carry(state) -> carried                   after a call: what the next call starts from (a
                                              pytree of fixed shapes without a batch axis)
    start(base, module, prefill, carried)     the next call's start, from it

Optional, the capability to sample drafts (used at temperature > 0 in place of `draft`):

    sample_draft(base, module, state, root_b, cache, policy, key) -> Draft
                                              each node's token drawn from a distribution q
                                              (the drafter's own at the policy's temperature and
                                              filters), returned in Draft.q_bnv; verification
                                              then takes the q-aware rule, lossless for any q

A SpeculativeDecoder holds the carried pytree between its calls (`reset()` drops it); `carried`
always has the same shapes, so a carried call compiles nothing new. What is carried changes the
drafts, never the output (a draft is lossless whatever it proposes).

`state` is any pytree the drafter chooses (a heads cache, a token buffer, a table); it must keep
its shapes from step to step. The loop splits `module` off the drafter once and hands it back,
merged, to every method: a drafter's own fields are static, its parameters never are. `draft`'s
drafts are point masses (one token per node): verification's recursive rejection sampling
accepts a draft token x with probability p(x) and otherwise samples from p without x, which is
lossless for any deterministic draft. `sample_draft`'s are drawn from q: x is accepted with
probability min(1, p(x) / q(x)), and acceptance approaches sum(min(p, q)) instead of p(top-1)
(see jaxaccel.decoding.verify).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
from flax import struct

from jaxaccel.decoding.tree import DynamicTree, Tree, TreeBatch
from jaxaccel.decoding.verify import Verdict


@struct.dataclass
class Draft:
    """One step's drafted tree: node tokens (node 0 the root: the base's token, already emitted)
    and each row's tree shape (the static tree broadcast, or each row's own)."""
    tokens_bn: jax.Array  # [B, N] int32
    tree: TreeBatch
    # [B, N, V] sampled drafts only: the distribution node i's token was drawn from, over the full
    # vocabulary (a point-mass node's row one-hot; row 0 unused); None: every node a point mass
    q_bnv: jax.Array | None = None


@struct.dataclass
class Prefill:
    """What a drafter sees once: the prompts and the base's prefill."""
    hidden_bsd: jax.Array  # [B, S, d] the base's last hidden states over the right-padded prompts
    tokens_bs: jax.Array  # [B, S] the prompts, right-padded
    lengths_b: jax.Array  # [B] prompt lengths
    first_b: jax.Array  # [B] the base's first token: emitted, the first step's root
    cache_len: int = struct.field(pytree_node=False)  # positions the base's cache holds
    captured_bskd: jax.Array | None = None  # [B, S, k, d] the base's states after the drafter's `capture` layers


@struct.dataclass
class Verified:
    """What a drafter sees after a verify pass: its draft, the base's outputs over it, the verdict."""
    draft: Draft
    hidden_bnd: jax.Array  # [B, N, d] the base's last hidden state at each node
    logits_bnv: jax.Array  # [B, N, V] the base's next-token logits after each node
    verdict: Verdict
    lengths_b: jax.Array  # [B] the base cache's length before the step (the root's position)
    captured_bnkd: jax.Array | None = None  # [B, N, k, d] the base's states after the drafter's `capture` layers

    @property
    def emitted_bd(self) -> jax.Array:
        """[B, depth + 1] the tokens this step emitted (accepted drafts, then the new root); the
        first `verdict.num_nodes_b` of each row are real."""
        return self.verdict.emitted(self.draft.tokens_bn)


class Drafter(Protocol):
    """See the module doc."""
    tree: Tree | DynamicTree
    module: Any

    def start(self, base, module, prefill: Prefill) -> Any: ...

    def draft(self, base, module, state: Any, root_b: jax.Array, cache: Any) -> Draft: ...

    def commit(self, base, module, state: Any, verified: Verified) -> Any: ...


def samples_drafts(drafter) -> bool:
    """Whether the drafter can sample its drafts (the optional `sample_draft` capability)."""
    return callable(getattr(drafter, "sample_draft", None))


def carries(drafter) -> bool:
    """Whether the drafter carries state across calls (the optional `carry` capability)."""
    return callable(getattr(drafter, "carry", None))
