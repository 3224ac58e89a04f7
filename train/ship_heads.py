"""Ship trained draft heads beside a named model, for `--heads auto`.

    python -m train.ship_heads --model smollm2-135m-instruct --heads eagle3=DIR --heads hydra=DIR \\
        --commands COMMANDS.txt [--store-dtype bfloat16]

Replaces jaxaccel/pretrained/NAME with heads/KIND for each KIND=DIR (heads.safetensors,
heads_config.json, eval.json, tree.json), MANIFEST.json (every file's SHA-256, the commands that
made them: COMMANDS.txt's lines, then this command) and README.md, all at once, within the
repository's 48 MB budget. Each DIR must hold heads distilled from NAME's weights. A DIR may be
the shipped heads themselves (reshipping them in --store-dtype). Bad input exits with status 2
and a one-line message, and changes nothing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from train.common import guarded_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.ship_heads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a jaxaccel.models name (its shipped directory is replaced)")
    p.add_argument("--heads", action="append", required=True, metavar="KIND=DIR",
                   help="a heads directory shipped as heads/KIND (repeatable; the order is --heads auto's)")
    p.add_argument("--commands", type=Path, required=True,
                   help="text file: the commands that made the heads, one per line, in order")
    p.add_argument("--store-dtype", default=None, help="store the weights in this dtype (e.g. bfloat16)")
    p.add_argument("--title", default=None, help="the README's title (default: Draft heads for NAME)")
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)  # guarded_main's flag
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return args


def parse_heads(specs: list[str]) -> dict[str, Path]:
    """KIND=DIR pairs, each kind once."""
    heads = {}
    for spec in specs:
        kind, sep, path = spec.partition("=")
        if not (sep and kind and path):
            raise ValueError(f"--heads takes KIND=DIR, got {spec!r}")
        if kind in heads:
            raise ValueError(f"--heads names the kind {kind!r} twice")
        heads[kind] = Path(path)
    return heads


def run(args: argparse.Namespace) -> int:
    from jaxaccel.heads.io import check_base
    from jaxaccel.models import entry, resolve_model
    from jaxaccel.pretrained.shipped_heads import PRETRAINED_DIR, ship_heads

    entry(args.model)  # a registry name, or the error that lists them
    heads = parse_heads(args.heads)
    model_dir = resolve_model(args.model)
    for heads_dir in heads.values():
        check_base(heads_dir, model_dir)
    commands = [line for line in args.commands.read_text().splitlines() if line.strip()]
    commands.append(shlex.join(["python", "-m", "train.ship_heads", *args.argv]))
    manifest = ship_heads(heads, PRETRAINED_DIR / args.model, commands, title=args.title or f"Draft heads for {args.model}",
                          store_dtype=args.store_dtype)
    print(f"shipped {', '.join(heads)} to {PRETRAINED_DIR / args.model}: {len(manifest['files'])} files, "
          f"{manifest['total_bytes'] / 1e6:.1f} MB")
    return 0


def main(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2."""
    return guarded_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
