"""Draft heads shipped for named models (`--heads auto`), beside the model registry's entries.

    jaxaccel/pretrained/NAME/heads/KIND/   heads directories (load_heads), NAME a jaxaccel.models name
    jaxaccel/pretrained/NAME/MANIFEST.json sha256 of every file, the commands that made them, eval
    jaxaccel/pretrained/NAME/README.md     the same, for people

The model itself is not shipped (it comes from the package index: `python -m infer.models`). Heads
know the exact base they were distilled from (heads_config.json's fingerprint), so `auto_heads`
finds a model's heads by its weights, whether the model was named or given as a directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxaccel.pretrained.manifest import MANIFEST_FILE, read_manifest, verify
from jaxaccel.pretrained.ship import heads_files, publish, read_json

PRETRAINED_DIR = Path(__file__).resolve().parent
MAX_HEADS_BYTES = 48_000_000  # the repository's budget for one model's shipped heads


def shipped_roots(root: Path = PRETRAINED_DIR) -> list[Path]:
    """Every shipped directory with heads (the `small` model's included)."""
    return sorted(p for p in root.iterdir() if (p / MANIFEST_FILE).is_file() and (p / "heads").is_dir())


def _heads_dirs(root: Path, manifest: dict[str, Any]) -> list[Path]:
    return [root / "heads" / kind for kind in (manifest.get("heads_eval") or {})]


def _fingerprint_of_heads(heads_dir: Path) -> dict[str, str] | None:
    path = heads_dir / "heads_config.json"
    return json.loads(path.read_text())["base"]["fingerprint"] if path.is_file() else None


def auto_heads(model_dir: str | os.PathLike, root: Path = PRETRAINED_DIR) -> list[Path]:
    """The shipped heads directories distilled from the model in `model_dir`, after checking every
    shipped file (ShippedFilesError if one is damaged); FileNotFoundError naming the models that
    have heads when none match."""
    from jaxaccel.heads.io import base_fingerprint

    fingerprint = base_fingerprint(model_dir)
    for shipped in shipped_roots(root):
        dirs = _heads_dirs(shipped, read_manifest(shipped))
        if dirs and _fingerprint_of_heads(dirs[0]) == fingerprint:
            verify(shipped)
            return dirs
    names = ", ".join(p.name for p in shipped_roots(root)) or "none"
    raise FileNotFoundError(f"no shipped draft heads for the model in {model_dir} (heads ship for: {names}); "
                            f"train some (python -m train.heads) and pass --heads DIR")


def resolve_heads(specs: Sequence[str | os.PathLike], model_dir: str | os.PathLike,
                  root: Path = PRETRAINED_DIR) -> list[Path]:
    """--heads values: directories as given, 'auto' expanded to the model's shipped heads."""
    dirs: list[Path] = []
    for spec in specs:
        dirs += auto_heads(model_dir, root) if str(spec) == "auto" else [Path(spec)]
    return dirs


def ship_heads(heads_dirs: Mapping[str, Path], dest: str | os.PathLike, commands: Sequence[str], *,
               title: str, max_bytes: int = MAX_HEADS_BYTES, store_dtype: str | None = None) -> dict[str, Any]:
    """Replaces `dest` with heads/KIND for each (kind, heads directory) (the files needed to run),
    MANIFEST.json (sha256s, `commands`, each eval.json) and README.md; `store_dtype` (e.g.
    "bfloat16"): the dtype the heads' floating weights are shipped in (default: as trained).
    Nothing changes if a file is missing or the files would exceed `max_bytes`. A source may be
    `dest`'s own heads (reshipping them narrower)."""
    from jaxaccel.heads.io import WEIGHTS_FILE, store_heads_as

    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix=".ship-", dir=dest.parent) as narrowed:
        plan = {}
        for kind, src in heads_dirs.items():
            plan.update({f"heads/{kind}/{n}": Path(src) / n for n in heads_files(Path(src))})
            if store_dtype is not None:
                plan[f"heads/{kind}/{WEIGHTS_FILE}"] = store_heads_as(
                    Path(src) / WEIGHTS_FILE, Path(narrowed) / f"{kind}.safetensors", store_dtype)
        total = sum(p.stat().st_size for p in plan.values())
        if total > max_bytes:
            raise ValueError(f"shipping {len(plan)} files of {total / 1e6:.1f} MB exceeds the budget of "
                             f"{max_bytes / 1e6:.0f} MB")
        evals = {k: read_json(Path(d) / "eval.json") for k, d in heads_dirs.items()}
        return publish(dest, plan, {"commands": list(commands), "heads_eval": evals, "store_dtype": store_dtype},
                       lambda manifest: heads_readme(title, manifest))


def heads_readme(title: str, manifest: dict[str, Any]) -> str:
    """The note written beside shipped heads: what made them, and every file's hash."""
    lines = [f"# {title}", "", "Made on this project's 2-core CPU machine by these commands, run in the repository "
             "root in this order:", "", "```", *manifest["commands"], "```", "",
             "`--heads auto` (infer.generate, bench, spec_bench, demo, chat) loads them for this model after "
             "checking every file against its SHA-256 below." + (
                 f" The heads' weights are stored in {manifest['store_dtype']} and run in the base's dtype."
                 if manifest.get("store_dtype") else ""), "",
             "| file | bytes | sha256 |", "|---|---:|---|"]
    lines += [f"| {rel} | {f['bytes']} | `{f['sha256']}` |" for rel, f in manifest["files"].items()]
    return "\n".join(lines) + "\n"
