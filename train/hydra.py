"""Train Hydra / Hydra++ heads on cached base features (jaxaccel.training.hydra_features); the base never runs.

    python -m train.features --model smollm2-135m-instruct --responses RESPONSES --out FEATURES
    python -m train.hydra --model smollm2-135m-instruct --features FEATURES --out HEADS_DIR \\
        --draft-vocab 8192 --heads 4 --prefix-layer --steps 1000

The heads read the base's cached final hidden states (what the Hydra drafter reads at inference)
and are distilled from the base's next-token distribution over the draft vocabulary, on its own
greedy answers. The base's weights are read for its embedding table and LM head only. The draft
vocabulary (the --draft-vocab most frequent answer tokens of the training sequences; 0: the whole
vocabulary) is fixed at the run's first start (HEADS_DIR/draft_vocab.npy). Checkpoints go to
HEADS_DIR/checkpoints (rerun the same command to resume; --steps may grow), metrics to
HEADS_DIR/metrics.jsonl; at the end the heads are written to HEADS_DIR (heads.safetensors,
heads_config.json: `--heads HEADS_DIR` in infer.generate and infer.spec_bench) and their per-head
top-1 agreement with the base's greedy answers on held-out sequences, with the mean accepted
chain length, to HEADS_DIR/eval.json. Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.common import Progress, guarded_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.hydra", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model directory or model name")
    p.add_argument("--features", type=Path, required=True, help="train.features output directory")
    p.add_argument("--out", type=Path, required=True, help="heads directory (created; rerun to resume)")
    p.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary size N (0: the whole vocabulary)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)  # guarded_main's flag
    arch = p.add_argument_group("heads")
    arch.add_argument("--heads", "--num-heads", dest="num_heads", type=int, default=4,
                      help="number of heads K (the draft depth)")
    arch.add_argument("--num-blocks", type=int, default=1, help="residual SiLU blocks per head")
    arch.add_argument("--prefix-layer", action="store_true",
                      help="Hydra++: a causal decoder layer over the base's states")
    arch.add_argument("--share-lm-head", action="store_true",
                      help="the base's frozen LM head (its columns of the draft vocabulary) instead of trained copies")
    hp = p.add_argument_group("training")
    for flag, typ, default, what in [
        ("--steps", int, 1000, "optimizer updates in total"),
        ("--batch-size", int, 8, "windows per update"),
        ("--seq-len", int, 128, "positions per window"),
        ("--lr", float, 1e-3, "peak learning rate"),
        ("--warmup-steps", int, 50, "linear warmup steps"),
        ("--weight-decay", float, 0.0, "AdamW weight decay"),
        ("--depth-decay", float, 0.8, "head k's loss weighs DECAY ** k"),
        ("--seed", int, 0, "init and data-order seed"),
        ("--holdout-mod", int, 32, "hold out the sequences whose key hashes to 0 mod this"),
        ("--checkpoint-every", int, 50, "save a checkpoint every K steps"),
        ("--keep-checkpoints", int, 2, "keep the newest N checkpoints"),
    ]:
        hp.add_argument(flag, type=typ, default=default, help=what)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    import jax

    from jaxaccel.checkpoint import TrainCheckpointer, restore_or_init
    from jaxaccel.files import write_json_atomically
    from jaxaccel.heads.config import HeadsConfig
    from jaxaccel.heads.io import base_fingerprint, save_heads
    from jaxaccel.hf import load_hf
    from jaxaccel.models import resolve_model
    from jaxaccel.training import MetricsLogger, loop
    from jaxaccel.training.eagle3 import FeatureSet, fixed_draft_vocab
    from jaxaccel.training.features import feature_layers
    from jaxaccel.training.hydra_features import HydraFeaturesConfig, HydraFeatureTraining

    args.model = resolve_model(args.model)
    base = load_hf(args.model)
    vocab_size = base.config.vocab_size
    if not 0 <= args.draft_vocab <= vocab_size:
        raise ValueError(f"--draft-vocab must be in 0..{vocab_size} (the base's vocabulary; 0: all of it), "
                         f"got {args.draft_vocab}")
    if not 1 <= args.num_heads <= args.seq_len - 2:
        raise ValueError(f"--heads must be in 1..{args.seq_len - 2} (head k drafts k + 2 places ahead inside a "
                         f"--seq-len {args.seq_len} window), got {args.num_heads}")
    heads_config = HeadsConfig(kind="hydra", num_heads=args.num_heads, num_blocks=args.num_blocks,
                               prefix_layer=args.prefix_layer, share_lm_head=args.share_lm_head,
                               draft_vocab_size=args.draft_vocab)
    config = HydraFeaturesConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, depth_decay=args.depth_decay,
        seed=args.seed, holdout_mod=args.holdout_mod, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints)
    fingerprint = base_fingerprint(args.model)
    features = FeatureSet(args.features, fingerprint, feature_layers(base.config.num_layers), config.holdout_mod)
    if args.draft_vocab:
        d2t, vocab = fixed_draft_vocab(args.out, features, args.draft_vocab, vocab_size)
    else:
        d2t, vocab = None, {"size": vocab_size, "sha256": None, "coverage_train": 1.0, "coverage_heldout": 1.0}
    training = HydraFeatureTraining(base, heads_config, config, features, d2t)
    metadata = {"heads": heads_config.to_dict(), "train": config.to_dict(), "base": fingerprint,
                "draft_vocab_sha256": vocab["sha256"]}
    name = "hydra++" if args.prefix_layer else "hydra"
    with TrainCheckpointer(args.out / "checkpoints", metadata=metadata,
                           ignore_keys=[f"train.{k}" for k in config.RESUMABLE],
                           max_to_keep=config.keep_checkpoints, save_interval_steps=config.checkpoint_every) as ckpt:
        state, start = restore_or_init(ckpt, jax.jit(training.init_state))
        if start > config.steps:
            raise ValueError(f"{ckpt.directory} holds step {start}, past --steps {config.steps}")
        n_params = sum(v.size for v in jax.tree.leaves(state["params"]))
        n_tokens = sum(end - start_ for _, start_, end, _ in features.train_seqs)
        print(f"{name}: {n_params / 1e6:.2f}M head params, {args.num_heads} heads, draft vocabulary {vocab['size']} "
              f"(covers {vocab['coverage_train']:.3f} of the training answers, {vocab['coverage_heldout']:.3f} "
              f"held out), {len(features.train_seqs)} training / {len(features.heldout_seqs)} held-out sequences "
              f"({n_tokens / 1e6:.2f}M tokens) in {len(features.shards)} shards; "
              f"{f'resuming from step {start}' if start else 'starting'}", file=sys.stderr)
        progress = Progress(start, config.steps, config.batch_size * config.seq_len, enabled=not args.no_progress)
        with MetricsLogger(args.out, start_step=start) as metrics:
            def on_metrics(step, values):
                metrics.log(step, {**values, **progress(step, values)})

            try:
                state = loop.train_loop(state, training.step, training.batch, start_step=start, num_steps=config.steps,
                                        on_metrics=on_metrics, checkpointer=ckpt,
                                        checkpoint_every=config.checkpoint_every)
            finally:
                progress.close()
            save_heads(training.heads(state["params"]), args.out, args.model, fingerprint)
            if not args.no_eval:
                result = {"kind": "hydra", "prefix_layer": args.prefix_layer, "step": int(state["step"]),
                          "draft_vocab": vocab, "features": [str(args.features / n) for n in features.names],
                          **training.evaluate(state["params"])}
                write_json_atomically(args.out / "eval.json", result)
                metrics.log(result["step"], {f"heldout_top1_{d['depth']}": d["top1"] for d in result["depths"]})
                top1 = " ".join(f"{d['top1']:.3f}" for d in result["depths"])
                print(f"held out: top-1 agreement by head {top1}; mean accepted (chain of {args.num_heads}) "
                      f"{result['mean_accepted_chain']:.2f}; heads written to {args.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2."""
    return guarded_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
