"""List the drafting methods: `python -m infer.drafters [--json]`.

One row per record of jaxaccel.drafters.registry: its name (what --drafter NAME and a heads kind
take), whether it needs trained heads (--heads DIR, made by the command shown), its
NAME:key=value options, whether it grows dynamic trees, its default tree's size, and what it does.
"""

from __future__ import annotations

import argparse
import json
import sys


def rows() -> list[dict]:
    """Every record, as plain values."""
    from jaxaccel.drafters import RECORDS

    return [record.describe() for record in RECORDS.values()]


def table(records: list[dict]) -> str:
    lines = ["| drafter | needs | options | default tree nodes | what it does |", "|---|---|---|---:|---|"]
    for r in records:
        needs = f"--heads (`{r['trainer']}`)" if r["trained"] else "nothing (training-free)"
        options = (", ".join(r["options"]) or "-") + ("; tree: dynamic too" if r["dynamic_trees"] else "")
        nodes = "" if r["default_tree_nodes"] is None else r["default_tree_nodes"]
        lines.append(f"| {r['name']} | {needs} | {options} | {nodes} | {r['summary']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer.drafters", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON list of the records")
    args = parser.parse_args(argv)
    records = rows()
    print(json.dumps(records, indent=1) if args.json else table(records), end="\n" if args.json else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
