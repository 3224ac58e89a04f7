"""Run metrics as JSON lines (`RUN/metrics.jsonl`) and TensorBoard events (`RUN/tb`).

On resume from step s, records after s (from a run that died before its next checkpoint)
are dropped from metrics.jsonl, and TensorBoard is told to purge events after s, so both
read as one uninterrupted run. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax

from jaxaccel.files import write_atomically


class MetricsLogger:
    """`log(step, {name: value})` -> one line {"step": step, **metrics} and one scalar per name."""

    def __init__(self, run_dir: str | os.PathLike, start_step: int = 0, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, start_step)
        self._file = self.path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: it pulls in protobuf

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Appends one record (flushed at once) and a TensorBoard scalar per finite number."""
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        """Closes metrics.jsonl and the TensorBoard writer."""
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl (a line cut short by a crash is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _truncate_after(path: Path, step: int) -> None:
    """Keeps the records up to `step`, minus end-of-run ones (test_*) that the run will redo."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path)
            if r.get("step", 0) < step or (r.get("step") == step and not any(k.startswith("test_") for k in r))]
    write_atomically(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))
