"""Atomic file writes: readers see the old file or the new one, never half of one; and where the
project keeps what it makes once per machine (`cache_home`).

Every file the project writes for others to read (model and heads directories, eval.json,
checkpoint metadata) goes through here: written to a temporary name in the same directory,
flushed, then renamed over the target. The temporary name carries the host and process, so
writers of one file on several hosts (a shared file system) or processes never write into each
other's temporary file: the last rename wins, whole. A killed writer leaves at most a hidden
`.NAME.HOST.PID.tmp`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable


def cache_home() -> Path:
    """$XDG_CACHE_HOME/jaxaccel, else ~/.cache/jaxaccel: models, compiled programs, built kernels."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxaccel"


def write_atomically(target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` writes the content; it then replaces `target` in one rename."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomically(target: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> None:
    """`obj` as indented JSON at `target`, atomically (see `write_atomically`)."""
    write_atomically(target, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=sort_keys)))


def replace_directory(build: str | os.PathLike, out: str | os.PathLike) -> None:
    """Renames the complete directory `build` to `out`; an existing `out` is moved aside first and
    removed only once the new one is in place (put back if the rename fails)."""
    build, out = Path(build), Path(out)
    if not out.exists():
        os.replace(build, out)
        return
    old = out.with_name(f".{out.name}.{socket.gethostname()}.{os.getpid()}.old")
    os.replace(out, old)
    try:
        os.replace(build, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomically(target: str | os.PathLike, text: str) -> None:
    """`text` at `target`, atomically (see `write_atomically`)."""
    write_atomically(target, lambda tmp: Path(tmp).write_text(text))


def write_report(out_dir: str | os.PathLike, stem: str, report: dict, table: str | None = None) -> Path:
    """A program's report as out_dir/STEM.json (and its table as out_dir/STEM.md), each written
    atomically; returns the JSON's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out_dir / f"{stem}.json", json.dumps(report, indent=1, default=str))
    if table is not None:
        write_text_atomically(out_dir / f"{stem}.md", table)
    return out_dir / f"{stem}.json"
