"""The main job: autoregressive vs speculative decoding, side by side, on a real model.

    python -m infer.demo                                  # SmolLM2-135M-Instruct on Spec-Bench questions
    python -m infer.demo --num-prompts 8 --max-new-tokens 128 --out runs/demo
    python -m infer.demo --model small                    # the shipped small model + its hydra and eagle heads
    python -m infer.demo --model DIR_OR_NAME --heads HEADS_DIR [--heads ...] [--tree auto]
    python -m infer.demo --drafter pld --drafter recycling   # training-free drafters, any model
    python -m infer.demo --drafter none                   # heads only
    python -m infer.demo --ship-from runs/small [--kinds hydra eagle]   # replace the shipped small files
    python -m infer.demo --train [--run-dir runs/small]                 # rebuild them, then ship

The default model is `smollm2-135m-instruct` (fetched from the package index and converted once,
see `python -m infer.models`); its prompts are a handful of Spec-Bench questions (one per subtask,
first turn, through the model's chat template). The `small` model's prompts are test-split
snippets of its corpus (never trained on). Each prompt is decoded at batch 1 by the
autoregressive loop and by the speculative loop with each heads directory, with each --drafter
(default: REST and prompt lookup sharing six nodes, `share`, for a model whose own answers are
committed as REST's corpus — SmolLM2: on Spec-Bench its best row —, else prompt lookup,
`pld:depth=2`) and
with their union (the heads' tree and the drafter's chains verified together), in one run on the
same weights.
The table gives tokens/s (compilation excluded), mean accepted tokens (tokens per base forward pass), speedup vs autoregressive and, at temperature 0, whether every token equals
autoregressive decoding's; then one prompt and its answer. Compiled programs are kept in JAX's
persistent cache (see jaxaccel/compilation_cache.py), so only the first run pays for compilation.
Bad input, or shipped files that are missing or corrupt, exit with status 2 and a message that
says what to do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jaxaccel.models import DEFAULT_MODEL
from jaxaccel.pretrained import SHIPPED_DIR, SHIPPED_KINDS, ShippedFilesError

EXIT_BAD_INPUT = 2
REPO_ROOT = Path(__file__).resolve().parents[1]
# Training-free; with shipped heads, also their union. REST needs the model's own answers (committed
# for SmolLM2); six nodes are what a CPU verify pass affords at about the cost of one row.
DEFAULT_DRAFTER = "pld:depth=2"
DEFAULT_DRAFTER_WITH_CORPUS = "share"


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring and `--help`)."""
    p = argparse.ArgumentParser(prog="python -m infer.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (python -m infer.models; default "
                   f"{DEFAULT_MODEL}; 'small': the shipped small model and heads) or model directory")
    p.add_argument("--heads", type=Path, action="append", default=[],
                   help="heads directory, or auto (every heads shipped for the model), repeatable (default: the first "
                        "heads shipped for the model, if any)")
    p.add_argument("--drafter", action="append", help="training-free drafter NAME[:key=value,...], repeatable "
                   f"(pld, recycling; `python -m infer.drafters` lists them; default {DEFAULT_DRAFTER_WITH_CORPUS} "
                   f"for a model whose answers REST finds, else {DEFAULT_DRAFTER}; none: no drafter)")
    p.add_argument("--questions", type=Path, help="Spec-Bench question file for chat models (default: the "
                   "shared question.jsonl)")
    p.add_argument("--tree", default="auto", help="auto (the heads' tuned tree.json, else the kind's default) | "
                   "default | chain | FILE.json")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts (Spec-Bench questions or test-split snippets)")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per test-split snippet (models without a "
                   "chat template)")
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
    args = p.parse_args(argv)
    return args


def default_drafter(model_dir: Path) -> str:
    """REST and prompt lookup where REST finds the model's own committed answers, else prompt lookup."""
    from jaxaccel.drafters.rest import recorded_options

    return DEFAULT_DRAFTER_WITH_CORPUS if recorded_options(model_dir) else DEFAULT_DRAFTER


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the first flag out of range."""
    for name in ("num_prompts", "prompt_len", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")


def shipped_for(model_dir: Path) -> list[Path]:
    """The first of the heads shipped for this model (checked; the manifest's order: SmolLM2's
    EAGLE-3, whose 2-node chain adds one node to the drafter's), or none. The demo's rows stay few
    (each costs a compile and a pass over the prompts); `--heads auto` runs every shipped one."""
    from jaxaccel.pretrained.shipped_heads import auto_heads

    try:
        return auto_heads(model_dir)[:1]
    except FileNotFoundError:
        return []


def resolve_inputs(args: argparse.Namespace) -> tuple[Path, list[Path], dict | None]:
    """(model dir, heads dirs, manifest or None): the shipped small files, checked, for --model small;
    else the named model (prepared on first use) or directory."""
    from jaxaccel.models import resolve_model
    from jaxaccel.pretrained import shipped_heads_dirs, verify
    from jaxaccel.pretrained.shipped_heads import resolve_heads

    if args.model != "small":
        model_dir = resolve_model(args.model)
        return model_dir, resolve_heads(args.heads, model_dir) if args.heads else shipped_for(model_dir), None
    try:
        manifest = verify(args.shipped_dir)
    except ShippedFilesError as e:
        raise ShippedFilesError(f"{e}. Restore them (`git checkout -- {args.shipped_dir}` in a clone, or "
                                "reinstall), or rebuild them with `python -m infer.demo --train` (about 80 minutes "
                                "on 2 CPU cores)") from None
    model_dir = args.shipped_dir / "model"
    return model_dir, resolve_heads(args.heads, model_dir) if args.heads else shipped_heads_dirs(args.shipped_dir), manifest


def make_demo_prompts(args: argparse.Namespace, model_dir: Path, tokenizer, vocab_size: int, context: int):
    """(token ids per prompt, what to show per prompt, end-of-turn ids): Spec-Bench questions
    through the chat template for a model that has one, else test-split snippets of --prompt-len
    tokens (no end of turn)."""
    from infer.bench import make_prompts
    from jaxaccel.chat import ChatTemplate
    from jaxaccel.spec_bench import read_questions, sample_questions

    try:
        template = ChatTemplate.from_model_dir(model_dir, tokenizer)
    except ValueError:  # no chat template: a base model such as `small`
        prompts = make_prompts(model_dir, vocab_size, args.num_prompts, args.prompt_len, args.seed)
        return prompts, [{"prompt": tokenizer.decode(p)} for p in prompts], []
    room = context - args.max_new_tokens  # questions too long for the model's context are left out
    encoded = {q: template.encode(template.conversation(q.turns[0])) for q in read_questions(args.questions)}
    fitting = [q for q, ids in encoded.items() if len(ids) <= room]
    if not fitting:
        raise ValueError(f"no question fits in the model's context of {context} positions with "
                         f"--max-new-tokens {args.max_new_tokens}")
    questions = sample_questions(fitting, args.num_prompts, args.seed)
    prompts = [encoded[q] for q in questions]
    return prompts, [{"question_id": q.question_id, "category": q.category, "question": q.turns[0]}
                     for q in questions], list(template.stop_ids)


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
    """Runs the comparison; returns the report (rows as infer.speculative_rows.speculative_report, plus a sample)."""
    from infer.speculative_rows import speculative_report
    from jaxaccel.decoding import AutoregressiveDecoder, make_policy
    from jaxaccel.decoding.text import load_model_tokenizer, stop_tokens
    from jaxaccel.hf import load_hf

    import jax

    began = time.perf_counter()
    model_dir, heads_dirs, manifest = resolve_inputs(args)
    drafters = [d for d in args.drafter or [default_drafter(model_dir)] if d != "none"]
    model = load_hf(model_dir)
    tokenizer = load_model_tokenizer(model_dir)
    prompts, shown_prompts, turn_end = make_demo_prompts(args, model_dir, tokenizer, model.config.vocab_size,
                                                         model.config.max_position_embeddings)
    stop = sorted(set(stop_tokens(model.config, model_dir)) | set(turn_end))
    tree_spec = resolve_tree_spec(args.tree, heads_dirs)
    report = speculative_report(model, model_dir, heads_dirs, prompts, tree_specs=[tree_spec],
                                temperatures=[args.temperature], max_new_tokens=args.max_new_tokens,
                                repeats=args.repeats, seed=args.seed, stop=stop, drafter_specs=drafters)
    # The sample: prompt 0 decoded once more (already compiled) by the autoregressive loop.
    sample = AutoregressiveDecoder(model).generate(
        [prompts[0]], policy=make_policy(args.temperature), max_new_tokens=args.max_new_tokens,
        stop_tokens=stop, seed=args.seed).sequences()[0]
    return {**report, "model": shown(model_dir), "heads": [shown(d) for d in heads_dirs],
            "num_params": model.config.num_params(), "device": str(jax.devices()[0]),
            "prompt_len": args.prompt_len, "temperature": args.temperature,
            "shipped": manifest is not None, "commands": (manifest or {}).get("commands"),
            "prompts": shown_prompts, "chat": "question" in shown_prompts[0],
            "sample": {**shown_prompts[0], "completion": tokenizer.decode(sample)},
            "seconds": time.perf_counter() - began}


def markdown(report: dict) -> str:
    """The side-by-side table and the sample completion."""
    from infer.speculative_rows import speculative_markdown

    prompts = (f"{report['num_prompts']} Spec-Bench questions (chat template)" if report["chat"] else
               f"{report['num_prompts']} test-split prompts of {report['prompt_len']} tokens")
    header = (f"model: {report['model']} ({report['num_params'] / 1e6:.2f}M params, {report['device']}), batch 1, "
              f"{prompts}, {report['max_new_tokens']} new tokens, temperature {report['temperature']:g}")
    table = speculative_markdown(report, header)
    if not report["heads"]:
        table += ("\nNo draft heads ship for this model yet; `--heads DIR` adds rows for trained ones "
                  "(`--model small` shows the shipped small model's).\n")
    sample = report["sample"]
    if report["chat"]:
        return (table + f"\nSample (Spec-Bench question {sample['question_id']}, {sample['category']}; "
                "autoregressive; every identical-to-ar method wrote the same):\n\n> " +
                sample["question"].replace("\n", "\n> ") + "\n\n" + sample["completion"].strip() + "\n")
    return (table + "\nSample (test-split prompt 0, autoregressive; every "
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
        from jaxaccel.files import write_report

        write_report(args.out, "demo", report, table)
    print(f"done in {report['seconds']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
