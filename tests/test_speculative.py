"""The speculative loop: identical to greedy decoding at T = 0; the base model's law at T > 0."""

import collections

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from jaxaccel import ModelConfig, Transformer
from jaxaccel.decoding import AutoregressiveDecoder, Sampler
from jaxaccel.decoding.speculative import SpeculativeDecoder
from jaxaccel.decoding.tree import DynamicTree, Tree
from jaxaccel.decoding.verify import TypicalAcceptance
from jaxaccel.heads import HeadsConfig, make_heads

CONFIG = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=128)
STOP = 7


@pytest.fixture(scope="module")
def base():
    """A random model whose weights are scaled up so that greedy outputs are varied: loops of
    several periods, stop tokens mid-way — rows that accept different lengths."""
    graphdef, state = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)))
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, state))


def heads_for(base, kind, **options):
    heads = make_heads(HeadsConfig(kind=kind, **options), base.config, rngs=nnx.Rngs(1))
    heads.init_from_base(base)
    return heads


@pytest.mark.parametrize("kind,options,tree", [("medusa", {}, None), ("hydra", {"prefix_layer": True}, None),
                                               ("eagle", {}, None), ("eagle", {}, DynamicTree(topk=3, depth=4, num_nodes=10))])
def test_greedy_speculative_equals_autoregressive(base, kind, options, tree):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (5, 11, 3, 8, 1)]
    want = AutoregressiveDecoder(base).generate(prompts, max_new_tokens=30, stop_tokens=[STOP])
    got = SpeculativeDecoder(base, heads_for(base, kind, **options), tree).generate(
        prompts, max_new_tokens=30, stop_tokens=[STOP])
    assert got.sequences() == want.sequences()
    assert any(s[-1] == STOP and len(s) < 30 for s in want.sequences()), "no row stopped on its stop token"
    steps = np.asarray(got.num_steps_b)
    assert got.mean_accepted_tokens() > 1.3 and len(set(steps.tolist())) > 1, steps  # rows accepted different lengths


def test_tree_deeper_than_heads_is_an_error(base):
    with pytest.raises(ValueError, match="5 levels deep, but these medusa heads draft only 4"):
        SpeculativeDecoder(base, heads_for(base, "medusa"), tree=Tree.chain(5))
    with pytest.raises(ValueError, match="dynamic .* trees need eagle or eagle3 heads, not hydra"):
        SpeculativeDecoder(base, heads_for(base, "hydra"), tree=DynamicTree(topk=2, depth=2, num_nodes=4))


def first_tokens(result, k):
    return [tuple(s[:k]) for s in result.sequences()]


@pytest.mark.parametrize("kind,tree", [("medusa", None), ("eagle", DynamicTree(topk=3, depth=3, num_nodes=8))])
def test_sampling_follows_the_base_distribution(base, kind, tree):
    """Two-sample test over many independent rows: the first 3 tokens of speculative and of
    autoregressive sampling have the same joint law (top-k filtered, temperature 0.8)."""
    policy = Sampler(temperature=0.8, top_k=6)
    rows, k = 3000, 3
    prompts = [[11, 3, 25]] * rows
    ar = AutoregressiveDecoder(base).generate(prompts, policy=policy, max_new_tokens=k, seed=1)
    spec_decoder = SpeculativeDecoder(base, heads_for(base, kind), tree)
    spec = spec_decoder.generate(prompts, policy=policy, max_new_tokens=k, seed=2)
    assert spec.mean_accepted_tokens() > 1.2  # drafts were accepted: the test exercises acceptance

    a, s = collections.Counter(first_tokens(ar, k)), collections.Counter(first_tokens(spec, k))
    common = [t for t in a if a[t] + s[t] >= 20]  # pool rare sequences into one cell
    table = np.array([[a[t] for t in common] + [rows - sum(a[t] for t in common)],
                      [s[t] for t in common] + [rows - sum(s[t] for t in common)]])
    assert table.shape[1] > 5
    assert stats.chi2_contingency(table).pvalue > 1e-3, table
    # And the test has power: a different temperature is detected.
    other = AutoregressiveDecoder(base).generate(prompts, policy=Sampler(temperature=1.3, top_k=6),
                                                 max_new_tokens=k, seed=3)
    o = collections.Counter(first_tokens(other, k))
    table = np.array([[a[t] for t in common] + [rows - sum(a[t] for t in common)],
                      [o[t] for t in common] + [rows - sum(o[t] for t in common)]])
    assert stats.chi2_contingency(table).pvalue < 1e-3


def test_typical_acceptance_runs_and_is_greedy_when_confident(base):
    prompts = [[1, 2, 3], [4, 5]]
    result = SpeculativeDecoder(base, heads_for(base, "medusa")).generate(
        prompts, policy=TypicalAcceptance(), max_new_tokens=12)
    assert all(len(s) == 12 or s[-1] == STOP for s in result.sequences())
