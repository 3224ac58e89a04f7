"""The prompts that draft heads are trained on, as user messages (never Spec-Bench's questions).

The shared folder `../shared/data/train_prompts/` holds three files (its README gives their
licences): self-instruct's seed tasks (an instruction, with each instance's input), 1,000 cleaned
Alpaca instructions (instruction and optional input) and a sample of the T0 training mixture
(ready prompts). Only the prompts are read: self-distillation trains on the base model's own
answers, so the datasets' reference outputs are ignored.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "train_prompts"
FILES = ("self_instruct_seed_tasks.jsonl", "alpaca_data_cleaned_1000.json", "t0_prompts_sample.jsonl")


@dataclass(frozen=True)
class TrainPrompt:
    """One user message to answer, with where it came from (`source` file, row `index`)."""

    source: str
    index: int
    text: str

    @property
    def key(self) -> str:
        return f"{self.source}:{self.index}"


HOLDOUT_MOD = 32  # heads never train on the prompts whose key hashes to 0 mod this


def is_heldout(key: str, mod: int = HOLDOUT_MOD) -> bool:
    """Whether the prompt (or the sequence answering it) with this key is held out from head training:
    stable as prompts and answer shards are added."""
    return zlib.crc32(str(key).encode()) % mod == 0


def _join(instruction: str, extra: str) -> str:
    return f"{instruction.strip()}\n\n{extra.strip()}" if extra and extra.strip() else instruction.strip()


def read_train_prompts(directory: str | os.PathLike | None = None) -> list[TrainPrompt]:
    """Every prompt of the three files, in file order (duplicate texts kept once)."""
    directory = Path(directory) if directory is not None else DEFAULT_DIR
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"training prompt files missing from {directory}: {missing}")
    prompts = []
    for i, line in enumerate((directory / FILES[0]).read_text(encoding="utf-8").splitlines()):
        task = json.loads(line)
        for instance in task["instances"]:
            prompts.append(TrainPrompt(FILES[0], i, _join(task["instruction"], instance.get("input", ""))))
    for i, row in enumerate(json.loads((directory / FILES[1]).read_text(encoding="utf-8"))):
        prompts.append(TrainPrompt(FILES[1], i, _join(row["instruction"], row.get("input", ""))))
    for i, line in enumerate((directory / FILES[2]).read_text(encoding="utf-8").splitlines()):
        prompts.append(TrainPrompt(FILES[2], i, json.loads(line)["prompt"].strip()))
    seen, unique = set(), []
    for p in prompts:
        if p.text and p.text not in seen:
            seen.add(p.text)
            unique.append(p)
    return unique


def read_prompt_file(path: str | os.PathLike) -> list[TrainPrompt]:
    """Prompts of a JSON-lines file of {"prompt": text} rows, or of the shard-*.jsonl files of a
    directory in order (train.self_prompts' output): source the file's or directory's name, index
    the row (counted across shards, so that keys stay put as shards are added)."""
    path = Path(path)
    files = sorted(path.glob("shard-*.jsonl")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise FileNotFoundError(f"no prompts at {path} (a JSON-lines file, or a directory of shard-*.jsonl)")
    rows = [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = []
    for i, line in enumerate(rows):
        try:
            text = json.loads(line)["prompt"].strip()
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{path}: row {i + 1} is not a JSON object with a \"prompt\" string") from None
        if text:
            prompts.append(TrainPrompt(path.name, i, text))
    return prompts
