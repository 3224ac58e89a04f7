"""inspect_step shows the speculative loop's own first step: checked against plain greedy decoding."""

import numpy as np
import pytest

from jaxaccel.data import load_tokenizer, sample_prompts
from jaxaccel.decoding import AutoregressiveDecoder
from jaxaccel.decoding.inspect import inspect_step, tree_layout
from jaxaccel.decoding.speculative import SpeculativeDecoder
from jaxaccel.decoding.tree import DynamicTree, Tree
from jaxaccel.drafters import RECORDS
from jaxaccel.heads import load_heads
from jaxaccel.hf import load_hf
from jaxaccel.pretrained import SHIPPED_DIR

MODEL_DIR = SHIPPED_DIR / "model"


@pytest.fixture(scope="module")
def shipped():
    model = load_hf(MODEL_DIR)
    tokenizer = load_tokenizer(MODEL_DIR)
    prompts = [tokenizer.encode(t).ids[:32] for t in sample_prompts("test", n=3, num_chars=400, seed=11)]
    greedy = AutoregressiveDecoder(model).generate(prompts, max_new_tokens=10).sequences()
    return model, load_heads(SHIPPED_DIR / "heads" / "eagle", MODEL_DIR), prompts, greedy


@pytest.mark.parametrize("tree", [RECORDS["eagle"].default_tree, DynamicTree(topk=3, depth=4, num_nodes=10)],
                         ids=["static", "dynamic"])
def test_step_view_is_a_verified_path_that_emits_greedy_tokens(shipped, tree):
    model, heads, prompts, greedy = shipped
    decoder = SpeculativeDecoder(model, heads, tree)
    accepted_any = 0
    for prompt, reference in zip(prompts, greedy):
        view = inspect_step(decoder, prompt)
        assert view.num_nodes == tree.num_nodes and view.parent_n[0] == -1 and view.depth_n[0] == 0
        assert view.accepted[0] == 0
        for parent, child in zip(view.accepted, view.accepted[1:]):  # a root-to-node path, one level at a time
            assert view.parent_n[child] == parent and view.depth_n[child] == view.depth_n[parent] + 1
            assert view.tokens_n[child] == view.target_n[parent]  # greedy accepts only the base's argmax
        assert view.bonus == view.target_n[view.accepted[-1]]
        # The root is greedy's first token; the step's tokens are greedy's next ones.
        assert [int(view.tokens_n[0])] + view.emitted == reference[:len(view.emitted) + 1]
        accepted_any += len(view.accepted) > 1
    assert accepted_any, "the shipped eagle heads should get some draft accepted on three prompts"


def test_tree_layout_puts_parents_over_their_children_and_leaves_apart():
    rng = np.random.default_rng(0)
    paths = {(int(rng.integers(3)),)}
    while len(paths) < 12:  # a random prefix-closed tree
        parent = sorted(paths)[rng.integers(len(paths))]
        paths.add(parent + (int(rng.integers(3)),))
    tree = Tree(tuple(paths))
    x_n, y_n = tree_layout(tree.parent_n)
    np.testing.assert_array_equal(y_n, -tree.depth_n)
    children = [np.flatnonzero(tree.parent_n == i) for i in range(tree.num_nodes)]
    for node, kids in enumerate(children):
        if len(kids):
            assert x_n[node] == pytest.approx(np.mean(x_n[kids]))
    leaves = sorted(x_n[[i for i, k in enumerate(children) if not len(k)]])
    np.testing.assert_array_equal(leaves, np.arange(len(leaves)))


def test_tree_layout_rejects_a_forest():
    with pytest.raises(ValueError, match="only root"):
        tree_layout(np.array([-1, 0, -1]))
