"""Cache the base model's features over its own answers (see jaxaccel/training/features.py).

    python -m train.features --model smollm2-135m-instruct --responses runs/smollm2/responses \\
        --out runs/smollm2/features

One feature shard per responses shard (`shard-00007.jsonl` -> `features-00007/`), each renamed
into place when complete: rerun the same command to go on (also while train.responses is still
writing shards: the shards present are done, the rest left for the next run). The responses must
come from the same model (its fingerprint is checked). Bad input exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.common import guarded_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or model name")
    p.add_argument("--responses", type=Path, required=True, help="train.responses output directory")
    p.add_argument("--out", type=Path, required=True, help="feature shard directory (rerun to resume)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)  # guarded_main's flag
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from jaxaccel.heads.io import base_fingerprint
    from jaxaccel.hf import load_hf
    from jaxaccel.models import resolve_model
    from jaxaccel.training.features import FeatureExtractor, write_shard

    args.model = resolve_model(args.model)  # a name is prepared on first use

    config_file = args.responses / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{args.responses} is not a train.responses directory (no config.json)")
    fingerprint = base_fingerprint(args.model)
    if json.loads(config_file.read_text())["settings"]["base"] != fingerprint:
        raise ValueError(f"the responses in {args.responses} were made by another model than {args.model}")
    shards = sorted(args.responses.glob("shard-*.jsonl"))
    todo = [s for s in shards if not (args.out / s.stem.replace("shard", "features")).is_dir()]
    extractor = FeatureExtractor(load_hf(args.model))
    for shard in tqdm(todo, unit="shard", disable=args.no_progress):
        records = [json.loads(line) for line in shard.read_text().splitlines()]
        write_shard(args.out / shard.stem.replace("shard", "features"), records, extractor, fingerprint,
                    batch_size=args.batch_size)
    print(f"{len(todo)} feature shards written, {len(shards) - len(todo)} already there, under {args.out} "
          f"(layers {list(extractor.layers)})", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2."""
    return guarded_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
