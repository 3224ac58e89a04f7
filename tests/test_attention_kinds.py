"""Attention kinds (full, duo, block_sparse, linear): every mode against a dense reference.

The references write each kind's visibility out as a full [T, T] mask per KV head (numpy loops
over positions; Quest's page choice recomputed from the keys) and run plain softmax attention;
linear attention is its definition summed directly. Tree verification is checked against
decoding each root-to-node path step by step, and `keep` against decoding the accepted path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxaccel import ModelConfig, Transformer
from jaxaccel.cache import KVCache
from jaxaccel.caches.streaming import StreamingEntry
from jaxaccel.config import AttentionSpec
from jaxaccel.layers.attention_kinds import KINDS, make_attention
from jaxaccel.layers.context import ForwardContext
from jaxaccel.layers.linear_attention import (chunked_linear_attention, linear_attention_step,
                                              masked_linear_attention)

BASE = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=128)
SPECS = {
    "full": AttentionSpec(),
    "duo": AttentionSpec(kinds=("duo",), sink_size=3, recent_size=6),
    # Quest keeps 2 pages of 4 out of up to 8 candidates; Λ: 1 sink block + 2 local blocks of 4.
    "block_sparse": AttentionSpec(kinds=("block_sparse",), block_size=4, sink_blocks=1, local_blocks=2,
                                  page_size=4, token_budget=8),
    "linear": AttentionSpec(kinds=("linear",), chunk_size=4),
}
T, PROMPT = 36, 11  # sequence length; the first PROMPT tokens are prefilled


def config_for(kind: str, **overrides) -> ModelConfig:
    return ModelConfig(**BASE, attention=SPECS[kind]).replace(**overrides)


# ---------------------------------------------------------------------------------------------
# Dense references


def softmax_reference(q, k, v, visible_bktt):
    """q [B, T, H, D], k/v [B, T, Hkv, D], mask [B, Hkv, T, T] -> [B, T, H, D] (float64)."""
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    for head in range(h):
        kv = head // group
        scores = np.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kv]) / np.sqrt(d)
        scores = np.where(visible_bktt[:, kv], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[:, :, head] = np.einsum("bqk,bkd->bqd", probs, v[:, :, kv])
    return out


def quest_visible(q_hd, k_thd, p, kv_head, group, spec):
    """Dense head at decode position p (p committed keys before it): the keys it sees, Quest's way."""
    sink, local = spec.sink_blocks * spec.block_size, spec.local_blocks * spec.block_size
    page = spec.page_size
    seen = np.zeros(p + 1, bool)
    seen[p] = True
    for s in range(p):
        seen[s] = s < sink or p - s < local
    bounds = {}
    for j in range(p // page):  # complete pages only
        start, end = j * page, (j + 1) * page
        if end > sink and start <= p - local:
            lo, hi = k_thd[start:end, kv_head].min(0), k_thd[start:end, kv_head].max(0)
            qs = q_hd[kv_head * group:(kv_head + 1) * group]
            bounds[j] = np.maximum(qs * lo, qs * hi).sum()
    for j in sorted(bounds, key=lambda j: -bounds[j])[:spec.token_budget // page]:
        seen[j * page:(j + 1) * page] = True
    return seen


def reference_visible(kind, spec, q, k, decode_from):
    """[B, Hkv, T, T]: who sees whom. Queries at positions >= decode_from are decode steps."""
    b, t, h, _ = q.shape
    hkv = k.shape[2]
    retrieval = spec.retrieval_mask(0, hkv)
    vis = np.zeros((b, hkv, t, t), bool)
    for p in range(t):
        for s in range(p + 1):
            for kv in range(hkv):
                if kind == "duo" and not retrieval[kv]:
                    vis[:, kv, p, s] = s < spec.sink_size or p - s < spec.recent_size
                elif kind == "block_sparse" and not retrieval[kv]:
                    bs = spec.block_size
                    vis[:, kv, p, s] = s // bs < spec.sink_blocks or p // bs - s // bs < spec.local_blocks
                else:
                    vis[:, kv, p, s] = True
        if kind == "block_sparse" and p >= decode_from:
            for row in range(b):
                for kv in range(hkv):
                    if retrieval[kv]:
                        vis[row, kv, p, :p + 1] = quest_visible(q[row, p], k[row], p, kv, h // hkv, spec)
    return vis


def reference_layer(layer, kind, x_btd, decode_from=T):
    """The layer's output [B, T, d] from its own projections and the reference mask."""
    positions = jnp.broadcast_to(jnp.arange(x_btd.shape[1]), x_btd.shape[:2])
    q, k, v = (np.asarray(a, np.float64) for a in layer.project_qkv(x_btd, positions, rope=kind != "linear"))
    if kind == "linear":
        g = np.asarray(layer.log_decay(x_btd), np.float64)
        group = q.shape[2] // k.shape[2]
        k, v = np.repeat(k, group, 2), np.repeat(v, group, 2)
        cum = np.cumsum(g, axis=1)  # [B, T, H]
        decay = np.exp(cum[:, :, None] - cum[:, None, :])  # [B, t, s, H]
        causal = np.tril(np.ones((q.shape[1],) * 2, bool))[None, :, :, None]
        scores = np.einsum("bthd,bshd->btsh", q, k) / np.sqrt(q.shape[-1]) * np.where(causal, decay, 0)
        out = np.einsum("btsh,bshd->bthd", scores, v)
    else:
        spec = layer.config.attention or AttentionSpec()
        out = softmax_reference(q, k, v, reference_visible(kind, spec, q, k, decode_from))
    b, t = x_btd.shape[:2]
    return np.asarray(layer.o_proj(jnp.asarray(out.reshape(b, t, -1), jnp.float32)))


# ---------------------------------------------------------------------------------------------
# Running one attention layer over its cache entry


def context(positions_bn, lengths_b=None, mask_bnn=None):
    b, n = positions_bn.shape
    causal = mask_bnn is None
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)) if causal else mask_bnn, (b, n, n))
    return ForwardContext(positions_bn, mask, lengths_b, causal=causal)


def layer_and_inputs(kind, seed=0):
    config = config_for(kind)
    layer = make_attention(config, 0, rngs=nnx.Rngs(seed))
    # Larger weights than the init: sharper attention, so that a wrong mask shows.
    graphdef, state = nnx.split(layer)
    layer = nnx.merge(graphdef, jax.tree.map(lambda a: a * 8.0 if a.ndim == 2 else a, state))
    x_btd = jax.random.normal(jax.random.key(seed + 1), (2, T, config.hidden_size))
    return config, layer, x_btd


@jax.jit
def _run_layer(graphdef, state, x_bnd, positions_bn, lengths_b, mask_bnn, entry):
    return nnx.merge(graphdef, state)(x_bnd, context(positions_bn, lengths_b, mask_bnn), entry)


def run_layer(layer, x_bnd, positions_bn, lengths_b=None, mask_bnn=None, entry=None):
    """layer(x, context(...), entry) compiled as one program (eager, every op compiles on its own)."""
    graphdef, state = nnx.split(layer)
    return _run_layer(graphdef, state, x_bnd, positions_bn, lengths_b, mask_bnn, entry)


@jax.jit
def _decode_one(graphdef, state, x_b1d, entry, lengths_b):
    out, entry = nnx.merge(graphdef, state)(x_b1d, context(lengths_b[:, None], lengths_b), entry)
    return out, entry.advance(lengths_b, jnp.ones_like(lengths_b))


def decode_steps(layer, entry, lengths_b, x_bnd, start):
    """One token at a time from `start`, committing each; returns outputs [B, n, d], entry, lengths."""
    graphdef, state = nnx.split(layer)
    outs = []
    for i in range(x_bnd.shape[1]):
        out, entry = _decode_one(graphdef, state, x_bnd[:, i:i + 1], entry, lengths_b)
        lengths_b = lengths_b + 1
        outs.append(out)
    return jnp.concatenate(outs, axis=1), entry, lengths_b


def prefill(layer, config, x_btd, prompt=PROMPT, max_len=T + 8, count_b=None):
    """The first `prompt` inputs through an empty entry; count_b[b] of them committed (all by default)."""
    entry = KINDS[config.layer_kind(0)].create_entry(config, 0, x_btd.shape[0], max_len, jnp.float32)
    lengths = jnp.zeros((x_btd.shape[0],), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(prompt), (x_btd.shape[0], prompt))
    out, entry = run_layer(layer, x_btd[:, :prompt], positions, lengths, entry=entry)
    count_b = jnp.full_like(lengths, prompt) if count_b is None else jnp.asarray(count_b, jnp.int32)
    return out, entry.advance(lengths, count_b), lengths + count_b


@pytest.mark.parametrize("kind", list(SPECS))
def test_training_prefill_and_decode_match_dense_reference(kind):
    config, layer, x_btd = layer_and_inputs(kind)
    reference = reference_layer(layer, kind, x_btd, decode_from=PROMPT)
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    train, _ = run_layer(layer, x_btd, positions)
    train_reference = reference_layer(layer, kind, x_btd) if kind == "block_sparse" else reference
    np.testing.assert_allclose(train, train_reference, atol=2e-4, rtol=1e-3)
    prompt_out, entry, lengths = prefill(layer, config, x_btd)
    decoded, _, _ = decode_steps(layer, entry, lengths, x_btd[:, PROMPT:], PROMPT)
    np.testing.assert_allclose(jnp.concatenate([prompt_out, decoded], axis=1), reference, atol=2e-4, rtol=1e-3)


def test_block_sparse_decode_is_sparse():
    """The reference above is not vacuous: Quest's choice changes the output vs dense heads."""
    _, layer, x_btd = layer_and_inputs("block_sparse")
    quest = reference_layer(layer, "block_sparse", x_btd, decode_from=PROMPT)
    static = reference_layer(layer, "block_sparse", x_btd)
    assert np.abs(quest[:, -5:] - static[:, -5:]).max() > 1e-3


# A tree of 6 nodes: 0 -> {1, 2}, 1 -> {3}, 3 -> {4}, 2 -> {5}; depth <= 3.
PARENTS = [-1, 0, 0, 1, 3, 2]


def tree_mask():
    n = len(PARENTS)
    mask = np.eye(n, dtype=bool)
    for i in range(n):
        j = PARENTS[i]
        while j >= 0:
            mask[i, j] = True
            j = PARENTS[j]
    return mask


def path_to(i):
    path = []
    while i >= 0:
        path.append(i)
        i = PARENTS[i]
    return path[::-1]


@pytest.mark.parametrize("kind", list(SPECS))
def test_tree_verify_and_keep_equal_decoding_the_path(kind):
    config, layer, x_btd = layer_and_inputs(kind, seed=3)
    _, entry, lengths = prefill(layer, config, x_btd, prompt=24, count_b=[24, 21])  # ragged rows
    mask = tree_mask()
    depth = mask.sum(1) - 1
    x_tree = jax.random.normal(jax.random.key(7), (2, len(PARENTS), config.hidden_size)) * 2
    positions = lengths[:, None] + jnp.asarray(depth)
    tree_out, tree_entry = run_layer(layer, x_tree, positions, lengths, jnp.asarray(mask), entry)
    for node in range(len(PARENTS)):
        path = path_to(node)
        chain, _, _ = decode_steps(layer, entry, lengths, x_tree[:, path], 0)
        np.testing.assert_allclose(tree_out[:, node], chain[:, -1], atol=2e-4, rtol=1e-3)
    # Keep the path to node 4 (row 0) and to node 2 (row 1), then decode one more token.
    offsets = jnp.array([[0, 1, 3, 4], [0, 2, 0, 0]])
    count = jnp.array([4, 2])
    kept = tree_entry.keep(lengths, offsets, count)
    x_next = x_tree[:, :1] * -1.5
    after_keep, _, _ = decode_steps(layer, kept, lengths + count, x_next, 0)
    for row, path in enumerate(([0, 1, 3, 4], [0, 2])):
        _, chain_entry, chain_len = decode_steps(layer, entry, lengths, x_tree[:, path], 0)
        expected, _, _ = decode_steps(layer, chain_entry, chain_len, x_next, 0)
        np.testing.assert_allclose(after_keep[row], expected[row], atol=2e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Linear attention forms


@pytest.mark.parametrize("t,chunk,h,d", [(13, 4, 2, 8), (16, 16, 1, 4), (5, 8, 3, 6)])
def test_linear_forms_agree(t, chunk, h, d):
    keys = jax.random.split(jax.random.key(t * chunk), 4)
    q, k, v = (jax.random.normal(key, (2, t, h, d)) for key in keys[:3])
    g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (2, t, h)) * 3)  # strong decays too
    qs, ks, vs, gs = (np.asarray(a, np.float64) for a in (q, k, v, g))
    cum = np.cumsum(gs, 1)
    expected = np.zeros((2, t, h, d))
    for i in range(t):
        for s in range(i + 1):
            w = np.exp(cum[:, i] - cum[:, s]) * np.einsum("bhd,bhd->bh", qs[:, i], ks[:, s]) / np.sqrt(d)
            expected[:, i] += w[..., None] * vs[:, s]
    np.testing.assert_allclose(chunked_linear_attention(q, k, v, g, chunk), expected, atol=1e-4, rtol=1e-4)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (2, t, t))
    np.testing.assert_allclose(masked_linear_attention(q, k, v, g, causal), expected, atol=1e-4, rtol=1e-4)
    state = jnp.zeros((2, h, d, d))
    for i in range(t):
        o, state = linear_attention_step(q[:, i], k[:, i], v[:, i], g[:, i], state)
        np.testing.assert_allclose(o, expected[:, i], atol=1e-4, rtol=1e-4)


def test_linear_gates_never_overflow():
    """Decays near zero (g very negative) over long spans: finite outputs, no exp of a positive."""
    q = k = v = jnp.ones((1, 64, 1, 4))
    g = jnp.full((1, 64, 1), -80.0)
    assert np.isfinite(np.asarray(chunked_linear_attention(q, k, v, g, 16))).all()


# ---------------------------------------------------------------------------------------------
# The streaming ring buffer


def test_streaming_ring_holds_sink_and_recent_over_many_commits():
    rng = np.random.default_rng(0)
    sink, recent = 3, 5
    ring = StreamingEntry.create(2, 1, 1, sink, recent, max_len=400, dtype=jnp.float32)
    committed = [[], []]  # every committed token's key value, per row
    lengths = jnp.zeros((2,), jnp.int32)
    advance = jax.jit(lambda ring, lengths, count: ring.advance(lengths, count))
    keep = jax.jit(lambda ring, lengths, offsets, count: ring.keep(lengths, offsets, count))
    held = jax.jit(lambda ring, lengths: ring.held(lengths))
    for step in range(40):
        n = int(rng.integers(1, 9)) if step else 12  # first: a prompt longer than the ring
        new = jnp.asarray(rng.normal(size=(2, n, 1, 1)), jnp.float32)
        pending = ring.with_pending(new, new * 2)
        if step % 2:
            count = rng.integers(0, n + 1, size=2)
            ring = advance(pending, lengths, jnp.asarray(count))
            picked = [list(range(c)) for c in count]
        else:  # an accepted tree path: increasing offsets
            count = rng.integers(0, n + 1, size=2)
            picked = [sorted(rng.choice(n, size=c, replace=False).tolist()) for c in count]
            offsets = np.zeros((2, n), np.int32)
            for row, p in enumerate(picked):
                offsets[row, :len(p)] = p
            ring = keep(pending, lengths, jnp.asarray(offsets), jnp.asarray(count))
        for row in range(2):
            committed[row] += [float(new[row, i, 0, 0]) for i in picked[row]]
        lengths = lengths + jnp.asarray(count, jnp.int32)
        positions, is_held = (np.asarray(a) for a in held(ring, lengths))
        ring_keys, ring_values = np.asarray(ring.keys), np.asarray(ring.values)
        for row in range(2):
            length = len(committed[row])
            assert int(lengths[row]) == length
            want = set(range(min(sink, length))) | set(range(max(sink, length - recent), length))
            got = {int(p) for p, h in zip(positions[row], is_held[row]) if h}
            assert got == want
            for slot in np.flatnonzero(is_held[row]):
                pos = int(positions[row, slot])
                assert ring_keys[row, slot, 0, 0] == np.float32(committed[row][pos])
                assert ring_values[row, slot, 0, 0] == np.float32(2 * committed[row][pos])
    assert ring.keys.shape[1] == sink + recent  # constant size


# ---------------------------------------------------------------------------------------------
# Whole models: caches, hybrids, speculative == autoregressive


def test_cache_bytes_duo_and_linear():
    full = KVCache.create(ModelConfig(**BASE), 1, 128).nbytes
    duo = ModelConfig(**BASE, attention=AttentionSpec(kinds=("duo",), sink_size=4, recent_size=8))
    assert KVCache.create(duo, 1, 128).nbytes <= 0.55 * full
    linear = ModelConfig(**BASE, attention=SPECS["linear"])
    assert KVCache.create(linear, 1, 16).nbytes == KVCache.create(linear, 1, 128).nbytes


@pytest.mark.parametrize("kinds", [("duo", "linear"), ("block_sparse", "full")])
def test_hybrid_model_decoding_matches_training_with_full_budget(kinds):
    spec = AttentionSpec(kinds=kinds, sink_size=3, recent_size=6, block_size=4, sink_blocks=1, local_blocks=2,
                         page_size=4, token_budget=64, chunk_size=4)
    model = Transformer(ModelConfig(**BASE, attention=spec), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(2), (2, 30), 0, BASE["vocab_size"])
    expected = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))(state, tokens)
    out = jax.jit(lambda state, tokens, lengths, cache: nnx.merge(graphdef, state).prefill(tokens, lengths, cache))(
        state, tokens[:, :9], jnp.array([9, 9]), KVCache.create(model.config, 2, 40))

    @jax.jit
    def step(state, token_b1, cache):
        out = nnx.merge(graphdef, state).forward(token_b1, cache=cache)
        return out.logits, out.cache.advance(jnp.ones((2,), jnp.int32))

    logits, cache = [out.logits], out.cache
    for t in range(9, 30):
        step_logits, cache = step(state, tokens[:, t:t + 1], cache)
        logits.append(step_logits)
    np.testing.assert_allclose(jnp.concatenate(logits, 1), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(SPECS)[1:])
def test_greedy_speculative_equals_autoregressive(kind):
    from jaxaccel.decoding import AutoregressiveDecoder
    from jaxaccel.decoding.speculative import SpeculativeDecoder
    from jaxaccel.heads import HeadsConfig, make_heads

    model = Transformer(config_for(kind), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)  # larger weights: varied greedy outputs
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, state))
    heads = make_heads(HeadsConfig(kind="medusa", num_heads=3), model.config, rngs=nnx.Rngs(1))
    heads.init_from_base(model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, BASE["vocab_size"], n).tolist() for n in (5, 17, 3)]
    ar = AutoregressiveDecoder(model).generate(prompts, max_new_tokens=24, stop_tokens=[7])
    spec = SpeculativeDecoder(model, heads).generate(prompts, max_new_tokens=24, stop_tokens=[7])
    np.testing.assert_array_equal(spec.tokens_bn, ar.tokens_bn)
    np.testing.assert_array_equal(spec.num_generated_b, ar.num_generated_b)
    assert len(set(map(tuple, ar.tokens_bn.tolist()))) == 3  # rows differ: not a vacuous match


# ---------------------------------------------------------------------------------------------
# Bad configurations


@pytest.mark.parametrize("spec_args,config_args,message", [
    (dict(kinds=("duo",), sparsity=1.5), {}, "sparsity must be in \\[0, 1\\]"),
    (dict(kinds=("duo",), sparsity=-0.1), {}, "sparsity must be in \\[0, 1\\]"),
    (dict(kinds=("duo",), sink_size=64, recent_size=100), {}, "streaming window .* larger than the cache"),
    (dict(kinds=("block_sparse",), block_size=4, local_blocks=2, page_size=4, token_budget=256), {},
     "token_budget of 256 tokens is larger"),
    (dict(kinds=("sliding",)), {}, "unknown attention kind"),
    (dict(kinds=("duo", "full", "linear")), {}, "name 3 layers, but the model has 2"),
    (dict(kinds=("duo",), retrieval_heads=((True,), (False,))), {}, "retrieval_heads must be"),
    (dict(kinds=("linear",), decay="cosine"), {}, "unknown linear attention decay"),
    (dict(kinds=("block_sparse",), page_size=32, block_size=4, local_blocks=2), {}, "page_size \\(32\\) must be at most"),
])
def test_bad_attention_configs_name_the_problem(spec_args, config_args, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**BASE, attention=AttentionSpec(**spec_args), **config_args)


def test_attention_spec_round_trips_through_a_dict():
    spec = AttentionSpec(kinds=("duo", "linear"), retrieval_heads=((True, False), (False, True)), sink_size=2,
                         recent_size=8)
    config = ModelConfig(**BASE, attention=spec)
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("kind", ["duo", "linear"])
def test_pallas_impl_matches_xla(kind):
    """attention_impl="pallas" routes the kinds' attention through the kernels (interpreted on CPU)."""
    config, layer, x_btd = layer_and_inputs(kind)
    pallas = make_attention(config.replace(attention_impl="pallas"), 0, rngs=nnx.Rngs(0))
    nnx.update(pallas, nnx.state(layer))
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    want, _ = layer(x_btd, context(positions))
    got, _ = pallas(x_btd, context(positions))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)



def test_linear_tpu_route_matches_xla(monkeypatch, as_if_on_tpu):
    """As on a TPU under "auto": the linear layer's chunked pass runs chunked_linear_attention_tpu
    (simulated by the TPU interpreter; TPU chunks are multiples of 8)."""
    from jax.experimental.pallas import tpu as pltpu

    import pallas_kernels.linear_attention_tpu as tpu_module

    config = ModelConfig(**BASE, attention=AttentionSpec(kinds=("linear",), chunk_size=8))
    layer = make_attention(config.replace(attention_impl="xla"), 0, rngs=nnx.Rngs(3))
    x_btd = jax.random.normal(jax.random.key(4), (2, T, config.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    want, _ = layer(x_btd, context(positions))
    tpu_layer = make_attention(config.replace(attention_impl="auto"), 0, rngs=nnx.Rngs(3))
    nnx.update(tpu_layer, nnx.state(layer))
    calls, kernel = [], tpu_module.chunked_linear_attention_tpu
    monkeypatch.setattr(tpu_module, "chunked_linear_attention_tpu", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    with pltpu.force_tpu_interpret_mode():
        got, _ = tpu_layer(x_btd, context(positions))
    assert calls, "the TPU route never called chunked_linear_attention_tpu"
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)

def test_block_sparse_gathered_decode_equals_masked_path(monkeypatch):
    """Decode / verify passes gather their keys; long passes mask the whole cache: same result."""
    from jaxaccel.layers import block_sparse

    config, layer, x_btd = layer_and_inputs("block_sparse", seed=5)
    gathered_prompt, entry, lengths = prefill(layer, config, x_btd, prompt=27, count_b=[27, 20])
    gathered, _, _ = decode_steps(layer, entry, lengths, x_btd[:, 27:31], 0)
    monkeypatch.setattr(block_sparse, "SPARSE_DECODE_MAX_NEW", 0)
    masked_prompt, entry, lengths = prefill(layer, config, x_btd, prompt=27, count_b=[27, 20])
    positions = lengths[:, None] + jnp.arange(4)
    masked, _ = run_layer(layer, x_btd[:, 27:31], positions, lengths, entry=entry)  # 4 new tokens, causal
    np.testing.assert_allclose(gathered_prompt, masked_prompt, atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(gathered, masked, atol=2e-4, rtol=1e-3)
