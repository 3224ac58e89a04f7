"""The main job: autoregressive vs speculative decoding, side by side, on the shipped model.

    python -m infer.demo                                  # shipped small model + hydra and eagle heads
    python -m infer.demo --num-prompts 8 --max-new-tokens 128 --out runs/demo
    python -m infer.demo --model DIR --heads HEADS_DIR [--heads ...] [--tree auto]
    python -m infer.demo --ship-from runs/small [--kinds hydra eagle]   # replace the shipped files
    python -m infer.demo --train [--run-dir runs/small]                 # rebuild them, then ship

Test-split prompts (never trained on) are decoded at batch 1 by the autoregressive loop and by the
speculative loop with each heads directory, in one run on the same weights. The table gives
tokens/s (compilation excluded), mean accepted tokens (tokens per base forward pass), speedup vs
autoregressive and, at temperature 0, whether every token equals autoregressive decoding's; then
one prompt and its completion. Compiled programs are kept in JAX's persistent cache (see
jaxaccel/compilation_cache.py), so only the first run pays for compilation. Bad input, or shipped
files that are missing or corrupt, exit with status 2 and a message that says what to do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jaxaccel.pretrained import SHIPPED_DIR, SHIPPED_KINDS, ShippedFilesError

EXIT_BAD_INPUT = 2
REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring and `--help`)."""
    p = argparse.ArgumentParser(prog="python -m infer.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help=f"model directory (default: the shipped one, {SHIPPED_DIR}/model)")
    p.add_argument("--heads", type=Path, action="append", default=[],
                   help="heads directory, repeatable (default: the shipped ones)")
    p.add_argument("--tree", default="auto", help="auto (the heads' tuned tree.json, else the kind's default) | "
                   "default | chain | FILE.json")
    p.add_argument("--num-prompts", type=int, default=4, help="test-split prompts")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (identical to ar is checked)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per prompt (median)")
    p.add_argument("--seed", type=int, default=0, help="picks the prompts")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--out", type=Path, help="directory for demo.json and demo.md")
    p.add_argument("--compilation-cache", type=Path, help="JAX persistent compilation cache directory "
                   "(default: $JAXACCEL_CACHE_DIR or ~/.cache/jaxaccel/jax-compilation)")
    p.add_argument("--no-compilation-cache", action="store_true", help="compile everything afresh")
    ship = p.add_argument_group("the shipped files")
    ship.add_argument("--ship-from", type=Path, metavar="RUN",
                      help="copy RUN/model and RUN/heads/KIND into the shipped directory (MANIFEST.json, README.md)")
    ship.add_argument("--train", action="store_true", help="rebuild the shipped files with the commands in their "
                      "MANIFEST.json (about 80 minutes on 2 CPU cores), then ship them")
    ship.add_argument("--run-dir", type=Path, default=Path("runs/small"), help="where --train trains")
    ship.add_argument("--kinds", nargs="+", default=list(SHIPPED_KINDS), help="heads kinds to ship")
    ship.add_argument("--shipped-dir", type=Path, default=SHIPPED_DIR, help=argparse.SUPPRESS)  # tests
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the first flag out of range."""
    for name in ("num_prompts", "prompt_len", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.heads and args.model is None:
        raise ValueError("--heads needs --model (the shipped heads belong to the shipped model)")


def resolve_inputs(args: argparse.Namespace) -> tuple[Path, list[Path], dict | None]:
    """(model dir, heads dirs, manifest or None): the shipped files, checked, unless --model is given."""
    from jaxaccel.pretrained import shipped_heads_dirs, verify

    if args.model is not None:
        return args.model, args.heads, None
    try:
        manifest = verify(args.shipped_dir)
    except ShippedFilesError as e:
        raise ShippedFilesError(f"{e}. Restore them (`git checkout -- {args.shipped_dir}` in a clone, or "
                                "reinstall), or rebuild them with `python -m infer.demo --train` (about 80 minutes "
                                "on 2 CPU cores)") from None
    return args.shipped_dir / "model", shipped_heads_dirs(args.shipped_dir), manifest


def resolve_tree_spec(spec: str, heads_dirs: list[Path]) -> str | None:
    """--tree auto falls back to the kind's default for heads without a tuned tree.json."""
    if spec == "auto" and not all((d / "tree.json").is_file() for d in heads_dirs):
        return "default"
    return spec


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when under it."""
    path = Path(path).absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def demo(args: argparse.Namespace) -> dict:
    """Runs the comparison; returns the report (rows as infer.spec_bench.speculative_report, plus a sample)."""
    from infer.bench import make_prompts
    from infer.spec_bench import speculative_report
    from jaxaccel.decoding import AutoregressiveDecoder, make_policy
    from jaxaccel.decoding.text import load_model_tokenizer, stop_tokens
    from jaxaccel.hf import load_hf

    import jax

    began = time.perf_counter()
    model_dir, heads_dirs, manifest = resolve_inputs(args)
    model = load_hf(model_dir)
    tokenizer = load_model_tokenizer(model_dir)
    prompts = make_prompts(model_dir, model.config.vocab_size, args.num_prompts, args.prompt_len, args.seed)
    tree_spec = resolve_tree_spec(args.tree, heads_dirs)
    report = speculative_report(model, model_dir, heads_dirs, prompts, tree_specs=[tree_spec],
                                temperatures=[args.temperature], max_new_tokens=args.max_new_tokens,
                                repeats=args.repeats, seed=args.seed)
    # The sample: prompt 0 decoded once more (already compiled) by the autoregressive loop.
    sample = AutoregressiveDecoder(model).generate(
        [prompts[0]], policy=make_policy(args.temperature), max_new_tokens=args.max_new_tokens,
        stop_tokens=stop_tokens(model.config, model_dir), seed=args.seed).sequences()[0]
    return {**report, "model": shown(model_dir), "heads": [shown(d) for d in heads_dirs],
            "num_params": model.config.num_params(), "device": str(jax.devices()[0]),
            "prompt_len": args.prompt_len, "temperature": args.temperature,
            "shipped": manifest is not None, "commands": (manifest or {}).get("commands"),
            "sample": {"prompt": tokenizer.decode(prompts[0]), "completion": tokenizer.decode(sample)},
            "seconds": time.perf_counter() - began}


def markdown(report: dict) -> str:
    """The side-by-side table and the sample completion."""
    from infer.spec_bench import speculative_markdown

    header = (f"model: {report['model']} ({report['num_params'] / 1e6:.2f}M params, {report['device']}), batch 1, "
              f"{report['num_prompts']} test-split prompts of {report['prompt_len']} tokens, "
              f"{report['max_new_tokens']} new tokens, temperature {report['temperature']:g}")
    sample = report["sample"]
    return (speculative_markdown(report, header) + "\nSample (test-split prompt 0, autoregressive; every "
            "identical-to-ar method wrote the same):\n\n```python\n" + sample["prompt"] + "\u2502" +
            sample["completion"] + "\n```\n\n(\u2502 marks where the prompt ends.)\n")


def ship_from(args: argparse.Namespace) -> int:
    """--ship-from RUN: replaces the shipped files with RUN's."""
    from jaxaccel.pretrained import ship

    manifest = ship(args.ship_from, args.shipped_dir, args.kinds)
    print(f"shipped {len(manifest['files'])} files ({manifest['total_bytes'] / 1e6:.1f} MB) from {args.ship_from} "
          f"to {args.shipped_dir}; made by:", file=sys.stderr)
    for command in manifest["commands"]:
        print(f"  {command}", file=sys.stderr)
    return 0


def train_and_ship(args: argparse.Namespace) -> int:
    """--train: runs the commands that made the shipped files (from their manifest, or the defaults
    if it is unreadable) into --run-dir, then ships the result."""
    from jaxaccel.pretrained.manifest import read_manifest
    from jaxaccel.pretrained.ship import DEFAULT_COMMANDS, DEFAULT_RUN, rebuild

    try:
        manifest = read_manifest(args.shipped_dir)
        commands, recorded_run = manifest["commands"], manifest["run_dir"]
    except ShippedFilesError:
        commands, recorded_run = DEFAULT_COMMANDS, DEFAULT_RUN
    rebuild(commands, recorded_run, args.run_dir, cwd=REPO_ROOT)
    args.ship_from = args.run_dir
    return ship_from(args)


def main(argv=None) -> int:
    """Entry point: prints the table (or JSON); bad input or damaged shipped files exit with status 2."""
    args = parse_args(argv)
    try:
        check_args(args)
        if args.ship_from is not None:
            return ship_from(args)
        if args.train:
            return train_and_ship(args)
        cache = None
        if not args.no_compilation_cache:
            from jaxaccel.compilation_cache import enable_compilation_cache

            cache = enable_compilation_cache(args.compilation_cache)
            entries_before = sum(1 for _ in cache.iterdir())
        report = demo(args)
        if cache is not None:  # a first run finds it empty; a later one finds every program it needs
            report["compilation_cache"] = {"dir": str(cache), "entries_before": entries_before,
                                           "entries_after": sum(1 for _ in cache.iterdir())}
    except (ValueError, FileNotFoundError) as e:  # ShippedFilesError, HeadsMismatchError, ModelDirectoryError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    table = markdown(report)
    print(json.dumps(report, indent=1) if args.json else table, end="\n" if args.json else "")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "demo.json").write_text(json.dumps(report, indent=1))
        (args.out / "demo.md").write_text(table)
    print(f"done in {report['seconds']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
