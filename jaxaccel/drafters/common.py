"""Pieces the drafters share: the heads' state, the rank-tree helpers, chains of drafted tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxaccel.cache import KVCache
from jaxaccel.decoding.sampling import categorical_tokens
from jaxaccel.decoding.tree import Tree
from jaxaccel.decoding.verify import Verdict

NO_TOKEN = -1  # a token slot holding no token (not yet written, or past a text's end): equal to none


@struct.dataclass
class HeadsState:
    """What a heads drafter carries between steps (each drafter's doc gives its invariants)."""
    cache: KVCache | None  # the heads' own cache (None for medusa and plain hydra)
    head_input_bd: jax.Array  # [B, d] what the heads read at the last committed position


def top_ranks(logits_xv: jax.Array, k: int) -> jax.Array:
    """[..., k] the k most likely tokens, best first."""
    return jax.lax.top_k(logits_xv, k)[1].astype(jnp.int32)


def top_draft_tokens(heads, logits_xn: jax.Array, k: int) -> jax.Array:
    """[..., k] target token ids of the k most likely entries of heads' logits over their draft
    vocabulary (medusa, hydra: mapped through d2t when it is trimmed), best first."""
    if k > logits_xn.shape[-1]:
        raise ValueError(f"the tree ranks {k} tokens per node, more than the heads' draft vocabulary "
                         f"({logits_xn.shape[-1]} tokens)")
    return heads.target_tokens(top_ranks(logits_xn, k))


def last_prompt_state(hidden_bsd: jax.Array, lengths_b: jax.Array) -> jax.Array:
    """[B, d] the state at each prompt's last position."""
    return jnp.take_along_axis(hidden_bsd, (lengths_b - 1)[:, None, None], axis=1)[:, 0]


def at_last_accepted(x_bnd: jax.Array, verdict: Verdict, along_path: bool = False) -> jax.Array:
    """x at the last accepted node; x is indexed by tree node, or (along_path) by depth on the path."""
    depth_b = verdict.num_nodes_b - 1
    node_b = depth_b if along_path else jnp.take_along_axis(verdict.path_bd, depth_b[:, None], axis=1)[:, 0]
    return jnp.take_along_axis(x_bnd, node_b[:, None, None], axis=1)[:, 0]


def place_children(tree: Tree, draft_bn: jax.Array, depth: int, top_bpr: jax.Array, parents: np.ndarray,
                   by_rank: bool = True):
    """Writes the depth-`depth` nodes' entries: the child of rank r under parents[p] takes
    top_bpr[:, p, r] (by_rank=False: top_bpr[:, p, 0], what every child of p shares)."""
    nodes = np.flatnonzero(tree.depth_n == depth)
    parent_pos = np.searchsorted(parents, tree.parent_n[nodes])
    return draft_bn.at[:, nodes].set(top_bpr[:, parent_pos, tree.rank_n[nodes] if by_rank else 0])


def sample_children(logits_bnv: jax.Array, k: int, policy, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """([B, n, k] int32 tokens drawn independently from q, [B, n, V] q): q = softmax of `policy`'s
    filtered logits, what sampled drafts are verified against."""
    b, n, v = logits_bnv.shape
    filtered_bnv = policy.filtered_logits(logits_bnv.reshape(b * n, v)).reshape(b, n, v)
    tokens_bnk = categorical_tokens(key, jnp.broadcast_to(filtered_bnv[:, :, None], (b, n, k, v)))
    return tokens_bnk, jax.nn.softmax(filtered_bnv, axis=-1)


def root_only(tree: Tree, root_b: jax.Array) -> jax.Array:
    """[B, N] int32: the root's token at node 0, zeros elsewhere."""
    return jnp.zeros((root_b.shape[0], tree.num_nodes), jnp.int32).at[:, 0].set(root_b)


def chains(branches: int, depth: int) -> Tree:
    """`branches` chains of `depth` nodes below the root (prompt lookup's and REST's trees)."""
    return Tree(tuple((r,) + (0,) * (d - 1) for r in range(branches) for d in range(1, depth + 1)))


def chain_index(branches: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(branch, level) of every non-root node of `chains` in node order."""
    paths = chains(branches, depth).paths
    return np.array([p[0] for p in paths]), np.array([len(p) - 1 for p in paths])


def merge_twins(tokens_bn: jax.Array, parent_bn: jax.Array) -> jax.Array:
    """[B, N] parents that make per-row chains one trie: a node drafting the token an earlier
    sibling already drafts (a twin) stays in the tree, after the twin, so verification never
    accepts it (at T = 0 the earlier sibling wins; a rejected point mass has no mass left), and its
    children hang under the twin instead. Parents must come before their children."""
    n = tokens_bn.shape[1]
    canon = [jnp.zeros_like(parent_bn[:, 0])]  # each node's twin (itself if it has none)
    parents = [parent_bn[:, 0]]
    for j in range(1, n):
        parent_b = jnp.take_along_axis(jnp.stack(canon, axis=1), parent_bn[:, j:j + 1], axis=1)[:, 0]
        twin_bi = ((jnp.stack(parents, axis=1) == parent_b[:, None]) & (tokens_bn[:, :j] == tokens_bn[:, j:j + 1])
                   & (jnp.stack(canon, axis=1) == jnp.arange(j)))
        canon.append(jnp.where(jnp.any(twin_bi, axis=1), jnp.argmax(twin_bi, axis=1), j).astype(parent_bn.dtype))
        parents.append(parent_b)
    return jnp.stack(parents, axis=1)
