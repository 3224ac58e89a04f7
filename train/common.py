"""What the training programs share: distributed start-up, the progress bar, and one-line errors."""

from __future__ import annotations

import os
import sys
import time

EXIT_BAD_INPUT = 2


def maybe_initialize_distributed(flag: bool) -> None:
    """Multi-host: one process per host, all running the same command (see the README)."""
    import jax

    if not (flag or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)  # coordinator etc. auto-detected on TPU, SLURM, Open MPI, K8s


class Progress:
    """tqdm bar over steps with loss and tokens/s (tqdm gives the ETA); val results printed above it."""

    def __init__(self, start: int, total: int, tokens_per_step: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, unit="step", disable=not enabled, dynamic_ncols=True,
                        smoothing=0.05)
        self.tokens_per_step = tokens_per_step
        self.first: tuple[int, float] | None = None  # (step, time) of the first finished step: past the compile
        self.last_step_time = 0.0

    def __call__(self, step: int, metrics: dict) -> dict:
        now = time.perf_counter()
        extra = {}
        if "loss" in metrics:
            self.last_step_time = now
            if self.first is None:
                self.first = (step, now)
            elif step > self.first[0]:
                extra["tokens_per_s"] = (step - self.first[0]) * self.tokens_per_step / (now - self.first[1])
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                                 tok_s=f"{extra.get('tokens_per_s', 0):.0f}", refresh=False)
        if "val_loss" in metrics:
            if self.first is not None:  # evaluation time is not training time
                self.first = (self.first[0], self.first[1] + now - self.last_step_time)
            self.bar.write(f"step {step}: val_loss {metrics['val_loss']:.4f}  "
                           f"val_bits_per_byte {metrics['val_bits_per_byte']:.4f}")
        return extra

    def close(self):
        """Ends the progress bar."""
        self.bar.close()


def one_line(error: BaseException) -> str:
    """The error as one line of text (an incompatible checkpoint lists every differing field)."""
    from jaxaccel.checkpoint import IncompatibleCheckpointError

    if isinstance(error, IncompatibleCheckpointError):
        diffs = "; ".join(f"{k}: checkpoint has {old!r}, this run has {new!r}"
                          for k, (old, new) in sorted(error.differences.items()))
        return (f"{error.directory} holds checkpoints of a different configuration ({diffs}); "
                "nothing was changed: use another --out, or the original settings")
    return " ".join(str(error).split())


def guarded_main(run, args) -> int:
    """run(args), with bad input reported as one line and exit status 2 (JAXACCEL_TRACEBACK=1: raise)."""
    maybe_initialize_distributed(args.distributed)
    from jaxaccel.checkpoint import CorruptCheckpointError
    from jaxaccel.hf import ModelDirectoryError

    try:
        return run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, CorruptCheckpointError,
            ModelDirectoryError) as error:
        if os.environ.get("JAXACCEL_TRACEBACK"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def check_same_settings(out_dir, settings: dict, what: str) -> None:
    """A resumed run must match the settings recorded in OUT/config.json (if any): ValueError naming
    those that differ, before anything in OUT is touched."""
    import json
    from pathlib import Path

    config_file = Path(out_dir) / "config.json"
    if not config_file.is_file():
        return
    recorded = json.loads(config_file.read_text())["settings"]
    differ = sorted(k for k in settings.keys() | recorded.keys() if recorded.get(k) != settings.get(k))
    if differ:
        raise ValueError(f"{out_dir} holds {what} made with other settings ({', '.join(differ)}); "
                         "use another --out or the same command")
