"""Draft trees and the acceptance walk: greedy equals following the argmax; sampling is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxaccel.decoding.sampling import Greedy, Sampler
from jaxaccel.decoding.tree import DEFAULT_TREES, Tree
from jaxaccel.decoding.verify import TypicalAcceptance, verify_tree


def test_tree_buffers():
    tree = Tree(((1,), (0,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    np.testing.assert_array_equal(tree.parent_n, [-1, 0, 0, 1, 1, 2, 3])
    np.testing.assert_array_equal(tree.depth_n, [0, 1, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(tree.children_nc[:3], [[1, 2], [3, 4], [5, -1]])
    np.testing.assert_array_equal(tree.ancestors_nd[6], [0, 1, 3, 6])
    np.testing.assert_array_equal(tree.ancestors_nd[2], [0, 2, 2, 2])
    assert tree.mask_nn[6].tolist() == [True, True, False, True, False, False, True]
    assert Tree.chain(3).paths == ((0,), (0, 0), (0, 0, 0))
    with pytest.raises(ValueError, match=r"tree path \(0, 1\) has no parent \(0,\)"):
        Tree(((1,), (0, 1)))
    assert hash(tree) == hash(Tree(tree.paths))


def test_tree_from_acceptance_is_the_best_prefix_closed_tree():
    accept_dr = np.array([[0.8, 0.1, 0.05], [0.7, 0.2, 0.05], [0.6, 0.3, 0.1]])
    tree = Tree.from_acceptance(accept_dr, num_nodes=6)
    # Values: (0)=.8, (0,0)=.56, (0,0,0)=.336, (0,0,1)=.168, (0,1)=.16, (1)=.1
    assert tree.paths == ((0,), (0, 0), (0, 1), (0, 0, 0), (0, 0, 1))


def reference_greedy(tree, draft_n, logits_nv):
    node = 0
    while True:
        target = int(np.argmax(logits_nv[node]))
        nxt = [c for c in tree.children_nc[node] if c >= 0 and draft_n[c] == target]
        if not nxt:
            return node, target
        node = nxt[0]


@pytest.mark.parametrize("tree_name", ["chain", "medusa", "eagle"])
def test_greedy_verdict_follows_the_argmax(tree_name):
    tree = DEFAULT_TREES[tree_name]
    rng = np.random.default_rng(0)
    b, n, v = 64, tree.num_nodes, 5
    logits = rng.normal(size=(b, n, v)).astype(np.float32)
    draft = rng.integers(0, v, (b, n)).astype(np.int32)
    # Make acceptance likely: most nodes carry their parent's argmax.
    for i in range(1, n):
        hit = rng.random(b) < 0.7
        draft[hit, i] = logits[hit, tree.parent_n[i]].argmax(-1)
    verdict = verify_tree(tree, jnp.asarray(draft), jnp.asarray(logits), Greedy(), jax.random.key(0))
    for r in range(b):
        last, bonus = reference_greedy(tree, draft[r], logits[r])
        assert int(verdict.num_nodes_b[r]) == tree.depth_n[last] + 1
        assert int(verdict.path_bd[r, tree.depth_n[last]]) == last
        assert int(verdict.bonus_b[r]) == bonus
        emitted = np.asarray(verdict.emitted(jnp.asarray(draft)))[r, :tree.depth_n[last] + 1]
        assert emitted.tolist() == [*draft[r, tree.ancestors_nd[last][1:tree.depth_n[last] + 1]], bonus]
    assert 1 < float(verdict.num_nodes_b.mean()) < tree.depth + 1


def test_rejection_sampling_follows_the_base_distribution():
    """Over many independent rows, the first two emitted tokens have the base model's law."""
    tree = Tree(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0)))
    v, rows = 6, 60_000
    rng = np.random.default_rng(1)
    logits_nv = rng.normal(scale=1.5, size=(tree.num_nodes, v)).astype(np.float32)
    draft_n = np.array([0, 1, 4, 2, 5, 2, 5], np.int32)  # siblings distinct; node 3 has p = 0 at the root
    policy = Sampler(temperature=0.9, top_k=4)
    p_nv = np.asarray(jax.nn.softmax(policy.filtered_logits(jnp.asarray(logits_nv)), axis=-1), np.float64)

    verdict = verify_tree(tree, jnp.broadcast_to(draft_n, (rows, tree.num_nodes)),
                          jnp.broadcast_to(logits_nv, (rows,) + logits_nv.shape), policy, jax.random.key(42))
    emitted = np.asarray(verdict.emitted(jnp.broadcast_to(draft_n, (rows, tree.num_nodes))))
    first = emitted[:, 0]

    def check(samples, p_v):
        support = p_v > 0
        counts = np.bincount(samples, minlength=v)
        assert counts[~support].sum() == 0, "drew a token outside the filtered distribution"
        pvalue = stats.chisquare(counts[support], len(samples) * p_v[support] / p_v[support].sum()).pvalue
        assert pvalue > 1e-4, (counts, p_v)

    check(first, p_nv[0])
    # Given that the first token is child node 1's token (accepted), the second follows p at node 1.
    took_node1 = (np.asarray(verdict.num_nodes_b) >= 2) & (np.asarray(verdict.path_bd[:, 1]) == 1)
    assert took_node1.sum() > 5000
    check(emitted[took_node1, 1], p_nv[1])


def test_typical_acceptance_accepts_plausible_drafts():
    tree = Tree.chain(3)
    logits = np.full((1, 4, 5), -10.0, np.float32)
    logits[0, :, 2] = 10.0  # the base is sure the next token is 2 everywhere
    verdict = verify_tree(tree, jnp.array([[7, 2, 2, 0]]), jnp.asarray(logits), TypicalAcceptance(), jax.random.key(0))
    assert int(verdict.num_nodes_b[0]) == 3 and int(verdict.bonus_b[0]) == 2
