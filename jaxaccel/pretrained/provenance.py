"""The commands that made a run directory, read back from what the training programs recorded.

`train.pretrain` and `train.heads` write their configuration to `checkpoints/train_metadata.json`
(and the step of the exported heads to `eval.json`). From those, this module writes the command
line that reproduces the run: the preset, plus a flag for every recorded value that differs from
the preset's (pretraining) or the program's default (heads).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

from jaxaccel.checkpoint import METADATA_FILE

# TrainConfig fields that `python -m train.pretrain` takes as flags (the others come from the preset).
PRETRAIN_FLAGS = ("steps", "seed", "checkpoint_every", "keep_checkpoints", "batch_size", "seq_len", "accum_steps",
                  "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "clip_norm", "eval_every", "eval_windows",
                  "test_windows")
# ModelConfig fields left out of the comparison: set by pretraining from the tokenizer, or choosing
# a kernel rather than the function the model computes (its default has changed over time).
NOT_FROM_FLAGS = ("eos_token_id", "attention_impl")
# DistillConfig fields without a `python -m train.heads` flag.
HEADS_UNFLAGGED = ("min_lr_ratio", "clip_norm")


class ProvenanceError(ValueError):
    """A run directory does not record how it was made, or was made in a way no command reproduces."""


def _metadata(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "checkpoints" / METADATA_FILE
    if not path.is_file():
        raise ProvenanceError(f"{run_dir} records no training configuration ({path} is missing), so the command "
                              "that made it is unknown")
    return json.loads(path.read_text())


def _flag(name: str, value: Any) -> list[str]:
    return [f"--{name.replace('_', '-')}", json.dumps(value) if value is None or isinstance(value, bool) else str(value)]


def _differing(recorded: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Recorded values that differ from the reference. Only fields both know count: a field the
    record lacks was added to the code since (its default applies), and one the code lacks was
    removed since (no flag could set it any more)."""
    return {k: v for k, v in sorted(recorded.items()) if k in reference and reference[k] != v}


def pretrain_command(run_dir: str | Path, shown_as: str | None = None) -> str:
    """`python -m train.pretrain ...` that reproduces the base model of `run_dir`.

    `shown_as` is how the run directory is written in the command (default: as given)."""
    from jaxaccel.presets import PRESETS

    run_dir = Path(run_dir)
    meta = _metadata(run_dir)
    if meta.get("data", {}).get("extra_dirs") or not meta.get("data", {}).get("include_stdlib", True):
        raise ProvenanceError(f"{run_dir} was trained on another corpus than the standard library: no shipped "
                              "command can reproduce it")

    meta["model"] = {k: v for k, v in meta["model"].items() if k not in NOT_FROM_FLAGS}

    def cost(name):  # the preset that needs the fewest overrides
        p = PRESETS[name]
        return len(_differing(meta["model"], p.model.to_dict())) + len(_differing(meta["train"], p.train.to_dict()))

    preset = min(PRESETS, key=cost)
    model_diff = _differing(meta["model"], PRESETS[preset].model.to_dict())
    train_diff = _differing(meta["train"], PRESETS[preset].train.to_dict())
    unflagged = sorted(set(train_diff) - set(PRETRAIN_FLAGS))
    if unflagged:
        raise ProvenanceError(f"{run_dir} was trained with {unflagged} differing from preset {preset!r}, which "
                              "python -m train.pretrain has no flags for")
    argv = ["python", "-m", "train.pretrain", "--preset", preset, "--out", shown_as or str(run_dir)]
    if model_diff:
        argv += ["--set"] + [f"{k}={json.dumps(v)}" for k, v in model_diff.items()]
    for name, value in train_diff.items():
        argv += _flag(name, 0 if name == "test_windows" and value is None else value)
    return shlex.join(argv)


def heads_command(heads_dir: str | Path, base_shown_as: str, shown_as: str | None = None) -> str:
    """`python -m train.heads ...` that reproduces the heads of `heads_dir` (distilled from the base
    model written `base_shown_as` in the command)."""
    from jaxaccel.heads.config import HeadsConfig
    from jaxaccel.training.distill import DistillConfig

    heads_dir = Path(heads_dir)
    meta = _metadata(heads_dir)
    if meta.get("data", {}).get("extra_dirs") or not meta.get("data", {}).get("include_stdlib", True):
        raise ProvenanceError(f"{heads_dir} was distilled on another corpus than the standard library")
    train = dict(meta["train"])
    eval_path = heads_dir / "eval.json"
    if eval_path.is_file():  # `steps` may change on resume: the exported heads' step is the one that counts
        train["steps"] = json.loads(eval_path.read_text())["step"]
    heads = meta["heads"]
    argv = ["python", "-m", "train.heads", "--base", base_shown_as, "--kind", heads["kind"],
            "--out", shown_as or str(heads_dir)]
    for name, value in _differing({k: v for k, v in heads.items() if k != "kind"},
                                  HeadsConfig(kind=heads["kind"]).to_dict()).items():
        argv += [f"--{name.replace('_', '-')}"] if value is True else _flag(name, value)
    train_diff = _differing(train, dataclasses.asdict(DistillConfig()))
    unflagged = sorted(set(train_diff) & set(HEADS_UNFLAGGED))
    if unflagged:
        raise ProvenanceError(f"{heads_dir} was distilled with {unflagged} differing from the defaults, which "
                              "python -m train.heads has no flags for")
    for name, value in train_diff.items():
        argv += _flag(name, value)
    return shlex.join(argv)
