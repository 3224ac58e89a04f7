"""The model shipped inside the package: the `small` base and its draft heads, ready to run.

    jaxaccel/pretrained/small/model/          Hugging Face model directory (load_hf)
    jaxaccel/pretrained/small/heads/KIND/     heads directories (load_heads), with tuned tree.json
    jaxaccel/pretrained/small/MANIFEST.json   sha256 of every file and the commands that made them
    jaxaccel/pretrained/small/README.md       the same, for people

`python -m infer.demo` runs them; `python -m infer.demo --ship-from RUN` replaces them with a
newly trained run directory.
"""

from __future__ import annotations

from pathlib import Path

from jaxaccel.pretrained.manifest import ShippedFilesError, read_manifest, verify
from jaxaccel.pretrained.ship import MAX_BYTES, rebuild, ship

SHIPPED_DIR = Path(__file__).resolve().parent / "small"
SHIPPED_KINDS = ("hydra", "eagle")

__all__ = ["MAX_BYTES", "SHIPPED_DIR", "SHIPPED_KINDS", "ShippedFilesError", "read_manifest", "rebuild", "ship",
           "shipped_heads_dirs", "verify"]


def shipped_heads_dirs(root: Path = SHIPPED_DIR) -> list[Path]:
    """The heads directories under root/heads, in the manifest's order (call `verify` first)."""
    kinds = list(read_manifest(root).get("heads_eval") or {})
    return [root / "heads" / k for k in kinds]
