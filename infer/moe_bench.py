"""Benchmark: a MoE layer vs a dense MLP of the same active FLOPs, and routing balance in training.

    python -m infer.moe_bench [--out benchmarks/cpu/moe.json] [--plot benchmarks/cpu/moe_load.png]

1. Layer throughput (tokens/s, forward and forward+backward) on one batch of random tokens:
   the dense SwiGLU MLP of width k*f (the active FLOPs of top-k experts of width f), the MoE
   block with dropless dispatch (sort + ragged_dot, or sort + tiled batched matmul), and with
   capacity factors 1.0 and 1.25 (with the fraction of expert choices they dropped). One run,
   same weights and inputs for all. The router is included in every MoE row.
2. Routing balance: a short `train.pretrain --preset tiny --moe-experts E` run; its per-expert
   load (share of the top-k choices) at every step is plotted with the load-balancing loss.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel.config import ModelConfig, MoESpec
from jaxaccel.decoding.timing import median_seconds
from jaxaccel.files import write_json_atomically
from jaxaccel.layers.mlp import MLP
from jaxaccel.layers.moe import MoE, call_with_moe_stats



def layer_rows(d: int, f: int, experts: int, top_k: int, batch: int, seq: int, repeats: int, seed: int) -> list[dict]:
    """Throughput of the dense MLP and the MoE dispatch variants on one [batch, seq, d] input."""
    base = ModelConfig(vocab_size=256, hidden_size=d, intermediate_size=f, num_layers=1, num_heads=4, num_kv_heads=4)
    x_btd = jax.random.normal(jax.random.key(seed), (batch, seq, d), jnp.float32)
    tokens = batch * seq
    variants = [("dense MLP (width k*f)", MLP(base.replace(intermediate_size=top_k * f), rngs=nnx.Rngs(seed)), None)]
    for name, options in [("MoE dropless ragged_dot", dict(dispatch="dropless")),
                          ("MoE dropless tiled", dict(dispatch="dropless", grouped_matmul="tiled")),
                          ("MoE capacity 1.0", dict(dispatch="capacity", capacity_factor=1.0)),
                          ("MoE capacity 1.25", dict(dispatch="capacity", capacity_factor=1.25))]:
        spec = MoESpec(num_experts=experts, top_k=top_k, **options)
        variants.append((name, MoE(base.replace(moe=spec), rngs=nnx.Rngs(seed)), spec))

    rows = []
    for name, module, spec in variants:
        graphdef, state = nnx.split(module)

        def forward(state, x):
            return nnx.merge(graphdef, state)(x)

        def loss(state, x):
            return jnp.mean(forward(state, x) ** 2)

        def stats(state, x):
            return call_with_moe_stats(lambda m, x: m(x), nnx.merge(graphdef, state), x)[1]

        fwd = jax.jit(forward)
        fwd_bwd = jax.jit(jax.grad(loss))
        row = {"layer": name, "forward_s": median_seconds(lambda: fwd(state, x_btd), repeats),
               "forward_backward_s": median_seconds(lambda: fwd_bwd(state, x_btd), repeats)}
        row["forward_tokens_per_s"] = tokens / row["forward_s"]
        row["train_tokens_per_s"] = tokens / row["forward_backward_s"]
        if spec is not None:
            routed = jax.jit(stats)(state, x_btd)
            row["dropped_fraction"] = float(routed["dropped"])
            row["load_max_over_mean"] = float(routed["load"].max() * experts)
        rows.append(row)
    dense = rows[0]
    for row in rows:
        row["forward_vs_dense"] = row["forward_tokens_per_s"] / dense["forward_tokens_per_s"]
        row["train_vs_dense"] = row["train_tokens_per_s"] / dense["train_tokens_per_s"]
    return rows


def routing_over_training(experts: int, top_k: int, steps: int, run_dir: Path) -> list[dict]:
    """A tiny MoE pretraining run; its per-step router metrics."""
    from jaxaccel.training import read_metrics
    from train import pretrain as cli

    status = cli.main(["--preset", "tiny", "--out", str(run_dir), "--steps", str(steps), "--eval-every", "0",
                       "--checkpoint-every", str(steps), "--no-progress", "--no-export",
                       "--moe-experts", str(experts), "--moe-top-k", str(top_k)])
    if status != 0:
        raise RuntimeError(f"the MoE pretraining run failed (exit status {status})")
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "moe_load_0" in r]


def plot_routing(records: list[dict], experts: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_load, ax_loss) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for e in range(experts):
        ax_load.plot(steps, [r[f"moe_load_{e}"] for r in records], label=f"expert {e}")
    ax_load.axhline(1 / experts, color="black", linestyle="--", linewidth=1, label="balanced")
    ax_load.set_ylabel("share of top-k choices\n(mean over MoE layers)")
    ax_load.legend(ncol=3, fontsize=8)
    ax_load.set_title("Routing balance during tiny MoE pretraining")
    ax_loss.plot(steps, [r["moe_load_balance"] for r in records], label="load-balancing loss (1 = balanced)")
    ax_loss.plot(steps, [r["loss"] for r in records], label="next-token NLL")
    ax_loss.set_xlabel("step")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.moe_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/cpu/moe.json"))
    p.add_argument("--plot", type=Path, default=Path("benchmarks/cpu/moe_load.png"))
    p.add_argument("--hidden", type=int, default=256, help="d")
    p.add_argument("--expert-width", type=int, default=512, help="f, one expert's intermediate size")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=150, help="steps of the routing-balance pretraining run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rows = layer_rows(args.hidden, args.expert_width, args.experts, args.top_k, args.batch, args.seq,
                      args.repeats, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        records = routing_over_training(args.experts, args.top_k, args.train_steps, Path(tmp) / "run")
    plot_routing(records, args.experts, args.plot)
    first, last = records[0], records[-1]
    report = {
        "device": str(jax.devices()[0]),
        "note": "one run on a shared 2-core CPU; ratios within this run are what to compare",
        "layer": {"hidden": args.hidden, "expert_width": args.expert_width, "experts": args.experts,
                  "top_k": args.top_k, "tokens": args.batch * args.seq, "dense_width": args.top_k * args.expert_width},
        "throughput": rows,
        "routing": {"preset": "tiny", "experts": args.experts, "top_k": args.top_k, "steps": args.train_steps,
                    "plot": str(args.plot),
                    "first": {k: v for k, v in first.items() if k.startswith(("moe_", "loss", "step"))},
                    "last": {k: v for k, v in last.items() if k.startswith(("moe_", "loss", "step"))}},
    }
    write_json_atomically(args.out, report)
    print(f"{'layer':24} {'fwd tok/s':>11} {'x dense':>8} {'fwd+bwd tok/s':>14} {'x dense':>8} {'dropped':>8}")
    for r in rows:
        dropped = f"{r['dropped_fraction']:.1%}" if "dropped_fraction" in r else "-"
        print(f"{r['layer']:24} {r['forward_tokens_per_s']:11.0f} {r['forward_vs_dense']:8.2f} "
              f"{r['train_tokens_per_s']:14.0f} {r['train_vs_dense']:8.2f} {dropped:>8}")
    print(f"routing: load max/mean {first['moe_load_max']:.2f} at step {first['step']} -> "
          f"{last['moe_load_max']:.2f} at step {last['step']}; plot {args.plot}; report {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
