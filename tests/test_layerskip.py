"""Layer-skip self-speculation: the base with layers skipped drafts over the base's own cache.
Greedy decoding at T = 0, the base's law at T = 1; the search records its choice beside the model."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from drafter_fixtures import looping_model, random_prompts, same_law_pvalue
from flax import nnx
from test_drafters import CONFIG as TWO_LAYERS
from test_drafters import STOP

from jaxaccel.cache import KVCache
from jaxaccel.decoding import AutoregressiveDecoder, Sampler
from jaxaccel.decoding.speculative import SpeculativeDecoder
from jaxaccel.drafters import make_drafter
from jaxaccel.drafters.layerskip import LayerSkip, default_skip, parse_skip, recorded_options
from jaxaccel.drafters.layerskip_search import Scorer, draft_step_cost, search_skip

CONFIG = dataclasses.replace(TWO_LAYERS, num_layers=4)  # layers to skip


@pytest.fixture(scope="module")
def base():
    return looping_model(CONFIG)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(CONFIG.vocab_size)


@pytest.mark.parametrize("spec", ["layerskip", "layerskip:skip=1+2,depth=4"])  # the default skips layer 1
def test_layer_skipping_equals_greedy(base, prompts, spec):
    want = AutoregressiveDecoder(base).generate(prompts, max_new_tokens=30, stop_tokens=[STOP])
    got = SpeculativeDecoder(base, make_drafter(spec)).generate(prompts, max_new_tokens=30, stop_tokens=[STOP])
    assert got.sequences() == want.sequences()
    assert any(s[-1] == STOP and len(s) < 30 for s in want.sequences()), "no row stopped on its stop token"
    assert got.mean_accepted_tokens() > 1.3, got.num_steps_b  # drafts were accepted


def test_skipping_nothing_drafts_the_base_itself(base, prompts):
    """With every layer kept, the draft is the base's own greedy continuation over the base's
    cache: every draft is accepted (a wrong position or cache slot would show here)."""
    got = SpeculativeDecoder(base, make_drafter("layerskip:skip=,depth=3")).generate(prompts, max_new_tokens=17)
    assert got.sequences() == AutoregressiveDecoder(base).generate(prompts, max_new_tokens=17).sequences()
    # 17 tokens: the prefill's, then 4 verify passes of 4 tokens each.
    assert np.asarray(got.num_steps_b).tolist() == [5] * len(prompts)


def test_uncommitted_cache_slots_do_not_reach_the_verify_pass(base):
    """What a drafter writes at slots >= lengths is overwritten by a forward pass over new tokens
    before they attend to it: the same logits as over a cache holding nothing there."""
    rng = np.random.default_rng(1)
    prompt_bs, junk_bs, tokens_bn = (jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, n))) for n in (9, 6, 4))
    mask_nn = jnp.asarray(np.tril(rng.random((4, 4)) < 0.6) | np.eye(4, dtype=bool))  # a tree's ancestor mask

    @nnx.jit
    def logits(model, prompt_bs, junk_bs, tokens_bn):
        cache = model.forward(prompt_bs, cache=KVCache.create(CONFIG, 2, 24)).cache.advance(jnp.array([9, 6]))
        dirty = model.forward(junk_bs, cache=cache).cache  # a drafter's writes, never committed
        clean_out, dirty_out = (model.forward(tokens_bn, cache=c, mask=mask_nn) for c in (cache, dirty))
        return clean_out.logits, dirty_out.logits, jax.tree.leaves(cache)[0], jax.tree.leaves(dirty)[0]

    clean, dirty, clean_kv, dirty_kv = logits(base, prompt_bs, junk_bs, tokens_bn)
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))
    assert not np.array_equal(np.asarray(clean_kv), np.asarray(dirty_kv))  # the cache was dirty


def test_sampling_follows_the_base_distribution(base):
    """Two-sample test at T = 1 (top-4: the random base is near-uniform): the first 4 tokens of
    speculative and autoregressive sampling have the same joint law; a different law is detected."""
    policy = Sampler(temperature=1.0, top_k=4)
    rows, k = 3000, 4
    batch = [[11, 3, 25, 40, 2]] * rows
    ar = AutoregressiveDecoder(base).generate(batch, policy=policy, max_new_tokens=k, seed=1)
    spec = SpeculativeDecoder(base, make_drafter("layerskip:skip=2,depth=3")).generate(
        batch, policy=policy, max_new_tokens=k, seed=2)
    assert spec.mean_accepted_tokens() > 1.05, spec.mean_accepted_tokens()
    other = AutoregressiveDecoder(base).generate(batch, policy=Sampler(temperature=1.0, top_k=3), max_new_tokens=k,
                                                 seed=3)
    assert same_law_pvalue(ar, spec, k) > 1e-3
    assert same_law_pvalue(ar, other, k) < 1e-3


def test_gated_scoring_matches_the_drafter(base, prompts):
    """The search's gated drafter (every layer run, outputs kept per row) accepts what the real
    drafter with the same skip set accepts (in rows whose neighbours have other gates)."""
    scores = Scorer(base, prompts[:2], depth=3, sets_per_batch=2, max_new_tokens=10)([(2,), (1, 2)])
    real = SpeculativeDecoder(base, LayerSkip((1, 2), 3)).generate(prompts[:2], max_new_tokens=10)
    passes = int(np.sum(real.num_steps_b)) - 2
    assert scores[1] == pytest.approx((int(np.sum(real.num_generated_b)) - 2) / passes)
    assert scores[0] != scores[1]


def test_search_records_its_choice_and_the_drafter_uses_it(base, prompts, tmp_path):
    # The scorer's shapes are test_gated_scoring_matches_the_drafter's: one compilation.
    result = search_skip(base, prompts[:2], depth=3, rounds=1, sets_per_batch=2, max_new_tokens=10, log=lambda _: None)
    assert result["objective"] == max(t["objective"] for t in result["tried"] if t["skip"])
    assert result["skip_nothing"]["mean_accepted_tokens"] == 3.0  # the base drafting for itself: all accepted
    assert result["step_cost"] == pytest.approx(result["verify_cost"] + 3 * draft_step_cost(base, result["skip"]))
    (tmp_path / "layerskip.json").write_text(json.dumps({"command": "test", "result": result}))
    options = recorded_options(tmp_path)
    assert parse_skip(options["skip"]) == tuple(result["skip"]) and options["depth"] == 3
    assert make_drafter("layerskip", model_dir=tmp_path) == LayerSkip(tuple(result["skip"]), 3)
    assert make_drafter("layerskip:depth=5", model_dir=tmp_path).depth == 5  # given options win
    assert make_drafter("layerskip", model_dir=tmp_path / "elsewhere") == LayerSkip(None, 3)


def test_skip_sets_and_errors(base):
    assert parse_skip("3-5+9") == (3, 4, 5, 9) and parse_skip(2) == (2,) and parse_skip("") == ()
    assert default_skip(4) == (1,) and default_skip(30) == tuple(range(3, 27, 2))
    assert 0.2 < draft_step_cost(base, (1, 2)) < draft_step_cost(base, (1,)) < draft_step_cost(base, ()) == 1.0
    with pytest.raises(ValueError, match="expected layer numbers and ranges joined by"):
        make_drafter("layerskip:skip=a-b")
    with pytest.raises(ValueError, match=r"skip=\[4\]: the base has only 4 layers"):
        LayerSkip((4,)).kept(4)
    with pytest.raises(ValueError, match="leaves none of the base's 4 layers"):
        LayerSkip((0, 1, 2, 3)).kept(4)
    with pytest.raises(ValueError, match="depth >= 1"):
        make_drafter("layerskip:depth=0")
    with pytest.raises(ValueError, match="not --tree"):
        make_drafter("layerskip", tree=LayerSkip().tree)
