"""Hardware-aware trees: measured acceptance turns into the best tree of each size."""

import itertools

import jax
import numpy as np
from flax import nnx

from jaxaccel import ModelConfig, Transformer
from jaxaccel.decoding.tree import Tree
from jaxaccel.decoding.tune import choose_tree, draft_ranks, expected_tokens, tree_from_ranks
from jaxaccel.heads import HeadsConfig, make_heads


def test_tree_from_ranks_is_optimal_among_small_trees():
    rng = np.random.default_rng(0)
    ranks = np.minimum(rng.geometric(0.55, size=(400, 3)) - 1, 3)  # rank 3 = a miss
    candidates = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]
    for n in (2, 3, 4, 5):
        best = tree_from_ranks(ranks, n, max_rank=3)
        assert best.num_nodes == n
        brute = 0.0
        for subset in itertools.combinations(candidates, n - 1):
            if all(len(p) == 1 or p[:-1] in subset for p in subset):
                brute = max(brute, expected_tokens(Tree(subset), ranks))
        assert abs(expected_tokens(best, ranks) - brute) < 1e-12


def test_expected_tokens_counts_matched_prefixes():
    tree = Tree(((0,), (1,), (0, 0)))
    ranks = np.array([[0, 0, 5], [1, 0, 0], [2, 0, 0], [0, 1, 0]])
    assert expected_tokens(tree, ranks) == 1 + (2 + 1 + 0 + 1) / 4


def test_draft_ranks_and_choice():
    config = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=64)
    base = Transformer(config, rngs=nnx.Rngs(0))
    heads = make_heads(HeadsConfig(kind="medusa", num_heads=2), config, rngs=nnx.Rngs(1))
    heads.init_from_base(base)
    tokens = np.random.default_rng(1).integers(0, 40, (2, 12)).astype(np.int32)
    ranks = draft_ranks(base, heads, tokens, np.array([3, 5]), np.array([12, 12]), depth=2, max_rank=40)
    assert ranks.shape == (7 + 5, 2)  # positions 2..8 and 4..8 (t + 3 must be inside the row)
    # Zero-initialised medusa heads are the base's LM head: head k at t ranks token t+k+2 by the
    # base's own next-token logits at t.
    logits = np.asarray(base(tokens))
    want = (logits[0, 2] > logits[0, 2, tokens[0, 4]]).sum(), (logits[0, 2] > logits[0, 2, tokens[0, 5]]).sum()
    assert tuple(ranks[0]) == want
    tree, table = choose_tree(ranks, {2: 1.0, 4: 1.1, 8: 5.0}, max_rank=8)
    sizes = [row["num_nodes"] for row in table]
    assert sizes[:2] == [2, 4] and sizes[1] <= sizes[2] <= 8  # no more nodes than distinct prefixes seen
    assert tree == max(table, key=lambda r: r["expected_tokens_per_s"])["tree"]


def test_a_chat_models_tuning_prompts_are_held_out_training_prompts(tmp_path):
    """--tune-tree on a chat model tunes on training prompts that head training holds out, never on
    Spec-Bench's questions nor on prompts the heads learned from."""
    from chat_models import build_chat_model

    from infer.bench import tuning_prompts
    from jaxaccel.chat import ChatTemplate
    from jaxaccel.training.prompts import is_heldout, read_train_prompts

    model_dir = build_chat_model(tmp_path / "chat", context=512)
    template = ChatTemplate.from_model_dir(model_dir)
    prompts = read_train_prompts()
    held = {tuple(template.encode(template.conversation(p.text))) for p in prompts if is_heldout(p.key)}
    got = tuning_prompts(model_dir, 0, 6, 64, seed=3)
    assert len(got) == 6 and len(set(map(tuple, got))) == 6
    assert all(tuple(ids) in held and len(ids) <= 256 for ids in got)
    assert 0 < len(held) < len(prompts) / 16  # about 1 in 32 held out
