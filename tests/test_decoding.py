"""The autoregressive loop: greedy parity with transformers, stop rules, no recompiles within a
bucket, sampling distributions, tensor-parallel decoding, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx

from hf_models import build_hf_model, save_hf_model
from jaxaccel import ModelConfig, Transformer, load_hf
from jaxaccel.decoding import AutoregressiveDecoder, DecodeResult, Greedy, Sampler, generate, make_policy
from jaxaccel.decoding.autoregressive import decode_loop_jit, prefill_jit
from jaxaccel.decoding.sampling import greedy_tokens
from jaxaccel.decoding.prompts import bucket_length
from jaxaccel.sharding import make_mesh

TINY = ModelConfig(vocab_size=61, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=64)


def random_prompts(rng, lengths, vocab):
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def hf_greedy(hf_model, prompt, max_new_tokens, eos=None):
    """transformers' greedy continuation of one prompt (batch 1: no padding involved)."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


FAMILIES = ["llama_gqa_llama3", "qwen2_gqa", "qwen3_gqa_tied", "mistral_window"]


@pytest.mark.parametrize("seed,name", list(enumerate(FAMILIES)))
def test_greedy_matches_transformers_with_ragged_batch_and_eos(tmp_path, seed, name):
    hf_model = build_hf_model(name, seed=seed)
    model = load_hf(save_hf_model(hf_model, tmp_path))
    rng = np.random.default_rng(seed)
    prompts = random_prompts(rng, [3, 11, 6], model.config.vocab_size)
    # An EOS that the first row meets a few tokens in, so stopping is exercised against transformers.
    eos = hf_greedy(hf_model, prompts[0], 12)[4]
    want = [hf_greedy(hf_model, p, 12, eos=eos) for p in prompts]

    result = generate(model, prompts, max_new_tokens=12, stop_tokens=[eos])
    assert result.sequences() == want
    assert want[0][-1] == eos and len(want[0]) <= 5
    np.testing.assert_array_equal(result.num_steps_b, result.num_generated_b)  # one token per forward pass
    assert result.mean_accepted_tokens() == 1.0
    assert result.done_b.all()
    for row, n in zip(result.tokens_bn, result.num_generated_b):
        assert (row[n:] == 0).all()


def test_new_prompt_length_in_the_same_bucket_does_not_recompile():
    decoder = AutoregressiveDecoder(Transformer(TINY, rngs=nnx.Rngs(1)))
    rng = np.random.default_rng(0)

    def sizes():
        return prefill_jit._cache_size(), decode_loop_jit._cache_size()

    decoder.generate(random_prompts(rng, [5, 2, 3, 1], TINY.vocab_size), max_new_tokens=10)
    before = sizes()
    for lengths in ([9, 16, 1, 1], [1, 13, 2, 7], [16, 16, 16, 16]):  # same batch size, same bucket of 16
        decoder.generate(random_prompts(rng, lengths, TINY.vocab_size), max_new_tokens=10)
    assert sizes() == before
    assert bucket_length(17) == 32
    assert [bucket_length(n) for n in (1, 24, 40, 48, 49, 97, 671, 769)] == [16, 32, 48, 48, 64, 128, 768, 1024]
    decoder.generate(random_prompts(rng, [17, 3, 1, 1], TINY.vocab_size), max_new_tokens=10)  # a new bucket
    assert sizes() == (before[0] + 1, before[1] + 1)


def test_rows_stop_independently_and_do_not_depend_on_their_batch():
    model = Transformer(TINY, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(3)
    prompts = random_prompts(rng, [4, 9, 1, 7], TINY.vocab_size)
    free = generate(model, prompts, max_new_tokens=10).sequences()
    stop = free[1][3]  # row 1 stops at its 4th token; the others where (if) they meet it
    result = generate(model, prompts, max_new_tokens=10, stop_tokens=[stop, 60])
    for row, tokens in zip(free, result.sequences()):
        cut = row.index(stop) + 1 if stop in row else len(row)
        assert tokens == row[:min(cut, 10)]
    # Each row's tokens are the argmax of a full causal forward pass over its own sequence
    # (right-padded into one batch: padding after a token does not change its logits).
    sequences = np.zeros((4, 19), np.int32)
    for b, (prompt, row) in enumerate(zip(prompts, free)):
        sequences[b, :len(prompt) + len(row)] = prompt + row
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, sequences))
    for b, (prompt, row) in enumerate(zip(prompts, free)):
        np.testing.assert_array_equal(row, np.argmax(logits[b, len(prompt) - 1:len(prompt) + 9], axis=-1))


def test_append_cuts_at_stop_tokens_and_buffer_end():
    """Several tokens per pass, as a speculative loop appends an accepted path."""
    result = DecodeResult.empty(3, 5)
    stop_ids = np.array([7, -1, -1], np.int32)
    new = np.array([[1, 7, 2], [3, 4, 5], [6, 6, 6]], np.int32)
    result = result.append(new, np.array([3, 2, 1]), stop_ids)
    np.testing.assert_array_equal(result.num_generated_b, [2, 2, 1])
    np.testing.assert_array_equal(result.done_b, [True, False, False])
    result = result.append(np.array([[9, 9, 9], [8, 8, 7], [5, 5, 5]], np.int32), np.array([3, 3, 3]), stop_ids)
    np.testing.assert_array_equal(result.tokens_bn, [[1, 7, 0, 0, 0], [3, 4, 8, 8, 7], [6, 5, 5, 5, 0]])
    np.testing.assert_array_equal(result.num_generated_b, [2, 5, 4])
    np.testing.assert_array_equal(result.num_steps_b, [1, 2, 2])
    np.testing.assert_array_equal(result.done_b, [True, True, False])


def test_greedy_tokens_is_argmax_with_ties_to_the_lowest_id():
    rng = np.random.default_rng(0)
    ties = rng.integers(0, 4, (6, 3, 97)).astype(np.float32)  # many exact ties per row
    spread = rng.standard_normal((6, 3, 97)).astype(np.float32)
    masked = np.where(rng.random((6, 3, 97)) < 0.9, -np.inf, spread).astype(np.float32)
    masked[0, 0] = -np.inf  # a row with nothing allowed: index 0, as argmax
    for logits in (ties, spread, masked):
        np.testing.assert_array_equal(greedy_tokens(jnp.asarray(logits)), np.argmax(logits, axis=-1))
        np.testing.assert_array_equal(Greedy()(jnp.asarray(logits[:, 0])), np.argmax(logits[:, 0], axis=-1))
    for v in (7, 1537):  # one chunk; several, the last one partly padding
        nan_row = np.zeros(v, np.float32)
        nan_row[3] = np.nan
        assert 0 <= int(greedy_tokens(jnp.asarray(nan_row))) < v
    wide = rng.integers(0, 3, (4, 2, 1537)).astype(np.float32)  # ties across chunks
    wide[0, 0, -1] = 9.0  # the max in the padded last chunk
    wide[1, 0] = -np.inf
    for logits in (wide, rng.standard_normal((4, 2, 4096)).astype(np.float32)):
        np.testing.assert_array_equal(greedy_tokens(jnp.asarray(logits)), np.argmax(logits, axis=-1))


def test_categorical_tokens_is_jax_categorical_with_the_same_key():
    from jaxaccel.decoding.sampling import categorical_tokens

    rng = np.random.default_rng(5)
    for v in (13, 1537):
        logits = rng.standard_normal((40, v)).astype(np.float32) * 3
        logits[:, ::7] = -np.inf  # never drawn
        keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 40)
        ours = np.asarray(jax.vmap(categorical_tokens)(keys, jnp.asarray(logits)))
        np.testing.assert_array_equal(ours, np.asarray(jax.vmap(jax.random.categorical)(keys, jnp.asarray(logits))))
        assert not np.any(ours % 7 == 0)


def filtered_softmax(logits, temperature, top_k=None, top_p=None):
    """The reference: the distribution a Sampler must draw from, in float64 numpy."""
    z = logits / temperature
    keep = np.ones_like(z, bool)
    if top_k is not None:
        keep &= z >= np.sort(z)[-top_k]
    p = np.where(keep, np.exp(z - z.max()), 0)
    p /= p.sum()
    if top_p is not None:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        nucleus = order[before < top_p]
        p = np.where(np.isin(np.arange(len(p)), nucleus), p, 0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8),
                                                     (2.0, 6, 0.7)])
def test_sampler_draws_from_the_filtered_softmax(temperature, top_k, top_p):
    rng = np.random.default_rng(int(temperature * 10) + (top_k or 0))
    logits = rng.normal(0, 1.5, 12).astype(np.float32)
    rows = 20000
    policy = Sampler(temperature, top_k, top_p)
    tokens = np.asarray(policy(np.tile(logits, (rows, 1)), jax.random.key(rng.integers(1 << 30))))
    p = filtered_softmax(logits.astype(np.float64), temperature, top_k, top_p)
    counts = np.bincount(tokens, minlength=12)
    assert counts[p == 0].sum() == 0, "drew a token outside the top-k / top-p set"
    assert scipy.stats.chisquare(counts[p > 0], rows * p[p > 0]).pvalue > 1e-3
    # Rows are independent: the joint distribution of neighbouring rows is the product.
    pairs = tokens[0::2] * 12 + tokens[1::2]
    joint = np.bincount(pairs, minlength=144).reshape(12, 12)[p > 0][:, p > 0]
    expected = np.outer(p[p > 0], p[p > 0]) * (rows // 2)
    big = expected > 20
    assert scipy.stats.chisquare(joint[big], expected[big] * joint[big].sum() / expected[big].sum()).pvalue > 1e-3
    np.testing.assert_array_equal(np.exp(policy.filtered_logits(logits[None]))[0] > 0, p > 0)


def test_sampled_decoding_is_seeded_and_follows_the_model():
    model = Transformer(TINY, rngs=nnx.Rngs(4))
    prompt = np.random.default_rng(5).integers(0, TINY.vocab_size, 6).tolist()
    policy = make_policy(temperature=0.8, top_k=20)
    rows = 1024
    decoder = AutoregressiveDecoder(model)
    a = decoder.generate([prompt] * rows, policy=policy, max_new_tokens=3, seed=7)
    b = decoder.generate([prompt] * rows, policy=policy, max_new_tokens=3, seed=7)
    c = decoder.generate([prompt] * rows, policy=policy, max_new_tokens=3, seed=8)
    np.testing.assert_array_equal(a.tokens_bn, b.tokens_bn)
    assert (a.tokens_bn != c.tokens_bn).any()
    # Every row's first token is an independent draw from the model's filtered next-token distribution.
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, np.array([prompt], np.int32)))[0, -1]
    logits = logits.astype(np.float64)
    p = filtered_softmax(logits, 0.8, top_k=20)
    counts = np.bincount(a.tokens_bn[:, 0], minlength=TINY.vocab_size)
    assert counts[p == 0].sum() == 0
    merged = p > 5 / rows  # chi-square needs expected counts of a few; pool the tail
    observed = np.append(counts[merged], counts[~merged].sum())
    expected = np.append(p[merged], p[~merged].sum()) * rows
    assert scipy.stats.chisquare(observed[expected > 0], expected[expected > 0]).pvalue > 1e-3


def test_tensor_parallel_greedy_equals_single_device():
    config = TINY.replace(vocab_size=128, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=4)
    model = Transformer(config, rngs=nnx.Rngs(6))
    prompts = random_prompts(np.random.default_rng(7), [5, 12, 3, 8], config.vocab_size)
    want = generate(model, prompts, max_new_tokens=10)
    mesh = make_mesh("data=2,tensor=4")  # heads, kv heads, mlp and vocab split 4 ways, the batch 2 ways
    decoder = AutoregressiveDecoder(model, mesh=mesh)
    q_kernel = decoder.params["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    assert "tensor" in str(q_kernel.sharding.spec)  # really split
    got = decoder.generate(prompts, max_new_tokens=10)
    np.testing.assert_array_equal(got.tokens_bn, want.tokens_bn)


def test_bad_input_names_the_problem():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="prompt 1 is longer than the context: 64 tokens, the model has 64 positions"):
        generate(model, [[1, 2], [3] * 64], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 0 of 60 tokens \\+ 8 new tokens does not fit"):
        generate(model, [[1] * 60], max_new_tokens=8)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(model, [[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="no prompts given"):
        generate(model, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -0.5"):
        make_policy(temperature=-0.5)
    with pytest.raises(ValueError, match="top_p must be in \\(0, 1\\], got 1.5"):
        make_policy(temperature=1.0, top_p=1.5)
    assert make_policy(0.0, top_k=3) == Greedy()
