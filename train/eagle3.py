"""Train an EAGLE-3 head on cached base features (jaxaccel.training.eagle3); the base never runs.

    python -m train.features --model smollm2-135m-instruct --responses RESPONSES --out FEATURES
    python -m train.eagle3 --model smollm2-135m-instruct --features FEATURES --out HEADS_DIR \\
        --draft-vocab 8192 --depth 3 --steps 1000

The base's weights are read for its embedding table and LM-head rows only. The draft vocabulary
(the --draft-vocab most frequent answer tokens of the training sequences) is fixed at the run's
first start (HEADS_DIR/draft_vocab.npy). Checkpoints go to HEADS_DIR/checkpoints (rerun the same
command to resume; --steps may grow), metrics to HEADS_DIR/metrics.jsonl; at the end the head is
written to HEADS_DIR (heads.safetensors, heads_config.json) and its per-depth top-1 agreement
with the base's greedy answers on held-out sequences to HEADS_DIR/eval.json. Bad input exits
with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys

from train import feature_heads
from train.common import guarded_main


def parse_args(argv=None) -> argparse.Namespace:
    p = feature_heads.parser("python -m train.eagle3", __doc__)
    p.add_argument("--depth", type=int, default=3, help="draft steps unrolled in training (training-time test)")
    feature_heads.add_output_flags(p)
    p.add_argument("--eval-vocab", default="", help="also evaluate the head cut to these draft vocabulary sizes "
                   "(comma-separated, each below --draft-vocab): eval.json's by_draft_vocab")
    p.add_argument("--export-vocab", type=int, default=None,
                   help="write the head cut to its N most frequent draft tokens (default: all of them)")
    feature_heads.add_training_flags(p, "step s's loss weighs DECAY ** s")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from jaxaccel.heads.config import HeadsConfig
    from jaxaccel.heads.eagle3 import truncate_draft_vocab
    from jaxaccel.training.eagle3 import Eagle3Training

    base = feature_heads.load_base(args)
    if not 0 <= args.draft_vocab <= base.config.vocab_size:
        raise ValueError(f"--draft-vocab must be in 0..{base.config.vocab_size}, got {args.draft_vocab}")
    size = args.draft_vocab or base.config.vocab_size
    eval_sizes = [int(n) for n in args.eval_vocab.split(",") if n.strip()]
    for n in eval_sizes + ([args.export_vocab] if args.export_vocab is not None else []):
        if not 0 < n <= size:
            raise ValueError(f"--eval-vocab / --export-vocab sizes must be in 1..{size} (the draft vocabulary), got {n}")
    heads_config = HeadsConfig(kind="eagle3", num_heads=args.depth, draft_vocab_size=size)

    def evaluate(training, params):
        return {**training.evaluate(params, args.export_vocab),
                "by_draft_vocab": [training.evaluate(params, n) for n in eval_sizes]}

    def export(heads):
        return heads if args.export_vocab is None else truncate_draft_vocab(heads, args.export_vocab)

    return feature_heads.run(
        args, base, heads_config,
        lambda config, features, d2t: Eagle3Training(base, heads_config, config, features, d2t),
        label="eagle3", record={"kind": "eagle3"}, evaluate=evaluate, export=export)


def main(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2."""
    return guarded_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
