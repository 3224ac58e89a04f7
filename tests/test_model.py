"""The three uses of the forward pass agree: prefill + tree verify + keep == full causal forward."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jaxaccel import KVCache, ModelConfig, Transformer

CONFIGS = {
    "gqa": ModelConfig(vocab_size=61, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, max_position_embeddings=64),
    "qknorm_window_bias": ModelConfig(vocab_size=61, hidden_size=48, intermediate_size=64, num_layers=2,
                                      num_heads=6, num_kv_heads=3, qk_norm=True, qkv_bias=True, sliding_window=4,
                                      max_position_embeddings=64, family="qwen3"),
}


def random_tree(rng, n):
    """parent[i] < i (or -1: a child of the last committed token); mask[i, j] = j is i or an ancestor."""
    parent = np.array([rng.integers(-1, i) for i in range(n)])
    mask = np.eye(n, dtype=bool)
    depth = np.zeros(n, np.int32)
    for i in range(n):
        if parent[i] >= 0:
            mask[i] |= mask[parent[i]]
            depth[i] = depth[parent[i]] + 1
    return parent, mask, depth


# The model's passes compiled whole: eager, every op of the forward compiles on its own.
forward = nnx.jit(lambda model, tokens, positions=None, cache=None, mask=None:
                  model.forward(tokens, positions, cache=cache, mask=mask))
prefill = nnx.jit(lambda model, tokens, lengths, cache: model.prefill(tokens, lengths, cache))


def last_logits(model, seqs):
    """Full causal forward of each sequence (one batched call, right-padded): logits at its last token."""
    width = max(len(s) for s in seqs)
    batch = np.zeros((len(seqs), width), np.int32)
    for r, s in enumerate(seqs):
        batch[r, :len(s)] = s
    logits = np.asarray(forward(model, batch).logits)
    return np.stack([logits[r, len(s) - 1] for r, s in enumerate(seqs)])


def path_to(parent, i):
    path = []
    while i >= 0:
        path.append(i)
        i = parent[i]
    return path[::-1]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tree_verify_and_keep_match_full_forward(name):
    config = CONFIGS[name]
    model = Transformer(config, rngs=nnx.Rngs(7))
    rng = np.random.default_rng(11)
    lengths = np.array([5, 9, 2], np.int32)
    prompts = rng.integers(0, config.vocab_size, (3, 9)).astype(np.int32)
    n = 7
    parent, mask, depth = random_tree(rng, n)
    tree_tokens = rng.integers(0, config.vocab_size, (3, n)).astype(np.int32)
    positions = (lengths[:, None] + depth[None, :]).astype(np.int32)

    cache = prefill(model, prompts, lengths, KVCache.create(config, 3, 24)).cache
    out = forward(model, tree_tokens, positions, cache, mask)

    for b in range(3):
        want = last_logits(model, [np.concatenate([prompts[b, :lengths[b]], tree_tokens[b, path_to(parent, i)]])
                                   for i in range(n)])
        np.testing.assert_allclose(np.asarray(out.logits[b]), want, atol=2e-5, rtol=0)

    # Keep a different accepted path per row, then decode one more token on top of it.
    leaf = [n - 1, int(np.argmax(depth)), 0]
    paths = [path_to(parent, i) for i in leaf]
    count = np.array([len(p) for p in paths], np.int32)
    offsets = np.zeros((3, n), np.int32)
    for b, p in enumerate(paths):
        offsets[b, :len(p)] = p
    kept = out.cache.keep(offsets, count)
    np.testing.assert_array_equal(np.asarray(kept.lengths), lengths + count)
    nxt = rng.integers(0, config.vocab_size, (3, 1)).astype(np.int32)
    step = forward(model, nxt, cache=kept)
    want = last_logits(model, [np.concatenate([prompts[b, :lengths[b]], tree_tokens[b, paths[b]], nxt[b]])
                               for b in range(3)])
    np.testing.assert_allclose(np.asarray(step.logits[:, 0]), want, atol=2e-5, rtol=0)


def test_decoding_one_token_at_a_time_matches_full_forward():
    config = CONFIGS["gqa"]
    model = Transformer(config, rngs=nnx.Rngs(3))
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, (2, 12)).astype(np.int32)
    full = np.asarray(forward(model, tokens).logits)
    out = prefill(model, tokens[:, :4], np.array([4, 4]), KVCache.create(config, 2, 16))
    cache, logits = out.cache, [np.asarray(out.logits)]
    for t in range(4, 12):
        step = forward(model, tokens[:, t:t + 1], cache=cache)
        cache = step.cache.advance(np.ones(2, np.int32))
        logits.append(np.asarray(step.logits))
    np.testing.assert_allclose(np.concatenate(logits, axis=1), full, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_attends_among_its_tokens_as_a_pass_over_the_whole_cache_does(name):
    """A prefill (empty cache) attends among its own tokens, past CAUSAL_BLOCK in causal blocks; the
    same pass told nothing of the empty cache attends over every slot; a full forward is the reference."""
    from jaxaccel.layers.attention import CAUSAL_BLOCK

    config = dataclasses.replace(CONFIGS[name], max_position_embeddings=512)
    model = Transformer(config, rngs=nnx.Rngs(5))
    lengths = np.array([2 * CAUSAL_BLOCK + 44, CAUSAL_BLOCK + 3, 17], np.int32)  # a partial last block
    rng = np.random.default_rng(8)
    tokens = np.zeros((3, lengths.max()), np.int32)
    for r, n in enumerate(lengths):
        tokens[r, :n] = rng.integers(0, config.vocab_size, n)
    cache = KVCache.create(config, 3, int(lengths.max()) + 40)
    prefilled = prefill(model, tokens, lengths, cache)
    over_all = forward(model, tokens, cache=cache)
    rows = np.arange(3)
    last = np.asarray(prefilled.logits)[rows, lengths - 1]
    np.testing.assert_allclose(last, np.asarray(over_all.logits)[rows, lengths - 1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(last, last_logits(model, [tokens[r, :n] for r, n in enumerate(lengths)]),
                               atol=2e-5, rtol=0)
    committed = over_all.cache.advance(lengths)  # as prefill does (a ring commits its pending K/V)
    for got, want in zip(jax.tree.leaves(prefilled.cache.layers), jax.tree.leaves(committed.layers)):
        for r, n in enumerate(lengths):  # the prompt's K/V in the cache; padding slots are overwritten later
            np.testing.assert_allclose(np.asarray(got)[r, :n], np.asarray(want)[r, :n], atol=1e-5, rtol=0)
    assert np.array_equal(np.asarray(prefilled.cache.lengths), lengths)


def test_sequence_longer_than_cache_or_context():
    config = CONFIGS["gqa"]
    model = Transformer(config, rngs=nnx.Rngs(0))
    cache = model.prefill(np.ones((1, 6), np.int32), np.array([6]), KVCache.create(config, 1, 8)).cache
    with pytest.raises(ValueError, match="sequence longer than the cache: 6 cached \\+ 3 new tokens > 8 slots"):
        model.forward(np.ones((1, 3), np.int32), cache=cache)
    with pytest.raises(ValueError, match="longer than the model's context"):
        KVCache.create(config, 1, 65)
    with pytest.raises(ValueError, match="sequence of 65 tokens is longer than the model's context"):
        model(np.ones((1, 65), np.int32))


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_heads \\(6\\) must be a multiple of num_kv_heads \\(4\\)"):
        ModelConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="unknown model config field\\(s\\) \\['hiden_size'\\]"):
        ModelConfig().replace(hiden_size=3)
    assert hash(ModelConfig()) == hash(ModelConfig())


@pytest.mark.parametrize("panels", [True, False], ids=["panel-kernel", "xla"])
def test_decode_layout_gives_the_same_logits_and_is_not_a_param(panels, monkeypatch):
    # A decoder's copy of the model carries its weights in decode-time layouts: panel-packed copies of
    # every projection and the tied LM head where the CPU kernel runs, else a [d, V] copy of the tied
    # table. Its logits equal the plain model's on fresh tokens, over 1 to 16 tokens a row and past
    # that (XLA's product), its Params are the same arrays, and the copies are no Params.
    import jaxaccel.model as model_module
    from jaxaccel.cpu_kernels.panel_matmul import available
    from jaxaccel.model import DecodeCopy, decode_layout

    if panels and not available():
        pytest.skip("the panel kernel does not run on this machine")
    monkeypatch.setattr(model_module, "panel_kernel_available", lambda: panels)
    config = dataclasses.replace(CONFIGS["gqa"], tie_embeddings=True, vocab_size=64)
    model = Transformer(config, rngs=nnx.Rngs(3))
    fast = decode_layout(model)
    copies = jax.tree.leaves(nnx.state(fast, DecodeCopy))
    if panels:
        projections = 5 * config.num_layers  # q, o, gate, up, down; k and v (24 wide) are not packable
        assert fast.lm_table_dv is None and isinstance(fast.lm_panels, DecodeCopy)
        assert len(copies) == projections + 1
        assert fast.layers[0].mlp.up_proj.panels[...].shape == (config.intermediate_size // 16, config.hidden_size, 16)
        assert decode_layout(model).lm_panels[...] is fast.lm_panels[...]  # one copy per model
        assert fast.layers[0].self_attn.cpu_kernel and not model.layers[0].self_attn.cpu_kernel
    else:
        assert fast.lm_panels is None and isinstance(fast.lm_table_dv, DecodeCopy) and len(copies) == 1
        assert decode_layout(model).lm_table_dv[...] is fast.lm_table_dv[...]  # one copy per model
    assert model.lm_table_dv is None and model.lm_panels is None and model.layers[0].mlp.up_proj.panels is None
    assert fast.embed_tokens.embedding[...] is model.embed_tokens.embedding[...]
    assert len(jax.tree.leaves(nnx.state(fast, nnx.Param))) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    tokens = np.random.default_rng(11).integers(0, config.vocab_size, (2, 12)).astype(np.int32)
    for n in (1, 5, 12):  # 2, 10 and 24 rows: the last past the kernel's 16
        np.testing.assert_allclose(np.asarray(forward(fast, tokens[:, :n]).logits),
                                   np.asarray(forward(model, tokens[:, :n]).logits), rtol=1e-5, atol=1e-5)
    lengths = np.array([7, 4], np.int32)  # then 3 tokens over a cache (rows of unequal lengths)
    over_cache = [forward(m, tokens[:, 8:11], cache=prefill(m, tokens[:, :8], lengths, KVCache.create(config, 2, 24)).cache)
                  .logits for m in (fast, model)]
    np.testing.assert_allclose(*map(np.asarray, over_cache), rtol=1e-5, atol=1e-5)
    untied_model = Transformer(dataclasses.replace(CONFIGS["qknorm_window_bias"], vocab_size=64), rngs=nnx.Rngs(3))
    untied = decode_layout(untied_model)  # an LM head of its own, projections with biases
    if panels:
        assert isinstance(untied.lm_head.panels, DecodeCopy) and untied.lm_panels is None
        np.testing.assert_allclose(np.asarray(forward(untied, tokens[:, :3]).logits),
                                   np.asarray(forward(untied_model, tokens[:, :3]).logits), rtol=1e-5, atol=1e-5)
    else:
        assert untied is untied_model
