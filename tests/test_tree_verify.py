"""Draft trees and the acceptance walk: greedy equals following the argmax; sampling is exact."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxaccel.decoding.sampling import Greedy, Sampler
from jaxaccel.decoding.tree import DynamicTree, Tree, TreeBatch
from jaxaccel.decoding.verify import TypicalAcceptance
from jaxaccel.decoding.verify import verify_tree as verify_tree_eagerly
from jaxaccel.drafters import RECORDS

# Compiled once per tree and policy (static: hashable dataclasses; a TreeBatch is traced): eager, every
# op of a verification compiles on its own.
_verify_static_tree = jax.jit(verify_tree_eagerly, static_argnums=(0, 3))
_verify_tree_batch = jax.jit(verify_tree_eagerly, static_argnums=(3,))


def verify_tree(tree, *args):
    return (_verify_static_tree if isinstance(tree, Tree) else _verify_tree_batch)(tree, *args)


def named_tree(name):
    """A chain of 4, or a drafter record's default tree."""
    return Tree.chain(4) if name == "chain" else RECORDS[name].default_tree


def test_tree_buffers():
    tree = Tree(((1,), (0,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    np.testing.assert_array_equal(tree.parent_n, [-1, 0, 0, 1, 1, 2, 3])
    np.testing.assert_array_equal(tree.depth_n, [0, 1, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(tree.children_nc[:3], [[1, 2], [3, 4], [5, -1]])
    np.testing.assert_array_equal(tree.ancestors_nd[6], [0, 1, 3, 6])
    np.testing.assert_array_equal(tree.ancestors_nd[2], [0, 2, 2, 2])
    assert tree.mask_nn[6].tolist() == [True, True, False, True, False, False, True]
    assert [tree.parents_at(k).tolist() for k in range(4)] == [[0], [1, 2], [3], []]  # nodes with children
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
    tree = named_tree(tree_name)
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


def check_law(samples, p_v):
    """The samples follow p_v (chi-square), and none falls outside its support."""
    support = p_v > 0
    counts = np.bincount(samples, minlength=len(p_v))
    assert counts[~support].sum() == 0, "drew a token outside the filtered distribution"
    pvalue = stats.chisquare(counts[support], len(samples) * p_v[support] / p_v[support].sum()).pvalue
    assert pvalue > 1e-4, (counts, p_v)


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

    check_law(first, p_nv[0])
    # Given that the first token is child node 1's token (accepted), the second follows p at node 1.
    took_node1 = (np.asarray(verdict.num_nodes_b) >= 2) & (np.asarray(verdict.path_bd[:, 1]) == 1)
    assert took_node1.sum() > 5000
    check_law(emitted[took_node1, 1], p_nv[1])


def test_sampled_drafts_follow_the_base_distribution():
    """Drafts drawn from distributions q (fresh per row; point masses mixed in) under the q-aware
    rule: the first two emitted tokens have the base model's law, and a child drawn from q = p is
    always accepted (where a point mass would be accepted with probability p(x) only)."""
    tree = Tree(((0,), (1,), (0, 0), (0, 1), (1, 0)))
    v, rows = 6, 60_000
    rng = np.random.default_rng(7)
    logits_nv = rng.normal(scale=1.5, size=(tree.num_nodes, v)).astype(np.float32)
    policy = Sampler(temperature=0.8, top_k=5)
    p_nv = np.asarray(jax.nn.softmax(policy.filtered_logits(jnp.asarray(logits_nv)), axis=-1), np.float64)
    q_nv = rng.dirichlet(np.ones(v), size=tree.num_nodes)
    q_nv[1] = p_nv[0]  # node 1 (first child of the root) drawn from the base's own law there
    q_nv[4] = np.eye(v)[3]  # node 4: a point mass on token 3
    draft_bn = np.stack([np.zeros(rows, np.int64)] + [rng.choice(v, rows, p=q_nv[i] / q_nv[i].sum())
                                                      for i in range(1, tree.num_nodes)], axis=1).astype(np.int32)
    verdict = verify_tree(tree, jnp.asarray(draft_bn), jnp.broadcast_to(logits_nv, (rows,) + logits_nv.shape),
                          policy, jax.random.key(3), jnp.broadcast_to(jnp.asarray(q_nv, jnp.float32), (rows,) + q_nv.shape))
    emitted = np.asarray(verdict.emitted(jnp.asarray(draft_bn)))
    path = np.asarray(verdict.path_bd)

    assert np.all(path[:, 1] == 1), "a child drawn from p itself was rejected"
    check_law(emitted[:, 0], p_nv[0])
    check_law(emitted[:, 1], p_nv[1])  # the token after node 1: node 3's, node 4's, or the bonus


def test_typical_acceptance_accepts_plausible_drafts():
    tree = Tree.chain(3)
    logits = np.full((1, 4, 5), -10.0, np.float32)
    logits[0, :, 2] = 10.0  # the base is sure the next token is 2 everywhere
    verdict = verify_tree(tree, jnp.array([[7, 2, 2, 0]]), jnp.asarray(logits), TypicalAcceptance(), jax.random.key(0))
    assert int(verdict.num_nodes_b[0]) == 3 and int(verdict.bonus_b[0]) == 2


@pytest.mark.parametrize("tree_name", ["chain", "medusa", "eagle"])
def test_tree_batch_matches_the_static_buffers(tree_name):
    tree = named_tree(tree_name)
    layout = tree.batch(2)
    for got, want in [(layout.mask_bnn, tree.mask_nn), (layout.ancestors_bnd, tree.ancestors_nd),
                      (layout.children_bnc, tree.children_nc)]:
        np.testing.assert_array_equal(np.asarray(got), np.broadcast_to(want, (2,) + want.shape))


def reference_greedy_parents(parent_n, draft_n, logits_nv):
    """The greedy walk over a tree given by parents (children offered in index order)."""
    node, path = 0, [0]
    while True:
        target = int(np.argmax(logits_nv[node]))
        nxt = [c for c in range(len(parent_n)) if parent_n[c] == node and draft_n[c] == target]
        if not nxt:
            return path, target
        node = nxt[0]
        path.append(node)


def test_greedy_verdict_on_per_row_trees():
    """Each row its own tree (the default eagle tree with its nodes shuffled per row)."""
    tree = named_tree("eagle")
    rng = np.random.default_rng(1)
    b, n, v = 48, tree.num_nodes, 4
    parent_bn, depth_bn = np.zeros((b, n), np.int32), np.zeros((b, n), np.int32)
    for r in range(b):
        order = np.concatenate([[0], 1 + rng.permutation(n - 1)])  # new index i holds old node order[i]
        new_of_old = np.argsort(order)
        parent_bn[r] = [-1] + [new_of_old[tree.parent_n[old]] for old in order[1:]]
        depth_bn[r] = tree.depth_n[order]
    logits = rng.normal(size=(b, n, v)).astype(np.float32)
    draft = rng.integers(0, v, (b, n)).astype(np.int32)
    for r in range(b):
        for i in range(1, n):
            if rng.random() < 0.7:
                draft[r, i] = logits[r, parent_bn[r, i]].argmax()
    layout = TreeBatch(parent_bn=jnp.asarray(parent_bn), depth_bn=jnp.asarray(depth_bn), max_depth=tree.depth,
                       max_children=tree.children_nc.shape[1])
    verdict = verify_tree(layout, jnp.asarray(draft), jnp.asarray(logits), Greedy(), jax.random.key(0))
    for r in range(b):
        path, bonus = reference_greedy_parents(parent_bn[r], draft[r], logits[r])
        assert int(verdict.num_nodes_b[r]) == len(path)
        assert np.asarray(verdict.path_bd)[r, :len(path)].tolist() == path
        assert int(verdict.bonus_b[r]) == bonus
    assert float(verdict.num_nodes_b.mean()) > 1.5


class _TokenFeatures:
    """Stand-ins for eagle heads and a base model: an entry's predicted feature depends only on
    its token and position, and the logits are a fixed projection of it (rounded to make ties)."""

    def __init__(self, vocab, dim, decimals, seed):
        rng = np.random.default_rng(seed)
        self.embed_vd = jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32)
        self.proj_dv = jnp.asarray(rng.normal(size=(dim, vocab)) * 2, jnp.float32)
        self.decimals = decimals

    def features(self, base, feats_bnd, tokens_bn, positions_bn, *, cache, mask):
        return jnp.sin(self.embed_vd[tokens_bn] + positions_bn[..., None]), cache

    def logits(self, feats_bnd):
        return jnp.round(feats_bnd @ self.proj_dv, self.decimals)


def reference_dynamic_tree(fake, root, start, topk, depth, num_nodes):
    """EAGLE-2 in plain Python: (token path, cumulative log-probability) of the kept nodes."""
    def expand(path):
        token = path[-1] if path else root
        feat = fake.features(None, None, jnp.array([[token]]), jnp.array([[start + len(path)]]), cache=None, mask=None)[0]
        logp = np.asarray(jax.nn.log_softmax(fake.logits(feat)[0, 0]))
        best = np.argsort(-logp, kind="stable")[:topk]
        return [(path + (int(t),), float(logp[t])) for t in best]

    candidates, frontier = {}, [((), 0.0)]
    for level in range(depth):
        children = [(p, s + lp) for q, s in frontier for p, lp in expand(q)]
        candidates.update(children)
        frontier = sorted(children, key=lambda c: -c[1])[:topk]
    return sorted(candidates.items(), key=lambda c: -c[1])[:num_nodes - 1]


@pytest.mark.parametrize("decimals", [4, 0])  # 0: heavy ties and saturated probabilities
def test_dynamic_eagle_tree_is_prefix_closed_and_best(decimals):
    from jaxaccel.drafters.common import HeadsState
    from jaxaccel.drafters.eagle import DynamicEagleDrafter

    tree = DynamicTree(topk=3, depth=4, num_nodes=12)
    fake = _TokenFeatures(vocab=11, dim=6, decimals=decimals, seed=decimals)
    root_b, start_b = jnp.array([3, 7, 0]), jnp.array([5, 2, 9])
    state = HeadsState(cache=types.SimpleNamespace(lengths=start_b), head_input_bd=jnp.zeros((3, 6)))
    draft = DynamicEagleDrafter(tree).draft(fake, fake, state, root_b, None)
    draft_bn, layout = draft.tokens_bn, draft.tree
    draft_bn, parent_bn, depth_bn = map(np.asarray, (draft_bn, layout.parent_bn, layout.depth_bn))
    for r in range(3):
        assert parent_bn[r, 0] == -1 and depth_bn[r, 0] == 0 and draft_bn[r, 0] == root_b[r]
        assert (parent_bn[r, 1:] >= 0).all(), parent_bn[r]  # every kept node's parent was kept
        assert (depth_bn[r, 1:] == depth_bn[r, parent_bn[r, 1:]] + 1).all()
        paths = {}
        for i in range(tree.num_nodes):  # token path of each node, through its parents
            p, node = [], i
            while node > 0:
                p.append(int(draft_bn[r, node]))
                node = parent_bn[r, node]
            paths[i] = tuple(reversed(p))
        assert len(set(paths.values())) == tree.num_nodes  # siblings carry distinct tokens
        if decimals:  # no ties: exactly the reference's nodes
            want = reference_dynamic_tree(fake, int(root_b[r]), int(start_b[r]), tree.topk, tree.depth, tree.num_nodes)
            assert sorted(paths[i] for i in range(1, tree.num_nodes)) == sorted(p for p, _ in want)
