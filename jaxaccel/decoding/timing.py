"""Timing of the decode loop and of the weight-streaming floor, for benchmarks.

Batch-1 decoding reads every weight once per step, so its step time is bounded below by the
time to stream the weights from memory. The floor is measured, not computed from a datasheet:
passes that read each parameter array once (a full sum, and a matrix-vector product as the
decode step does), timed inside a compiled loop as the decode step is, the faster of the two.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxaccel.decoding.autoregressive import AutoregressiveDecoder
from jaxaccel.decoding.sampling import Greedy, Policy


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` (its result blocked on) over `repeats` runs, after one warm-up."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loop_step_seconds(prepare: Callable[[], object], run: Callable[[object, int], object], *, short: int = 4,
                      long: int = 20, repeats: int = 5) -> float:
    """Seconds one iteration of a compiled loop costs inside it: the slope between `run(prepare(), short)`
    and `run(prepare(), long)` (k iterations; `prepare` untimed, its result may be donated), each the
    fastest of `repeats` after one warm-up. A call from Python also pays dispatch, argument handling
    and copies of what it does not donate; a decode loop pays them once, not per step. Where noise
    hides the difference, the long run's time per iteration (an upper bound)."""
    def fastest(k: int) -> float:
        times = []
        for _ in range(repeats + 1):
            inputs = jax.block_until_ready(prepare())
            start = time.perf_counter()
            jax.block_until_ready(run(inputs, k))
            times.append(time.perf_counter() - start)
        return min(times[1:])

    long_s, short_s = fastest(long), fastest(short)
    if long_s <= short_s:  # noise larger than the steps between: the long run's mean, an upper bound
        return long_s / long
    return (long_s - short_s) / (long - short)


def decode_step_seconds(decoder, prompts: Sequence[Sequence[int]], *, policy: Policy = Greedy(),
                        steps: tuple[int, int] = (4, 20), tokens_per_step: int = 1) -> float:
    """Seconds of one step of `decoder`'s compiled loop right after prefilling `prompts`: the slope
    between `advance` over steps[0] and over steps[1] steps (`tokens_per_step`: the most one step
    emits, so that no row is done before steps[1])."""
    short, long = steps
    max_new_tokens = (long + 1) * tokens_per_step

    def prepare():
        return decoder.start(prompts, policy=policy, max_new_tokens=max_new_tokens)

    def run(started, k):
        state, stop_ids = started
        return decoder.advance(state, stop_ids, policy=policy, max_steps=k)

    return loop_step_seconds(prepare, run, short=short, long=long)


def _sum_one(x, c):
    return jnp.sum(x * (1 + c).astype(x.dtype), dtype=jnp.float32)


def _sum_all(arrays, c):
    return sum(_sum_one(x, c) for x in arrays)


def _matvec_all(arrays, c):
    """Matrices read as the decode step reads them (a matrix-vector product), the rest summed."""
    return sum(jnp.sum(x @ jnp.full(x.shape[-1], 1 + c, x.dtype), dtype=jnp.float32) if x.ndim == 2
               else _sum_one(x, c) for x in arrays)


def _read_loop(read_all):
    """A jitted loop of k passes of `read_all`; each pass's input depends on the last one's result,
    so XLA cannot hoist the reads out of the loop."""
    @jax.jit
    def run(arrays, k):
        return jax.lax.fori_loop(0, k, lambda i, c: c + 1e-30 * read_all(arrays, c), jnp.float32(0))
    return run


def weight_streaming_floor(params, repeats: int = 5) -> dict:
    """Seconds to read every parameter array once, inside a compiled loop (the slope between a
    short and a long loop, like `decode_step_seconds`): {"seconds", "bytes", "gb_per_s", "by_method"}."""
    arrays = jax.tree.leaves(params)
    nbytes = sum(x.nbytes for x in arrays)
    by_method = {}
    for name, read_all in (("sum", _sum_all), ("matvec", _matvec_all)):
        run = _read_loop(read_all)
        by_method[name] = loop_step_seconds(lambda: arrays, lambda a, k, run=run: run(a, jnp.int32(k)),
                                            repeats=repeats)
    seconds = min(by_method.values())
    return {"seconds": seconds, "bytes": nbytes, "gb_per_s": nbytes / seconds / 1e9, "by_method": by_method}


def time_decode(decoder: AutoregressiveDecoder, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                policy: Policy = Greedy(), stop_tokens: Sequence[int] = (), repeats: int = 3) -> dict:
    """Median prefill and loop times of `decoder` on one batch (compilation excluded).

    Returns {"prefill_s", "loop_s", "total_s", "steps", "step_s", "tokens", "tokens_per_s", "result"}:
    `steps` counts loop iterations (forward passes after prefill); tokens per second counts every
    generated token of the batch over prefill + loop.
    """
    runs = []
    for _ in range(repeats + 1):  # the first run compiles
        start = time.perf_counter()
        state, stop_ids = decoder.start(prompts, policy=policy, max_new_tokens=max_new_tokens,
                                        stop_tokens=stop_tokens)
        jax.block_until_ready(state)
        prefilled = time.perf_counter()
        state = jax.block_until_ready(decoder.finish(state, stop_ids, policy=policy))
        runs.append((prefilled - start, time.perf_counter() - prefilled))
    prefill_s = statistics.median(r[0] for r in runs[1:])
    loop_s = statistics.median(r[1] for r in runs[1:])
    result = jax.device_get(state.result)
    steps = int(state.step) - 1
    tokens = int(result.num_generated_b.sum())
    return {"prefill_s": prefill_s, "loop_s": loop_s, "total_s": prefill_s + loop_s, "steps": steps,
            "step_s": loop_s / max(steps, 1), "tokens": tokens, "tokens_per_s": tokens / (prefill_s + loop_s),
            "result": result}
