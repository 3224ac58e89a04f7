"""Choosing the accepted path through a verified draft tree.

The base model has scored every tree node in one forward pass: logits_bnv[b, i] is its
next-token distribution after node i. Starting at the root (the base's own token), the walk
offers a node's children, in rank order, to the base distribution p there by recursive
rejection sampling (SpecInfer / EAGLE): a child's token x is a point-mass draft, so it is
accepted with probability p(x); on rejection x is removed from p and p renormalised, and the
next sibling is tried. If every child is rejected, the bonus token is drawn from what is left
of p. The emitted tokens therefore follow the base model's (filtered) distribution exactly,
whatever the drafts are. At temperature 0 p is one-hot, and this is "accept the child equal
to the base's argmax" — the output equals greedy decoding token for token.

Sampled drafts (a drafter that drew node i's token from a distribution q_i, given as `q_bnv`)
take the q-aware rule of speculative sampling: with r the residual (p at first), x is accepted
with probability min(1, r(x) / q_i(x)), and on rejection r becomes max(r - q_i, 0), renormalised.
Each step outputs r's law whatever q_i is, so the walk stays lossless, and a point mass is the
special case above; acceptance rises from p(x) towards sum(min(p, q)) as q nears p.

`TypicalAcceptance` (Medusa) is the explicitly lossy alternative: a child is accepted when
its base probability clears an entropy-dependent threshold.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxaccel.decoding.sampling import Greedy, Policy, categorical_tokens, greedy_tokens, row_keys
from jaxaccel.decoding.tree import Tree, TreeBatch


@struct.dataclass
class Verdict:
    """What verification decided per row: the accepted path's nodes, how many, and the base's bonus token."""
    path_bd: jax.Array  # [B, depth + 1] nodes root..last accepted, padded by repeating the last
    num_nodes_b: jax.Array  # [B] accepted nodes, root included = tokens emitted (the bonus replaces the root)
    bonus_b: jax.Array  # [B] the base model's token after the last accepted node

    def emitted(self, draft_bn: jax.Array) -> jax.Array:
        """[B, depth + 1] the tokens this step emits: accepted drafts below the root, then the bonus
        token (entries past num_nodes_b are padding)."""
        below_root_bd = jnp.take_along_axis(draft_bn, self.path_bd[:, 1:], axis=1)
        tokens_bd = jnp.concatenate([below_root_bd, self.bonus_b[:, None]], axis=1)
        slot_d = jnp.arange(tokens_bd.shape[1])
        return jnp.where(slot_d == self.num_nodes_b[:, None] - 1, self.bonus_b[:, None], tokens_bd)


@dataclass(frozen=True)
class TypicalAcceptance:
    """Medusa's typical acceptance (lossy): accept a child whose base probability (at
    `temperature`) exceeds min(epsilon, delta * exp(-entropy)); the bonus token is greedy."""

    epsilon: float = 0.09
    delta: float = 0.3
    temperature: float = 0.7


def verify_tree(tree: Tree | TreeBatch, draft_bn: jax.Array, logits_bnv: jax.Array,
                policy: Policy | TypicalAcceptance, key: jax.Array, q_bnv: jax.Array | None = None) -> Verdict:
    """Accepts a path through the tree for each row. draft_bn[b, i] is node i's token (node 0 the
    root); `tree` is a static Tree or each row's own (TreeBatch); `policy` is the sampling policy
    whose distribution the output must follow. `q_bnv` (sampled drafts, T > 0 only): the
    distribution over the full vocabulary each node's token was drawn from (a point-mass node's row
    is one-hot; node 0's row is unused); None: every draft is a point mass."""
    if isinstance(tree, Tree):
        tree = tree.batch(draft_bn.shape[0])
    if isinstance(policy, TypicalAcceptance):
        return _typical(tree, draft_bn, logits_bnv, policy)
    if isinstance(policy, Greedy):
        if q_bnv is not None:
            raise ValueError("sampled drafts (q_bnv) are verified at temperature > 0 only")
        return _greedy(tree, draft_bn, logits_bnv)
    b, n, v = logits_bnv.shape
    probs_bnv = jax.nn.softmax(policy.filtered_logits(logits_bnv.reshape(b * n, v)), axis=-1).reshape(b, n, v)
    walk = functools.partial(_walk, tree.max_depth)
    if q_bnv is None:
        last_b, bonus_b = jax.vmap(walk)(tree.children_bnc, draft_bn, probs_bnv, row_keys(key, b))
    else:
        last_b, bonus_b = jax.vmap(walk)(tree.children_bnc, draft_bn, probs_bnv, row_keys(key, b), q_bnv)
    return _verdict(tree, last_b, bonus_b)


def _walk(depth: int, children_nc: jax.Array, draft_n: jax.Array, probs_nv: jax.Array, key: jax.Array,
          q_nv: jax.Array | None = None):
    """One row's recursive rejection sampling down the tree -> (last accepted node, bonus token).
    The residual distribution is kept unnormalised, its mass beside it, so that rejecting a
    point-mass child is O(1) (zero its token, subtract its mass), not a pass over the vocabulary;
    rejecting a sampled child (q_nv given) subtracts mass * q from the residual."""
    width = children_nc.shape[1]

    def offer_child(carry, slot_and_depth):
        chosen, residual_v, mass, node, stopped = carry
        slot, depth = slot_and_depth
        child = children_nc[node, slot]
        token = draft_n[jnp.maximum(child, 0)]
        live = (child >= 0) & (chosen < 0) & ~stopped
        u = jax.random.uniform(jax.random.fold_in(key, depth * width + slot))
        p_token = residual_v[token]
        if q_nv is None:
            accept = live & (u * mass < p_token)  # u < the normalised residual probability
            reject = live & ~accept
            residual_v = residual_v.at[token].set(jnp.where(reject, 0.0, p_token))
            mass = jnp.where(reject, mass - p_token, mass)
        else:
            q_v = q_nv[jnp.maximum(child, 0)]
            accept = live & (u * mass * q_v[token] < p_token)  # u < r(x) / q(x), r normalised
            reject = live & ~accept
            left_v = jnp.maximum(residual_v - mass * q_v, 0.0)
            left_mass = jnp.sum(left_v)
            # Rejection has probability 0 when q equals r; rounding can still reject, and then r
            # (not an all-zero residual) stays what the bonus is drawn from.
            reject &= left_mass > 1e-6 * mass
            residual_v = jnp.where(reject, left_v, residual_v)
            mass = jnp.where(reject, left_mass, mass)
        return (jnp.where(accept, child, chosen), residual_v, mass, node, stopped), None

    def descend(carry, depth):
        node, residual_v, mass, stopped = carry
        slots = (jnp.arange(width), jnp.full((width,), depth))
        (chosen, residual_v, mass, _, _), _ = jax.lax.scan(
            offer_child, (jnp.int32(-1), residual_v, mass, node, stopped), slots)
        advanced = chosen >= 0
        node = jnp.where(advanced, chosen, node)
        residual_v = jnp.where(advanced, probs_nv[node], residual_v)
        mass = jnp.where(advanced, jnp.sum(residual_v), mass)
        return (node, residual_v, mass, stopped | ~advanced), None

    init = (jnp.int32(0), probs_nv[0], jnp.sum(probs_nv[0]), jnp.bool_(False))
    (last, residual_v, _, _), _ = jax.lax.scan(descend, init, jnp.arange(depth))
    return last, categorical_tokens(jax.random.fold_in(key, depth * width), jnp.log(residual_v))


def _drafts_parent_chose(tree: TreeBatch, draft_bn, choice_bn) -> jax.Array:
    """[B, N] whether each node's token is its parent's choice (choice_bn: per node)."""
    return draft_bn == jnp.take_along_axis(choice_bn, jnp.maximum(tree.parent_bn, 0), axis=1)


def _greedy(tree: TreeBatch, draft_bn, logits_bnv) -> Verdict:
    """The walk with one-hot distributions, without its sequential steps: a node is accepted when
    it and its ancestors each carry their parent's argmax and no earlier sibling does (the walk
    offers siblings in order), so the accepted nodes form one path; the bonus token is the argmax
    after the deepest of them."""
    target_bn = greedy_tokens(logits_bnv)
    correct_bn = _drafts_parent_chose(tree, draft_bn, target_bn)
    n = tree.num_nodes
    earlier_sibling_bnn = ((tree.parent_bn[:, :, None] == tree.parent_bn[:, None, :])
                           & (np.arange(n)[None, :] < np.arange(n)[:, None]))
    shadowed_bn = jnp.any(correct_bn[:, None, :] & earlier_sibling_bnn, axis=-1)
    return _deepest_accepted(tree, (correct_bn & ~shadowed_bn).at[:, 0].set(True), target_bn)


def _deepest_accepted(tree: TreeBatch, correct_bn, next_bn) -> Verdict:
    """Accepts the deepest node whose path is correct throughout (the first such on ties); the
    bonus token is next_bn at that node."""
    accepted_bn = jnp.all(jnp.where(tree.mask_bnn, correct_bn[:, None, :], True), axis=-1)
    last_b = jnp.argmax(jnp.where(accepted_bn, tree.depth_bn, -1), axis=1).astype(jnp.int32)
    return _verdict(tree, last_b, jnp.take_along_axis(next_bn, last_b[:, None], axis=1)[:, 0])


def _typical(tree: TreeBatch, draft_bn, logits_bnv, rule: TypicalAcceptance) -> Verdict:
    logp_bnv = jax.nn.log_softmax(logits_bnv.astype(jnp.float32) / rule.temperature, axis=-1)
    entropy_bn = -jnp.sum(jnp.exp(logp_bnv) * logp_bnv, axis=-1)
    threshold_bn = jnp.minimum(rule.epsilon, rule.delta * jnp.exp(-entropy_bn))
    parent_bn = jnp.maximum(tree.parent_bn, 0)
    # Node i is plausible if its token clears the threshold of its parent's distribution.
    logp_parent_bnv = jnp.take_along_axis(logp_bnv, parent_bn[:, :, None], axis=1)
    logp_of_draft_bn = jnp.take_along_axis(logp_parent_bnv, draft_bn[:, :, None], axis=2)[..., 0]
    plausible_bn = (jnp.exp(logp_of_draft_bn) > jnp.take_along_axis(threshold_bn, parent_bn, axis=1)).at[:, 0].set(True)
    return _deepest_accepted(tree, plausible_bn, greedy_tokens(logits_bnv))


def _verdict(tree: TreeBatch, last_b: jax.Array, bonus_b: jax.Array) -> Verdict:
    path_bd = jnp.take_along_axis(tree.ancestors_bnd, last_b[:, None, None], axis=1)[:, 0]
    depth_b = jnp.take_along_axis(tree.depth_bn, last_b[:, None], axis=1)[:, 0]
    return Verdict(path_bd=path_bd, num_nodes_b=depth_b + 1, bonus_b=bonus_b)
