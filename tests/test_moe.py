"""MoE blocks: dropless and capacity dispatch against a per-token reference loop, expert
parallelism on 8 emulated devices, MoE pretraining, speculative decoding, bad configs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxaccel import ModelConfig, Transformer
from jaxaccel.config import MoESpec
from jaxaccel.layers.moe import MoE, capacity
from jaxaccel.sharding import make_mesh, shard_model
from jaxaccel.training.losses import moe_aux_loss, next_token_nll_and_moe_stats

BASE = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=128)


def moe_block(seed, **spec):
    """A MoE block with random weights, router scaled up so that the top-k choice is decisive."""
    config = ModelConfig(**BASE, moe=MoESpec(**spec))
    graphdef, state = nnx.split(MoE(config, rngs=nnx.Rngs(seed)))
    keys = iter(jax.random.split(jax.random.key(seed + 100), 64))
    state = jax.tree.map(lambda v: 0.3 * jax.random.normal(next(keys), v.shape, v.dtype), state)
    return nnx.merge(graphdef, state)


def params_of(block):
    """float64 numpy copies of the block's weights, by name."""
    flat = nnx.to_flat_state(nnx.state(block))
    return {".".join(map(str, p)): np.asarray(v.get_value(), np.float64) for p, v in flat}


def silu(x):
    return x / (1 + np.exp(-x))


def reference_moe(block, x_nd, capacity_rows=None):
    """Per-token loop in float64: route, run the chosen experts one by one, add the shared expert.
    With `capacity_rows`, choices are admitted first-choice-first in token order while their
    expert has room; the others are dropped. Returns (y [n, d], number of dropped choices)."""
    spec, w = block.spec, params_of(block)
    n, k = x_nd.shape[0], spec.top_k
    choices = []
    for t in range(n):
        logits = x_nd[t] @ w["gate.kernel"]
        if spec.router == "softmax":
            scores = np.exp(logits - logits.max())
            scores /= scores.sum()
        else:
            scores = 1 / (1 + np.exp(-logits))
        top = np.argsort(-scores)[:k]
        weights = scores[top] / (scores[top].sum() if spec.normalize_top_k else 1.0)
        choices.append(list(zip(top, weights)))
    admitted, used = set(), [0] * spec.num_experts
    for slot in range(k):
        for t in range(n):
            e = choices[t][slot][0]
            if capacity_rows is None or used[e] < capacity_rows:
                admitted.add((t, slot))
                used[e] += 1
    y = np.zeros_like(x_nd)
    for t in range(n):
        for slot, (e, weight) in enumerate(choices[t]):
            if (t, slot) in admitted:
                h = silu(x_nd[t] @ w["experts.gate_proj"][e]) * (x_nd[t] @ w["experts.up_proj"][e])
                y[t] += weight * (h @ w["experts.down_proj"][e])
        if spec.shared_intermediate_size:
            h = silu(x_nd[t] @ w["shared_expert.gate_proj.kernel"]) * (x_nd[t] @ w["shared_expert.up_proj.kernel"])
            shared = h @ w["shared_expert.down_proj.kernel"]
            if spec.shared_expert_gate:
                shared *= 1 / (1 + np.exp(-(x_nd[t] @ w["shared_expert_gate.kernel"])))
            y[t] += shared
    return y, n * k - len(admitted)


def random_x(seed, shape=(3, 7, 32)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# A block's pass compiled whole: eager, every op compiles on its own.
run_block = nnx.jit(lambda block, x_btd: block(x_btd))


@pytest.mark.parametrize("spec", [
    dict(num_experts=4, top_k=2),
    dict(num_experts=6, top_k=3, router="sigmoid", shared_intermediate_size=24, shared_expert_gate=True),
    dict(num_experts=5, top_k=1, normalize_top_k=False, shared_intermediate_size=16),
    dict(num_experts=6, top_k=2, grouped_matmul="tiled", tile_rows=4),  # 21 rows: partial and empty tiles
    dict(num_experts=4, top_k=2, grouped_matmul="pallas"),  # the Pallas kernel (interpreter on CPU)
])
def test_dropless_equals_reference_loop(spec):
    block = moe_block(len(spec), **spec)
    x_btd = random_x(spec["num_experts"])
    got = np.asarray(run_block(block, x_btd)).reshape(-1, 32)
    want, dropped = reference_moe(block, np.asarray(x_btd, np.float64).reshape(-1, 32))
    assert dropped == 0
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_capacity_path_equals_reference_and_counts_drops():
    spec = dict(num_experts=4, top_k=2, dispatch="capacity", shared_intermediate_size=16)
    x_btd = random_x(11)
    x_nd = np.asarray(x_btd, np.float64).reshape(-1, 32)
    n = x_nd.shape[0]

    # Ample capacity (every expert can take every token): the dropless result, nothing dropped.
    ample = moe_block(3, **spec, capacity_factor=2.0)
    assert capacity(n, 2, 4, 2.0) >= n
    want, dropped = reference_moe(ample, x_nd)
    assert dropped == 0
    np.testing.assert_allclose(np.asarray(run_block(ample, x_btd)).reshape(n, 32), want, atol=2e-5, rtol=1e-4)
    dropless = moe_block(3, **{**spec, "dispatch": "dropless"})
    np.testing.assert_allclose(np.asarray(run_block(dropless, x_btd)), np.asarray(run_block(ample, x_btd)), atol=1e-5, rtol=0)

    # Tight capacity: the same choices as the reference are dropped, and the drops are reported.
    tight = moe_block(3, **spec, capacity_factor=0.5)
    rows = capacity(n, 2, 4, 0.5)
    want, dropped = reference_moe(tight, x_nd, capacity_rows=rows)
    assert dropped >= n * 2 - 4 * rows > 0
    np.testing.assert_allclose(np.asarray(run_block(tight, x_btd)).reshape(n, 32), want, atol=2e-5, rtol=1e-4)
    model = Transformer(ModelConfig(**BASE, moe=MoESpec(**spec, capacity_factor=0.5)), rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 50, (2, 9)).astype(np.int32)
    _, stats = nnx.jit(next_token_nll_and_moe_stats)(model, tokens)
    assert 0.3 < float(stats["dropped"]) < 1  # a factor of 0.5 must drop at least half the choices


def test_dropless_gradients_equal_dense_buffers():
    """The gradients of the dropless grouped matmuls (ragged_dot, tiled, the Pallas kernel) equal
    those of the ample-capacity einsum path."""
    x_btd = random_x(5, (2, 6, 32))
    target = random_x(6, (2, 6, 32))

    def loss(block, x):
        return jnp.sum((block(x) - target) ** 2)

    grads = {}
    for name, options in [("capacity", dict(dispatch="capacity", capacity_factor=2.0)), ("ragged_dot", {}),
                          ("tiled", dict(grouped_matmul="tiled", tile_rows=4)),
                          ("pallas", dict(grouped_matmul="pallas"))]:
        block = moe_block(4, num_experts=4, top_k=2, **options)
        grads[name] = jax.tree.leaves(nnx.jit(nnx.grad(loss, argnums=(0, 1)))(block, x_btd))
    assert len(grads["capacity"]) > 3
    for name in ("ragged_dot", "tiled", "pallas"):
        assert len(grads[name]) == len(grads["capacity"])
        for a, b in zip(grads[name], grads["capacity"]):
            # float32 sums of terms up to |b|.max() (hundreds here) in another order: the rounding
            # scales with the largest gradient, not with each element (a fixed 1e-5 failed at 3.9e-5)
            scale = float(np.abs(np.asarray(b)).max())
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6 * scale + 1e-6, rtol=1e-4,
                                       err_msg=name)


# ---------------------------------------------------------------------------------------------
# expert parallelism


def test_expert_parallel_equals_single_device():
    """Mesh data=2, expert=4 on 8 emulated devices: 8 experts (2 per device), top-3, a shared
    expert; logits, loss (NLL + aux losses), router statistics and gradients equal one device."""
    config = ModelConfig(**BASE, moe=MoESpec(num_experts=8, top_k=3, shared_intermediate_size=16, dense_layers=(0,)))
    model = Transformer(config, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(1).integers(0, 50, (8, 12)).astype(np.int32)
    graphdef, state = nnx.split(model)

    def loss_fn(state, tokens_bt1):
        model = nnx.merge(graphdef, state)
        nll_bt, stats = next_token_nll_and_moe_stats(model, tokens_bt1)
        return nll_bt.mean() + moe_aux_loss(stats, config), stats

    def run(state, tokens_bt1):
        logits = nnx.merge(graphdef, state)(tokens_bt1[:, :-1])
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state, tokens_bt1)
        return logits, loss, stats, grads

    single = jax.jit(run)(state, tokens)
    mesh = make_mesh("data=2,expert=4")
    sharded_state = nnx.state(shard_model(model, mesh))
    expert_kernel = sharded_state["layers"][1]["mlp"]["experts"]["up_proj"].get_value()
    assert expert_kernel.sharding.spec[0] == "expert"
    with jax.set_mesh(mesh):
        compiled = jax.jit(run).lower(sharded_state, tokens).compile()
        assert "all-to-all" in compiled.as_text()
        parallel = compiled(sharded_state, tokens)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(parallel)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# training and decoding


def test_moe_pretrain_learns_logs_router_stats_and_exports(tmp_path):
    from jaxaccel import load_hf
    from jaxaccel.training import read_metrics
    from train import pretrain as cli

    out = tmp_path / "run"
    assert cli.main(["--preset", "tiny", "--out", str(out), "--steps", "30", "--eval-every", "0",
                     "--checkpoint-every", "30", "--test-windows", "4", "--no-progress", "--mesh", "data=2,expert=4",
                     "--moe-experts", "4", "--moe-top-k", "2"]) == 0
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert np.mean([r["loss"] for r in records[-5:]]) < records[0]["loss"] - 0.8
    for r in records:
        loads = [r[f"moe_load_{e}"] for e in range(4)]
        assert abs(sum(loads) - 1) < 1e-5 and r["moe_load_balance"] >= 1 - 1e-5 and r["moe_z_loss"] > 0
        assert r["moe_dropped"] == 0 and r["moe_load_max"] == pytest.approx(4 * max(loads))
    config = json.loads((out / "model/config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4
    model = load_hf(out / "model")
    assert model.config.moe.num_experts == 4 and model.config.moe.top_k == 2


def test_greedy_speculative_equals_autoregressive_on_moe():
    from test_speculative import STOP, heads_for

    from jaxaccel.decoding import AutoregressiveDecoder
    from jaxaccel.decoding.speculative import SpeculativeDecoder

    config = ModelConfig(**BASE, moe=MoESpec(num_experts=4, top_k=2, shared_intermediate_size=16))
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    base = nnx.merge(graphdef, jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, state))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50, n).tolist() for n in (5, 11, 3, 8, 1)]
    want = AutoregressiveDecoder(base).generate(prompts, max_new_tokens=24, stop_tokens=[STOP])
    for kind in ("medusa", "eagle"):
        got = SpeculativeDecoder(base, heads_for(base, kind)).generate(prompts, max_new_tokens=24, stop_tokens=[STOP])
        assert got.sequences() == want.sequences(), kind
        assert got.mean_accepted_tokens() > 1.0


# ---------------------------------------------------------------------------------------------
# bad configs


@pytest.mark.parametrize("fields,message", [
    (dict(num_experts=4, top_k=5), r"top_k must be in 1..num_experts \(4\), got 5"),
    (dict(num_experts=0), "num_experts must be > 0, got 0"),
    (dict(router="relu"), "unknown moe router 'relu'"),
    (dict(dispatch="ragged"), "unknown moe dispatch 'ragged'"),
    (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
    (dict(shared_expert_gate=True), "shared_expert_gate needs a shared expert"),
    (dict(layer_step=0), "layer_step must be > 0"),
    (dict(grouped_matmul="megablox"), "unknown moe grouped_matmul 'megablox'"),
])
def test_bad_moe_spec(fields, message):
    with pytest.raises(ValueError, match=message):
        MoESpec(**fields)


def test_bad_moe_layers_and_flags(capsys):
    with pytest.raises(ValueError, match=r"dense_layers \[5\] are not layers of a 2-layer model"):
        ModelConfig(**BASE, moe=MoESpec(dense_layers=(5,)))
    with pytest.raises(ValueError, match="makes no layer of this 2-layer model MoE"):
        ModelConfig(**BASE, moe=MoESpec(layer_step=3))
    config = ModelConfig(**BASE, moe={"num_experts": 4, "top_k": 1, "dense_layers": [0]})  # from JSON
    assert config.moe == MoESpec(num_experts=4, top_k=1, dense_layers=(0,))
    assert [config.is_moe_layer(i) for i in range(2)] == [False, True]
    assert config.num_params() == sum(v.size for v in jax.tree.leaves(
        nnx.state(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)))

    from train import pretrain as cli
    from train.common import EXIT_BAD_INPUT

    assert cli.main(["--preset", "tiny", "--out", "/nonexistent/never", "--moe-experts", "2", "--moe-top-k", "3"]) \
        == EXIT_BAD_INPUT
    assert "top_k must be in 1..num_experts (2), got 3" in capsys.readouterr().err
