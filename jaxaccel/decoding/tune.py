"""Hardware-aware trees: the tree that maximises expected tokens per second on this device.

Acceptance is measured, not modelled: on held-out prompts the base model's own greedy
continuation is the sequence a T = 0 speculative step must reproduce, so at each position t we
record the rank of the true token t+k+2 among head k's drafts (heads run teacher-forced along
the true path, as they draft along an accepted one). A step starting at t accepts exactly the
tree nodes whose rank path is a prefix of that rank vector, so for any tree

    expected tokens per step = 1 + sum over non-root nodes of P(rank vector starts with the node's path).

P never grows along a path, so the best tree of n nodes takes the n - 1 most frequent prefixes.
Cost is measured too: the seconds of one draft + verify step for each candidate size.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.decoding.tree import Tree
from jaxaccel.draft_vocab import to_target_logits


def draft_ranks(base, heads, tokens_bt: np.ndarray, starts_b: np.ndarray, ends_b: np.ndarray, depth: int,
                max_rank: int) -> np.ndarray:
    """[P, depth] rank of the true token t+k+2 under head k at each position t >= starts_b[b] - 1
    whose continuation lies inside the row's first ends_b[b] tokens (ranks >= max_rank are
    recorded as max_rank: a miss)."""

    capture = tuple(getattr(heads, "capture", ()))  # EAGLE-3 reads chosen layers' states, the others the last

    @jax.jit
    def ranks_fn(tokens_bt):
        out = base.forward(tokens_bt, capture=capture)
        logits_kbtv = heads.teacher_forced(base, out.captured if capture else out.hidden, tokens_bt, depth).logits_kbtv
        d2t = getattr(heads, "d2t", None)
        if d2t is not None:  # a trimmed draft vocabulary: a token outside it is never drafted (a miss)
            logits_kbtv = to_target_logits(logits_kbtv, d2t[...], base.config.vocab_size)
        t = tokens_bt.shape[1]
        ranks = []
        for k in range(depth):
            target_bt = jnp.concatenate([tokens_bt[:, k + 2:], jnp.zeros((tokens_bt.shape[0], k + 2), tokens_bt.dtype)], 1)
            true_logit_bt = jnp.take_along_axis(logits_kbtv[k], target_bt[..., None], axis=-1)
            ranks.append(jnp.sum(logits_kbtv[k] > true_logit_bt, axis=-1))
        return jnp.stack(ranks, axis=-1)[:, :t]  # [B, T, depth]

    ranks_btd = np.minimum(np.asarray(ranks_fn(jnp.asarray(tokens_bt))), max_rank)
    rows = []
    for b, (start, end) in enumerate(zip(starts_b, ends_b)):
        rows.append(ranks_btd[b, max(start - 1, 0):end - depth - 1])  # t needs tokens up to t + depth + 1
    return np.concatenate(rows).astype(np.int32)


def prefix_frequencies(ranks_pd: np.ndarray, max_rank: int) -> dict[tuple[int, ...], float]:
    """P(rank vector starts with path) for every path of ranks < max_rank that occurs."""
    counts = collections.Counter()
    for row in ranks_pd:
        for d in range(len(row)):
            if row[d] >= max_rank:
                break
            counts[tuple(int(r) for r in row[:d + 1])] += 1
    return {path: c / len(ranks_pd) for path, c in counts.items()}


def tree_from_ranks(ranks_pd: np.ndarray, num_nodes: int, max_rank: int) -> Tree:
    """The prefix-closed tree of `num_nodes` nodes with the most expected accepted tokens."""
    freq = prefix_frequencies(ranks_pd, max_rank)
    best = sorted(freq, key=lambda p: (-freq[p], len(p), p))[:num_nodes - 1]
    return Tree(tuple(best) or ((0,),))


def expected_tokens(tree: Tree, ranks_pd: np.ndarray) -> float:
    """Mean tokens per step (the base's own token included) this tree gets on these rank vectors."""
    paths = set(tree.paths)
    total = 0
    for row in ranks_pd:
        d = 0
        while d < len(row) and tuple(int(r) for r in row[:d + 1]) in paths:
            d += 1
        total += d
    return 1.0 + total / len(ranks_pd)


def choose_tree(ranks_pd: np.ndarray, step_seconds_by_size: dict[int, float], max_rank: int):
    """(best tree, table): for each candidate size n, the best tree of n nodes, its expected tokens
    per step, the measured step time and their ratio, expected tokens per second."""
    table = []
    for n, seconds in sorted(step_seconds_by_size.items()):
        tree = tree_from_ranks(ranks_pd, n, max_rank)
        tokens = expected_tokens(tree, ranks_pd)
        table.append({"num_nodes": tree.num_nodes, "expected_tokens_per_step": tokens, "step_ms": 1e3 * seconds,
                      "expected_tokens_per_s": tokens / seconds, "tree": tree})
    best = max(table, key=lambda row: row["expected_tokens_per_s"])
    return best["tree"], table
