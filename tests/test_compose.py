"""Trained heads and a training-free drafter in one tree (jaxaccel.drafters.compose): greedy
decoding at T = 0, the base's law at T = 1, and each step accepts what the better part would."""

import jax.numpy as jnp
import numpy as np
import pytest
import test_drafters
import test_drafters_cli
from flax import nnx
from test_drafters import CONFIG, STOP
from test_layerskip import looping_model, same_law_pvalue

from jaxaccel.decoding import AutoregressiveDecoder, Sampler
from jaxaccel.decoding.inspect import inspect_step
from jaxaccel.decoding.speculative import SpeculativeDecoder
from jaxaccel.decoding.tree import DynamicTree, Tree
from jaxaccel.drafters import Draft, make_drafter
from jaxaccel.drafters.compose import Composite, union_parents
from jaxaccel.drafters.protocol import samples_drafts
from infer.speculative_rows import make_decoders
from jaxaccel import load_hf
from jaxaccel.heads import HeadsConfig, make_heads, save_heads

model_dir = test_drafters_cli.model_dir  # the CLI tests' small model directory (a fixture)
rest_corpus = test_drafters.rest_corpus  # REST's corpus: this base's own answers (a fixture)

@pytest.fixture(scope="module")
def base():
    return looping_model(CONFIG)


def heads_for(base, kind):
    heads = make_heads(HeadsConfig(kind=kind), base.config, rngs=nnx.Rngs(1))
    heads.init_from_base(base)
    return heads


@pytest.fixture(scope="module")
def prompts(base):
    """Random prompts, some with a passage repeated, each followed by some of the base's own text."""
    rng = np.random.default_rng(0)
    passage = rng.integers(0, CONFIG.vocab_size, 9).tolist()
    starts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (5, 11, 3)]
    starts += [passage + [4, 4] + passage[:4], [2] + passage + passage[:3]]
    more = AutoregressiveDecoder(base).generate(starts, max_new_tokens=12).sequences()
    return [s + m[:k] for s, m, k in zip(starts, more, (10, 0, 6, 0, 0))]


@pytest.mark.parametrize("kind,spec,tree", [("eagle", "pld:branches=2", DynamicTree(topk=3, depth=4, num_nodes=10)),
                                            ("hydra", "layerskip:skip=1,depth=3", None),
                                            ("eagle", "rest:corpus={corpus},depth=3+pld:depth=2", Tree.chain(2)),
                                            ("hydra", "share:corpus={corpus},nodes=4", None)])
def test_heads_with_a_lookup_equal_greedy(base, prompts, rest_corpus, kind, spec, tree):
    want = AutoregressiveDecoder(base).generate(prompts, max_new_tokens=30, stop_tokens=[STOP])
    drafter = make_drafter(spec.format(corpus=rest_corpus), heads=heads_for(base, kind), tree=tree)
    assert isinstance(drafter, Composite)
    got = SpeculativeDecoder(base, drafter).generate(prompts, max_new_tokens=30, stop_tokens=[STOP])
    assert got.sequences() == want.sequences()
    assert got.mean_accepted_tokens() > 1.5, got.num_steps_b


def test_a_step_accepts_what_the_better_part_accepts(base, prompts):
    """At T = 0 the union's first step accepts max(heads alone, lookup alone) tokens: over a
    repeated passage the lookup's chain, elsewhere the heads' tree."""
    heads = heads_for(base, "eagle")
    decoders = {name: SpeculativeDecoder(base, drafter) for name, drafter in
                (("heads", make_drafter(heads=heads)), ("pld", make_drafter("pld")),
                 ("union", make_drafter("pld", heads=heads)))}
    wins = set()
    for prompt in prompts:
        counts = {name: len(inspect_step(d, prompt).accepted) for name, d in decoders.items()}
        assert counts["union"] == max(counts["heads"], counts["pld"]), counts
        wins |= {name for name in ("heads", "pld") if counts[name] > counts[{"heads": "pld", "pld": "heads"}[name]]}
    assert wins == {"heads", "pld"}, wins  # each part is the better one somewhere


@pytest.mark.parametrize("kind", ["medusa", "eagle"])  # point-mass heads drafts; sampled ones (the q-aware rule)
def test_sampling_follows_the_base_distribution(base, prompts, kind):
    policy = Sampler(temperature=1.0, top_k=4)
    rows, k = 3000, 4
    batch = [prompts[3]] * rows
    ar = AutoregressiveDecoder(base).generate(batch, policy=policy, max_new_tokens=k, seed=1)
    drafter = make_drafter("pld:depth=3", heads=heads_for(base, kind))
    assert samples_drafts(drafter) == (kind == "eagle")
    spec = SpeculativeDecoder(base, drafter).generate(batch, policy=policy, max_new_tokens=k, seed=2)
    assert spec.mean_accepted_tokens() > 1.05, spec.mean_accepted_tokens()
    assert same_law_pvalue(ar, spec, k) > 1e-3  # (test_layerskip shows the test's power)


def test_lookup_nodes_hang_under_the_heads_path_they_repeat():
    # Heads: root 9 -> (1: 5), (2: 6); 5 -> (3: 7). Lookup chain: 5 7 8 4 (nodes 1..4).
    heads_tree, chain = Tree(((0,), (1,), (0, 0))), Tree.chain(4)
    heads = Draft(jnp.array([[9, 5, 6, 7]]), heads_tree.batch(1))
    other = Draft(jnp.array([[9, 5, 7, 8, 4]]), chain.batch(1))
    # Union nodes 4..7 are the chain's: 5 and 7 repeat heads nodes 1 and 3 (twins, under the same
    # parents, after them), 8 hangs under heads node 3, 4 under 8.
    assert np.asarray(union_parents(heads, other)).tolist() == [[-1, 0, 0, 1, 0, 1, 3, 6]]
    other = Draft(jnp.array([[9, 6, 7, 8, 4]]), chain.batch(1))  # diverges at 7: 6 -> 7 is not drafted by the heads
    assert np.asarray(union_parents(heads, other)).tolist() == [[-1, 0, 0, 1, 0, 2, 5, 6]]


def test_composition_errors(base):
    heads = heads_for(base, "medusa")
    with pytest.raises(ValueError, match="--drafter recycling does not compose with --heads"):
        make_drafter("recycling", heads=heads)
    with pytest.raises(ValueError, match="--drafter eagle with medusa heads"):
        make_drafter("eagle", heads=heads)
    drafter = make_drafter("pld:depth=4", heads=heads, tree=Tree.chain(2))
    assert drafter.tree.num_nodes == 3 + 4 and drafter.tree.depth == 4 and drafter.heads.module is None


def test_the_clis_compose_heads_and_a_drafter(model_dir, tmp_path, capsys):
    model = load_hf(model_dir)
    heads_dir = tmp_path / "heads"
    save_heads(make_heads(HeadsConfig(kind="medusa"), model.config, rngs=nnx.Rngs(1)), heads_dir, model_dir)
    prompt = ["--model", model_dir, "--prompt", "    return a + b\n\ndef mul(a, b):\n    return", "--max-new-tokens", 20]
    plain = test_drafters_cli.generate_json(capsys, *prompt)[0]
    composed = test_drafters_cli.generate_json(capsys, *prompt, "--heads", heads_dir, "--drafter", "pld:depth=4")[0]
    assert composed["tokens"] == plain["tokens"]
    decoders = make_decoders(model, model_dir, [heads_dir], [None], ["pld:depth=4", "recycling"])
    assert list(decoders) == ["ar", "medusa", "pld:depth=4", "medusa+pld:depth=4", "recycling"]
    assert decoders["medusa+pld:depth=4"][1]["num_nodes"] == decoders["medusa"][1]["num_nodes"] + 4
    # With several trees (a tuned one, say), the union is made with each static one; a dynamic tree
    # does not compose and is skipped.
    decoders = make_decoders(model, model_dir, [heads_dir], ["chain", None, "dynamic"], ["pld:depth=4"])
    assert list(decoders) == ["ar", "medusa (chain)", "medusa (default)", "pld:depth=4",
                              "medusa (chain)+pld:depth=4", "medusa (default)+pld:depth=4"]
    for tree in ("chain", "default"):
        union, alone = decoders[f"medusa ({tree})+pld:depth=4"][1], decoders[f"medusa ({tree})"][1]
        assert union["num_nodes"] == alone["num_nodes"] + 4 and union["tree"] == tree
