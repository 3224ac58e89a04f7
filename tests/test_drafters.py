"""Training-free drafters through the one protocol: prompt lookup, REST, Token Recycling, lookahead,
and a toy drafter added here with one record. Each is greedy decoding at T = 0 and the base's law
at T = 1."""

import collections
import json
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct
from scipy import stats

from jaxaccel import ModelConfig, Transformer
from jaxaccel.decoding import AutoregressiveDecoder, Sampler
from jaxaccel.decoding.speculative import SpeculativeDecoder
from jaxaccel.decoding.tree import Tree
from jaxaccel.drafters import RECORDS, Draft, DrafterRecord, Prefill, make_drafter, parse_spec, register
from jaxaccel.drafters.pld import LookupState, PromptLookup
from jaxaccel.heads import HeadsConfig, make_heads

CONFIG = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=128)
STOP = 7


@pytest.fixture(scope="module")
def base():
    """A random model scaled up so that greedy text loops with several periods (as in test_speculative)."""
    graphdef, state = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)))
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, state))


@pytest.fixture(scope="module")
def prompts(base):
    """Random prompts, each followed by some of the base's own greedy text (so lookups can hit)."""
    rng = np.random.default_rng(0)
    heads = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (5, 11, 3, 8, 1)]
    more = AutoregressiveDecoder(base).generate(heads, max_new_tokens=12).sequences()
    return [h + m[:k] for h, m, k in zip(heads, more, (12, 0, 6, 9, 12))]


@pytest.fixture(scope="module")
def rest_corpus(base, tmp_path_factory):
    """REST's datastore text: the base's own greedy answers to other random prompts, as
    train.responses writes them."""
    rng = np.random.default_rng(1)
    heads = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in rng.integers(1, 10, 32)]
    answers = AutoregressiveDecoder(base).generate(heads, max_new_tokens=40).sequences()
    path = tmp_path_factory.mktemp("rest") / "shard-00000.jsonl"
    path.write_text("".join(json.dumps({"prompt_ids": h, "response_ids": a}) + "\n" for h, a in zip(heads, answers)))
    return path.parent


@struct.dataclass
class ToyState:
    last_b: jax.Array  # [B] the last emitted token


@dataclass(frozen=True)
class RepeatLast:
    """A toy drafter: a chain repeating the token before the root."""

    depth: int = 2
    module: None = field(default=None, compare=False)

    @property
    def tree(self):
        return Tree.chain(self.depth)

    def start(self, base, module, prefill: Prefill) -> ToyState:
        return ToyState(last_b=jnp.take_along_axis(prefill.tokens_bs, prefill.lengths_b[:, None] - 1, axis=1)[:, 0])

    def draft(self, base, module, state: ToyState, root_b, cache) -> Draft:
        chain_bd = jnp.broadcast_to(state.last_b[:, None], (root_b.shape[0], self.depth))
        return Draft(jnp.concatenate([root_b[:, None], chain_bd], axis=1), self.tree.batch(root_b.shape[0]))

    def commit(self, base, module, state: ToyState, verified) -> ToyState:
        emitted_bd, count_b = verified.emitted_bd, verified.verdict.num_nodes_b
        # The token before the new root: the last accepted draft, or the old root.
        before_b = jnp.take_along_axis(emitted_bd, jnp.maximum(count_b - 2, 0)[:, None], axis=1)[:, 0]
        root_b = verified.draft.tokens_bn[:, 0]
        return ToyState(last_b=jnp.where(count_b >= 2, before_b, root_b))


TOY = DrafterRecord(name="toy", summary="repeat the token before the root", make=lambda tree, module, **o: RepeatLast(**o),
                    options=("depth",))


def test_a_drafter_is_one_record(base, prompts, monkeypatch):
    monkeypatch.setitem(RECORDS, "toy", TOY)
    assert register(TOY) is TOY
    want = AutoregressiveDecoder(base).generate(prompts, max_new_tokens=30, stop_tokens=[STOP])
    got = SpeculativeDecoder(base, make_drafter("toy:depth=3")).generate(prompts, max_new_tokens=30, stop_tokens=[STOP])
    assert got.sequences() == want.sequences()


@pytest.mark.parametrize("spec", ["pld", "pld:branches=3,depth=4,max_ngram=2", "rest:corpus={corpus},depth=3",
                                  "rest:corpus={corpus},branches=2,max_ngram=2+pld:depth=2", "recycling:nodes=6",
                                  "share:corpus={corpus}", "share:corpus={corpus},nodes=4,max_ngram=2", "lookahead",
                                  "lookahead:window=2,ngram=3,candidates=3"])
def test_training_free_drafters_equal_greedy(base, prompts, rest_corpus, spec):
    want = AutoregressiveDecoder(base).generate(prompts, max_new_tokens=40, stop_tokens=[STOP])
    drafter = make_drafter(spec.format(corpus=rest_corpus))
    got = SpeculativeDecoder(base, drafter).generate(prompts, max_new_tokens=40, stop_tokens=[STOP])
    assert got.sequences() == want.sequences()
    assert any(s[-1] == STOP and len(s) < 40 for s in want.sequences()), "no row stopped on its stop token"
    assert got.mean_accepted_tokens() > 1.5, got.num_steps_b  # drafts were accepted


def first_tokens(result, k):
    return [tuple(s[:k]) for s in result.sequences()]


SAMPLED_ROWS, SAMPLED_TOKENS = 3000, 4


@pytest.fixture(scope="module")
def sampled(base, prompts):
    """The first tokens of autoregressive sampling at T = 1 with top-4 filtering, and (for the test's
    power) with top-3, drawn once for every drafter's two-sample test: Counters of token tuples."""
    batch = [prompts[0]] * SAMPLED_ROWS
    ar = AutoregressiveDecoder(base).generate(batch, policy=Sampler(temperature=1.0, top_k=4),
                                              max_new_tokens=SAMPLED_TOKENS, seed=1)
    other = AutoregressiveDecoder(base).generate(batch, policy=Sampler(temperature=1.0, top_k=3),
                                                 max_new_tokens=SAMPLED_TOKENS, seed=3)
    return collections.Counter(first_tokens(ar, SAMPLED_TOKENS)), collections.Counter(first_tokens(other, SAMPLED_TOKENS))


@pytest.mark.parametrize("spec", ["pld:branches=4,depth=3", "rest:corpus={corpus},branches=2,depth=3", "recycling",
                                  "share:corpus={corpus}", "lookahead"])
def test_sampling_follows_the_base_distribution(base, prompts, sampled, rest_corpus, spec):
    """Two-sample test at T = 1: the first 4 tokens of speculative and autoregressive sampling
    have the same joint law (deterministic drafts are point masses to the verifier). Top-4
    filtering: this random base is near-uniform over 50 tokens, which would leave no draft accepted."""
    policy = Sampler(temperature=1.0, top_k=4)
    rows, k = SAMPLED_ROWS, SAMPLED_TOKENS
    batch = [prompts[0]] * rows
    drafter = make_drafter(spec.format(corpus=rest_corpus))
    spec_result = SpeculativeDecoder(base, drafter).generate(batch, policy=policy, max_new_tokens=k, seed=2)
    # The test exercises acceptance: 0.05 more tokens per pass over ~9000 passes is hundreds of drafts.
    assert spec_result.mean_accepted_tokens() > 1.05, spec_result.mean_accepted_tokens()
    a, o = sampled
    s = collections.Counter(first_tokens(spec_result, k))
    common = [t for t in a if a[t] + s[t] >= 20]  # pool rare sequences into one cell
    table = np.array([[a[t] for t in common] + [rows - sum(a[t] for t in common)],
                      [s[t] for t in common] + [rows - sum(s[t] for t in common)]])
    assert table.shape[1] > 5
    assert stats.chi2_contingency(table).pvalue > 1e-3, table
    # The test has power: a slightly different law (top-3) is detected.
    table = np.array([[a[t] for t in common] + [rows - sum(a[t] for t in common)],
                      [o[t] for t in common] + [rows - sum(o[t] for t in common)]])
    assert stats.chi2_contingency(table).pvalue < 1e-3


def lookup_state(text, size=16):
    tokens = np.full((1, size), -1, np.int32)
    tokens[0, :len(text)] = text
    return LookupState(tokens_bl=jnp.asarray(tokens), length_b=jnp.array([len(text)]))


def lookup(drafter, text):
    draft = drafter.draft(None, None, lookup_state(text), jnp.array([text[-1]]), None)
    return np.asarray(draft.tokens_bn[0]).tolist()


def matched_ngram(drafter, text) -> int:
    return int(drafter.matches(lookup_state(text))[2][0])


def test_prompt_lookup_takes_the_longest_most_recent_match():
    drafter = PromptLookup(depth=3, max_ngram=2)
    # "5 6" occurs at 0 (then 1) and at 3 (then 2): the most recent wins; the 1-gram "6" would also match.
    assert lookup(drafter, [5, 6, 1, 5, 6, 2, 9, 5, 6]) == [6, 2, 9, 5]
    # A loop runs into the present: its continuation repeats the period (3 4 5 3 4 | 5 3 4).
    assert lookup(drafter, [3, 4, 5, 3, 4]) == [4, 5, 3, 4]
    # Nothing matches: token 0 throughout (rejected by the verifier).
    assert lookup(drafter, [1, 2, 3]) == [3, 0, 0, 0]
    # Two branches: the two most recent occurrences of the 1-gram "1", most recent first.
    assert lookup(PromptLookup(depth=2, branches=2, max_ngram=1), [1, 8, 1, 9, 2, 1]) == [1, 9, 8, 2, 1]
    # What it matched: the longest n-gram (at most max_ngram), 0 for none.
    assert [matched_ngram(drafter, t) for t in ([5, 6, 1, 5, 6, 2, 9, 5, 6], [7, 6, 1, 5, 6], [1, 2, 3])] == [2, 1, 0]
    assert matched_ngram(PromptLookup(max_ngram=3), [5, 6, 7, 1, 5, 6, 7]) == 3


def test_drafter_specs_and_errors(base):
    assert parse_spec("pld:depth=6,branches=2") == ("pld", {"depth": 6, "branches": 2})
    assert make_drafter("pld:depth=6").tree.num_nodes == 7
    with pytest.raises(ValueError, match="unknown drafter 'nope'; known: medusa, hydra, eagle, "):
        make_drafter("nope")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['width'\] for drafter 'pld'"):
        make_drafter("pld:width=2")
    heads = make_heads(HeadsConfig(kind="medusa"), base.config, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="takes no trained heads"):
        RECORDS["pld"].build(module=heads)
    with pytest.raises(ValueError, match="the eagle drafter needs trained heads"):
        make_drafter("eagle")
    assert RECORDS["medusa"].module is type(heads) and not RECORDS["pld"].trained
