"""Find DuoAttention's retrieval heads of a model and write it as a duo model directory:

    python -m train.retrieval_heads --base MODEL_DIR --out MODEL_DIR2 [--steps N] [--sparsity 0.5]

Gates per (layer, KV head) are optimised on passkey sequences built from the corpus's train split
(jaxaccel.passkey, jaxaccel.training.gates); the `--sparsity` fraction of heads with the lowest
gates become streaming heads (sink + recent tokens). MODEL_DIR2 holds the same weights, a
config.json that loads as duo, the tokenizer, and gates.json (gates, chosen heads, loss history).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.common import guarded_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.retrieval_heads", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="model directory (full attention)")
    p.add_argument("--out", required=True, help="output model directory (duo)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of KV heads that stream (default 0.5)")
    p.add_argument("--sink-size", type=int, default=16)
    p.add_argument("--recent-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=None, help="passkey sequence length (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--l1", type=float, default=0.05, help="weight of the L1 penalty on the gates")
    p.add_argument("--filler-bytes", type=int, default=2_000_000, help="corpus text (train split) for the filler")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(distributed=False)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from jaxaccel.data import files_within_bytes, load_texts, load_tokenizer, tokenize_documents
    from jaxaccel.files import write_json_atomically
    from jaxaccel.hf import load_hf, save_hf
    from jaxaccel.passkey import passkey_batch
    from jaxaccel.training.gates import GateConfig, as_duo, optimise_gates, retrieval_heads_from_gates

    config = GateConfig(steps=args.steps, lr=args.lr, l1=args.l1, sparsity=args.sparsity, sink_size=args.sink_size,
                        recent_size=args.recent_size)
    model = load_hf(args.base)
    tokenizer = load_tokenizer(args.base)
    seq_len = args.seq_len or model.config.max_position_embeddings
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's context "
                         f"({model.config.max_position_embeddings} positions)")
    filler = tokenize_documents(tokenizer, files_within_bytes(load_texts("train"), args.filler_bytes))

    def batches(step):
        batch = passkey_batch(tokenizer, filler, args.batch_size, seq_len, seed=args.seed * 100_003 + step)
        return batch.tokens_bt, batch.answer_start - 1

    history = []

    def on_step(step, metrics):
        history.append({"step": step, **metrics})
        if step % 10 == 0 or step == config.steps - 1:
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), file=sys.stderr)

    gates = optimise_gates(model, batches, config, on_step)
    retrieval = retrieval_heads_from_gates(gates, config.sparsity)
    out = Path(args.out)
    save_hf(as_duo(model, retrieval, config.sink_size, config.recent_size), out, tokenizer)
    write_json_atomically(out / "gates.json", {
        "base": str(Path(args.base).resolve()), "gates": gates.tolist(), "retrieval_heads": retrieval,
        "sparsity": config.sparsity, "steps": config.steps, "history": history})
    print(json.dumps({"out": str(out), "streaming_heads": sum(not r for row in retrieval for r in row),
                      "heads": gates.size}))
    return 0


def main(argv=None) -> int:
    return guarded_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
