"""Token Recycling's table outlives the call: a decoder's next call starts from what the last one
learned, the output stays greedy decoding's, and a repeated question is drafted better."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxaccel import ModelConfig, Transformer
from jaxaccel.decoding import AutoregressiveDecoder, Greedy
from jaxaccel.decoding.speculative import SpeculativeDecoder, spec_prefill_jit
from jaxaccel.drafters import make_drafter
from jaxaccel.drafters.recycling import RecyclingState

NEW = 40
STOP = 7
# A random model over 256 tokens: its greedy text rarely repeats a token within an answer, so a first
# call has little to recycle and a repeated one everything.
CONFIG = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def base():
    return Transformer(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (8, 5)]


def run(decoder, prompt):
    """(the drafter's state when the call starts, at its end, and the result) of one greedy batch-1 call."""
    state, stop_ids = decoder.start([prompt], policy=Greedy(), max_new_tokens=NEW, stop_tokens=[STOP])
    first = np.asarray(state.draft.table_bvk)
    final = decoder.finish(state, stop_ids, policy=Greedy())
    return first, final.draft, final.result


def test_the_table_carries_over_to_the_next_call(base, prompts):
    prompt, other = prompts
    want = AutoregressiveDecoder(base).generate([prompt], max_new_tokens=NEW, stop_tokens=[STOP]).sequences()
    decoder = SpeculativeDecoder(base, make_drafter("recycling"))
    _, end1, result1 = run(decoder, prompt)
    carried = decoder.carried
    # Batch 1: the carried table is the row's table as call 1 left it.
    np.testing.assert_array_equal(carried.table_vk, end1.table_bvk[0])
    np.testing.assert_array_equal(carried.stamp_v, end1.stamp_bv[0])
    compiled = spec_prefill_jit._cache_size()
    start2, _, result2 = run(decoder, prompt)
    assert spec_prefill_jit._cache_size() == compiled  # a carried call compiles nothing new
    ranked_v = np.asarray(carried.stamp_v) > 0
    assert ranked_v.sum() >= 20
    # Call 2 starts from it: every token the base ranked keeps its ranking; the others differ at
    # most in rank 0 of the prompt's tokens (their successor in the prompt).
    np.testing.assert_array_equal(start2[0][ranked_v], np.asarray(carried.table_vk)[ranked_v])
    seeded_v = np.zeros_like(ranked_v)
    seeded_v[prompt] = True
    np.testing.assert_array_equal(start2[0][~ranked_v & ~seeded_v], np.asarray(carried.table_vk)[~ranked_v & ~seeded_v])
    assert result1.sequences() == result2.sequences() == want
    # The repeated question is drafted from the base's own rankings along its whole answer.
    assert result2.mean_accepted_tokens() > result1.mean_accepted_tokens() + 1.5, (result1.num_steps_b,
                                                                                    result2.num_steps_b)
    # Another question, then reset: the decoder forgets, and the first call's acceptance returns.
    assert decoder.generate([other], max_new_tokens=NEW, stop_tokens=[STOP]).sequences() == \
        AutoregressiveDecoder(base).generate([other], max_new_tokens=NEW, stop_tokens=[STOP]).sequences()
    decoder.reset()
    start3, _, result3 = run(decoder, prompt)
    np.testing.assert_array_equal(result3.num_steps_b, result1.num_steps_b)
    fresh_start, _, _ = run(SpeculativeDecoder(base, make_drafter("recycling")), prompt)
    np.testing.assert_array_equal(start3, fresh_start)


def test_a_batch_carries_each_tokens_latest_ranking():
    """The carry has no batch axis: per token, the row whose verify pass ranked it last."""
    drafter = make_drafter("recycling")
    rng = np.random.default_rng(1)
    b, vocab, k = 3, 11, drafter.tree.max_rank
    table = rng.integers(0, 50, (b, vocab, k))
    stamp = rng.choice(np.arange(20), (b, vocab))  # ties pick the first row, as argmax does
    carried = drafter.carry(RecyclingState(table_bvk=jnp.asarray(table), stamp_bv=jnp.asarray(stamp),
                                           clock=jnp.int32(20)))
    for v in range(vocab):
        row = max(range(b), key=lambda r: (stamp[r, v], -r))
        np.testing.assert_array_equal(carried.table_vk[v], table[row, v])
        assert carried.stamp_v[v] == stamp[row, v]
    assert int(carried.clock) == 20


def test_nodes_sizes_the_default_tree():
    """`recycling:nodes=N`: the best N-node tree under the default acceptance guess (a small tree
    for a CPU, where a verify pass over a few rows costs about what one row does)."""
    assert make_drafter("recycling").tree.num_nodes == 24
    small = make_drafter("recycling:nodes=6").tree
    assert small.num_nodes == 6 and small.paths[:2] == ((0,), (1,)) and (0, 0) in small.paths
    with pytest.raises(ValueError, match="at least 2 nodes"):
        make_drafter("recycling:nodes=1")
