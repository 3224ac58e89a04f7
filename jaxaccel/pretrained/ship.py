"""Copying a trained run into the shipped directory, and rebuilding a run with the repo's commands.

    ship(run_dir, dest, kinds)   RUN/model and RUN/heads/KIND -> dest/{model, heads/KIND}, only the files
                                 needed to run (never checkpoints/, data/, tb/), plus MANIFEST.json
                                 (sha256 of each file, the exact commands) and README.md
    rebuild(commands, ...)       runs the recorded commands again, one after the other

`python -m infer.demo --ship-from RUN` and `--train` are the command-line doors to these.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxaccel.files import replace_directory
from jaxaccel.pretrained.manifest import FORMAT, MANIFEST_FILE, describe_files
from jaxaccel.pretrained.provenance import heads_command, pretrain_command

MAX_BYTES = 40_000_000  # the budget for files kept in the repository
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
               "model.safetensors.index.json")
HEADS_FILES = ("heads.safetensors", "heads_config.json", "eval.json", "tree.json")
REQUIRED_HEADS_FILES = ("heads.safetensors", "heads_config.json")
# What made the shipped files (the README's commands), for `--train` when MANIFEST.json is unreadable.
DEFAULT_RUN = "runs/small"
DEFAULT_COMMANDS = (
    "python -m train.pretrain --preset small --out runs/small",
    "python -m train.heads --base runs/small/model --kind hydra --out runs/small/heads/hydra --prefix-layer "
    "--share-lm-head --batch-size 8 --seq-len 128 --steps 250",
    "python -m train.heads --base runs/small/model --kind eagle --out runs/small/heads/eagle --batch-size 8 "
    "--seq-len 128 --steps 250 --unroll 2",
    "python -m infer.bench --model runs/small/model --heads runs/small/heads/hydra --heads runs/small/heads/eagle "
    "--tune-tree --max-new-tokens 128",
)


def _model_files(model_dir: Path) -> list[str]:
    names = [n for n in MODEL_FILES if (model_dir / n).is_file()]
    names += sorted(p.name for p in model_dir.glob("*.safetensors"))
    for required in ("config.json", "tokenizer.json"):
        if required not in names:
            raise FileNotFoundError(f"{model_dir} has no {required}: not a model directory to ship")
    if not any(n.endswith(".safetensors") for n in names):
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors weights")
    return names


def heads_files(heads_dir: Path) -> list[str]:
    """The files of a heads directory to ship (FileNotFoundError if one it needs is missing)."""
    for required in REQUIRED_HEADS_FILES:
        if not (heads_dir / required).is_file():
            raise FileNotFoundError(f"{heads_dir} has no {required}: not a heads directory to ship")
    return [n for n in HEADS_FILES if (heads_dir / n).is_file()]


def tune_command(run_shown: str, kinds: Sequence[str]) -> str:
    """The `infer.bench --tune-tree` command that writes each heads directory's tree.json."""
    argv = ["python", "-m", "infer.bench", "--model", f"{run_shown}/model"]
    for kind in kinds:
        argv += ["--heads", f"{run_shown}/heads/{kind}"]
    return shlex.join(argv + ["--tune-tree", "--max-new-tokens", "128"])


def ship(run_dir: str | os.PathLike, dest: str | os.PathLike, kinds: Sequence[str] = ("hydra", "eagle"),
         *, max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """Replaces `dest` with RUN/model and RUN/heads/KIND for each kind (the files needed to run),
    MANIFEST.json and README.md; returns the manifest. Nothing changes if a file is missing, the
    commands cannot be recovered, or the files would exceed `max_bytes`."""
    run_dir, dest = Path(run_dir), Path(dest)
    shown = run_dir.as_posix()
    plan = {f"model/{n}": run_dir / "model" / n for n in _model_files(run_dir / "model")}
    for kind in kinds:
        plan.update({f"heads/{kind}/{n}": run_dir / "heads" / kind / n for n in heads_files(run_dir / "heads" / kind)})
    total = sum(src.stat().st_size for src in plan.values())
    if total > max_bytes:
        raise ValueError(f"shipping {len(plan)} files of {total / 1e6:.1f} MB exceeds the budget of "
                         f"{max_bytes / 1e6:.0f} MB; ship fewer heads kinds")
    commands = [pretrain_command(run_dir, shown)]
    commands += [heads_command(run_dir / "heads" / k, f"{shown}/model", f"{shown}/heads/{k}") for k in kinds]
    tuned = [k for k in kinds if (run_dir / "heads" / k / "tree.json").is_file()]
    if tuned:
        commands.append(tune_command(shown, tuned))

    return publish(dest, plan, {"run_dir": shown, "commands": commands,
                                "base_eval": read_json(run_dir / "eval.json"),
                                "heads_eval": {k: read_json(run_dir / "heads" / k / "eval.json") for k in kinds}},
                   readme)


def publish(dest: Path, plan: dict[str, Path], fields: dict[str, Any], readme_of) -> dict[str, Any]:
    """Replaces `dest` with the files of `plan` (shipped path -> source), MANIFEST.json (`fields`,
    every file's sha256 and size) and README.md (`readme_of(manifest)`), built aside and renamed
    into place whole; returns the manifest."""
    staging = dest.with_name(f".{dest.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for rel, src in plan.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, staging / rel)
        manifest = {"format": FORMAT, **fields, "files": describe_files(staging, list(plan)),
                    "total_bytes": sum(src.stat().st_size for src in plan.values())}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
        (staging / "README.md").write_text(readme_of(manifest))
        replace_directory(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's object, or None where there is no such file (a run or heads never evaluated)."""
    return json.loads(path.read_text()) if path.is_file() else None


def readme(manifest: dict[str, Any]) -> str:
    """The human-readable note written beside the shipped files."""
    lines = ["# Shipped model and draft heads", "",
             "The default model of `python -m infer.demo`: the `small` base model and its draft heads, made on "
             "this project's 2-core CPU machine by these commands, run in the repository root in this order:", "",
             "```"] + manifest["commands"] + ["```", "",
             f"then copied here (only the files needed to run) with `python -m infer.demo --ship-from "
             f"{manifest['run_dir']}`, which also wrote this file and MANIFEST.json. `python -m infer.demo --train` "
             "runs the commands again and ships the result. The demo checks every file against its SHA-256 "
             "below before loading it.", ""]
    base = manifest.get("base_eval") or {}
    if "bits_per_byte" in base:
        lines += [f"Base model: test-split {base['bits_per_byte']:.2f} bits per byte.", ""]
    for kind, ev in (manifest.get("heads_eval") or {}).items():
        if ev and "depths" in ev:
            top1 = " / ".join(f"{d['top1']:.2f}" for d in ev["depths"])
            lines.append(f"- {kind} heads: top-1 agreement by depth {top1}, mean accepted (chain) "
                         f"{ev['mean_accepted_chain']:.2f}")
    lines += ["", "| file | bytes | sha256 |", "|---|---:|---|"]
    lines += [f"| {rel} | {f['bytes']} | `{f['sha256']}` |" for rel, f in manifest["files"].items()]
    return "\n".join(lines) + "\n"


def rebuild(commands: Sequence[str], recorded_run: str, run_dir: str | os.PathLike, *, cwd: str | os.PathLike,
            run=None) -> None:
    """Runs `commands` in `cwd` (each `python -m ...` with this interpreter), with the recorded run
    directory replaced by `run_dir`. A failing command stops the rebuild (CalledProcessError).
    `run`: how to run one argv (default subprocess.run)."""
    run = run or subprocess.run
    run_dir = Path(run_dir).as_posix()
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "python":
            argv[0] = sys.executable
        argv = [run_dir + a[len(recorded_run):] if a == recorded_run or a.startswith(recorded_run + "/") else a
                for a in argv]
        print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
        run(argv, cwd=cwd, check=True)
