"""MANIFEST.json of the shipped files: what each file's bytes must hash to, and how they were made.

    {"format": 1, "commands": [...], "files": {"model/model.safetensors": {"sha256", "bytes"}, ...},
     "base_eval": {...}, "heads_eval": {"hydra": {...}, ...}}

`verify` checks every listed file before anything loads them, so a missing file, a truncated
download or a Git LFS pointer left in place of the weights is reported as such, by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT = 1
MANIFEST_FILE = "MANIFEST.json"
LFS_POINTER_PREFIX = b"version https://git-lfs"


class ShippedFilesError(ValueError):
    """The shipped model or heads files are missing, incomplete or corrupt."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(root: Path, relative_paths: list[str]) -> dict[str, dict[str, Any]]:
    """{relative path: {"sha256", "bytes"}} for files under `root`."""
    return {rel: {"sha256": file_sha256(root / rel), "bytes": (root / rel).stat().st_size}
            for rel in sorted(relative_paths)}


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a shipped directory (ShippedFilesError if it is missing or unreadable)."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise ShippedFilesError(f"{path} is missing: the shipped model files are not there")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShippedFilesError(f"{path} is corrupt: not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "files" not in manifest:
        raise ShippedFilesError(f"{path} is not a format-{FORMAT} manifest")
    return manifest


def verify(root: str | Path) -> dict[str, Any]:
    """Checks every file the manifest lists (size, then SHA-256); returns the manifest.

    Raises ShippedFilesError naming every missing or differing file."""
    root = Path(root)
    manifest = read_manifest(root)
    problems = []
    for rel, expected in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER_PREFIX))
        if head == LFS_POINTER_PREFIX and size < 1024 and expected["bytes"] >= 1024:
            problems.append(f"{rel} is a Git LFS pointer, not the file (run `git lfs pull`)")
        elif size != expected["bytes"]:
            problems.append(f"{rel} has {size} bytes, expected {expected['bytes']}")
        elif file_sha256(path) != expected["sha256"]:
            problems.append(f"{rel} is corrupt: sha256 differs from the manifest's {expected['sha256'][:12]}…")
    if problems:
        raise ShippedFilesError(f"shipped files in {root} are not intact: " + "; ".join(problems))
    return manifest
