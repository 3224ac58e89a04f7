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

from train import feature_heads
from train.common import guarded_main


def parse_args(argv=None) -> argparse.Namespace:
    p = feature_heads.parser("python -m train.hydra", __doc__)
    feature_heads.add_output_flags(p)
    arch = p.add_argument_group("heads")
    arch.add_argument("--heads", "--num-heads", dest="num_heads", type=int, default=4,
                      help="number of heads K (the draft depth)")
    arch.add_argument("--num-blocks", type=int, default=1, help="residual SiLU blocks per head")
    arch.add_argument("--prefix-layer", action="store_true",
                      help="Hydra++: a causal decoder layer over the base's states")
    arch.add_argument("--share-lm-head", action="store_true",
                      help="the base's frozen LM head (its columns of the draft vocabulary) instead of trained copies")
    feature_heads.add_training_flags(p, "head k's loss weighs DECAY ** k")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from jaxaccel.heads.config import HeadsConfig
    from jaxaccel.training.hydra_features import HydraFeatureTraining

    base = feature_heads.load_base(args)
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
    return feature_heads.run(
        args, base, heads_config,
        lambda config, features, d2t: HydraFeatureTraining(base, heads_config, config, features, d2t),
        label="hydra++" if args.prefix_layer else "hydra", summary=f"{args.num_heads} heads, ",
        record={"kind": "hydra", "prefix_layer": args.prefix_layer}, per="head", written="heads")


def main(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2."""
    return guarded_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
