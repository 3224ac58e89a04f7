"""The training loop, shared by pretraining and draft-head distillation.

Step numbers count optimizer updates: "step s" is the state after s updates, the one a
checkpoint at s holds, and the metrics logged at s are those of the update that produced it
(which trained on `batch_fn(s - 1)`). Metrics are fetched from the device one step late, so
the host never waits for an update before dispatching the next one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

Metrics = dict[str, float]


def train_loop(state: Any, step_fn: Callable, batch_fn: Callable[[int], Any], *, start_step: int, num_steps: int,
               on_metrics: Callable[[int, Metrics], None], checkpointer=None, checkpoint_every: int = 0,
               eval_fn: Callable[[Any], Metrics] | None = None, eval_every: int = 0) -> Any:
    """Runs updates start_step + 1 .. num_steps and returns the final state.

    step_fn(state, batch) -> (state, metrics) may donate its state. checkpointer: a
    jaxaccel.checkpoint.TrainCheckpointer, offered every step (its policy saves every
    `checkpoint_every` steps, or on a preemption notice) and forced at the end. eval_fn(state)
    runs every `eval_every` steps and after the last one.
    """
    pending: tuple[int, dict] | None = None

    def flush():
        nonlocal pending
        if pending is not None:
            step, metrics = pending
            pending = None
            on_metrics(step, {k: float(v) for k, v in jax.device_get(metrics).items()})

    for s in range(start_step + 1, num_steps + 1):
        state, metrics = step_fn(state, batch_fn(s - 1))
        flush()  # the previous step's metrics: ready by now or soon, while this step runs
        pending = (s, metrics)
        if checkpointer is not None:
            if checkpoint_every and s % checkpoint_every == 0:
                flush()  # a checkpoint at s implies its metrics are logged
            checkpointer.save(s, state)
        if eval_fn is not None and eval_every and (s % eval_every == 0 or s == num_steps):
            flush()
            on_metrics(s, eval_fn(state))
    flush()
    if checkpointer is not None:
        checkpointer.save(num_steps, state, force=True)  # no-op when step num_steps is saved already
        checkpointer.wait()
    return state
