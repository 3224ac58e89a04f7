"""The speculative-decoding flags the infer programs share: --heads, --drafter, --tree.

Single (generate, chat): one decoder, heads and a drafter composing into one tree. Repeatable
(bench, spec_bench): one method per heads directory x tree, and one per drafter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TREES = "default | chain | auto (tuned by infer.bench --tune-tree) | dynamic[:TOPK,DEPTH,NODES] (EAGLE-2) | FILE.json"


def add_speculative_arguments(parser: argparse.ArgumentParser, *, repeatable: bool) -> None:
    """Adds --heads, --drafter and --tree to `parser`."""
    if repeatable:
        parser.add_argument("--heads", type=Path, action="append", default=[],
                            help="heads directory, or auto (the heads shipped for --model); repeatable: a method each")
        parser.add_argument("--drafter", action="append", default=[],
                            help="drafter NAME[:key=value,...], repeatable: a method each (`python -m "
                                 "infer.drafters` lists them and their options)")
        parser.add_argument("--tree", action="append", help=f"{TREES}; repeatable: a method per heads and tree")
    else:
        parser.add_argument("--heads", type=Path, help="draft heads directory, or auto (the first shipped for "
                                                       "--model): decode speculatively")
        parser.add_argument("--drafter", help="decode speculatively with a drafter, NAME[:key=value,...] (`python -m "
                                              "infer.drafters` lists them and their options); with --heads, both "
                                              "draft into one tree")
        parser.add_argument("--tree", help=f"with --heads or --drafter: {TREES}")
