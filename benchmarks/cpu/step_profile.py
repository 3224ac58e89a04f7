"""Where a compiled decode step's time goes: XLA:CPU's per-operation trace of the decode loop,
attributed to the phase of the step (drafter.draft, the verify forward, verify_tree, the commits)
and to the source function that emitted each operation.

    python benchmarks/cpu/step_profile.py --model smollm2-135m-instruct --method ar --method eagle3 \
        [--heads auto] [--drafter share --method share] [--prompt-len 128] [--steps 24] \
        > benchmarks/cpu/smollm2_step_profile.md

Each method runs `advance` over --steps steps of its compiled loop under `jax.profiler`; the
trace's operation events (thunks, named after HLO instructions) are matched to the compiled
program's instructions, whose stack frames name the Python functions that built them. Operation
times are summed over both cores' threads, so a step's sum can exceed its wall time; "(no stack)"
collects instructions without a stack frame (XLA:CPU's library dots at n = 1 among them).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import shlex
import sys
import tempfile

import jax
import jax.numpy as jnp

from infer.bench import make_prompts
from infer.speculative_rows import make_decoders
from jaxaccel.decoding import autoregressive, speculative
from jaxaccel.decoding.sampling import Greedy
from jaxaccel.hf import load_hf
from jaxaccel.models import resolve_model

PHASES = ("decode_step", "verify_tree", "KVCache.keep", "DecodeResult.append", "Transformer.forward")


def compiled_text(decoder, state, stop_ids, policy) -> str:
    """The optimized HLO (with its stack-frame tables) of the decoder's chunk loop."""
    if isinstance(decoder, speculative.SpeculativeDecoder):
        lowered = speculative.spec_chunk_jit.lower(decoder.graphdef, decoder.params, decoder.module_graphdef,
                                                   decoder.module_params, state, stop_ids, jnp.int32(1),
                                                   policy=policy, drafter=decoder.drafter)
    else:
        lowered = autoregressive.decode_chunk_jit.lower(decoder.graphdef, decoder.params, state, stop_ids,
                                                        jnp.int32(1), policy=policy)
    return lowered.compile().as_text()


def instruction_stacks(hlo: str) -> dict[str, list[tuple[str, str]]]:
    """HLO instruction name -> its stack, innermost first, as (file, function)."""
    tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    section = None
    for line in hlo.splitlines():
        if line in tables:
            section = line
            continue
        if section and not line.strip():
            section = None
        elif section:
            index, _, rest = line.partition(" ")
            fields = dict(re.findall(r"(\w+)=(\d+)", rest))
            tables[section][int(index)] = fields or rest.strip('"')
    files, functions, locations, frames = (tables[k] for k in tables)

    def stack(frame: int) -> list[tuple[str, str]]:
        out = []
        while frame in frames:  # a frame's parent_frame_id is one past its parent's index (0: none)
            location = locations[int(frames[frame]["file_location_id"])]
            out.append((files[int(location["file_name_id"])].rsplit("/", 1)[-1],
                        functions[int(location["function_name_id"])]))
            frame = int(frames[frame]["parent_frame_id"]) - 1
        return out

    stacks = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if m:
            frame = re.search(r"stack_frame_id=(\d+)", line)
            stacks[m.group(1)] = stack(int(frame.group(1))) if frame else []
    return stacks


def phase_of(function: str) -> str | None:
    """The phase a function belongs to; any drafter's draft/commit method counts as the protocol's."""
    if re.search(r"\.(sample_)?draft\b", function):
        return "Drafter.draft"
    if re.search(r"\.commit\b", function):
        return "Drafter.commit"
    return next((p for p in PHASES if p in function), None)


def attribute(stack: list[tuple[str, str]]) -> tuple[str, str]:
    """(phase, innermost function) of an instruction."""
    if not stack:
        return "(no stack)", ""
    phase = next((p for _, fn in stack if (p := phase_of(fn))), "(loop)")  # the innermost phase
    return phase, f"{stack[0][0]}:{stack[0][1]}"


def profile(decoder, prompt, steps: int, policy=Greedy()) -> dict:
    def run(k):
        state, stop_ids = decoder.start([prompt], policy=policy, max_new_tokens=(steps + 1) * 16)
        jax.block_until_ready(state)
        return jax.block_until_ready(decoder.advance(state, stop_ids, policy=policy, max_steps=k)), stop_ids

    run(steps)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        run(steps)
        jax.profiler.stop_trace()
        events = json.load(gzip.open(glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz")[0]))
    state, stop_ids = decoder.start([prompt], policy=policy, max_new_tokens=(steps + 1) * 16)
    stacks = instruction_stacks(compiled_text(decoder, state, stop_ids, policy))
    by_phase, by_function = collections.Counter(), collections.Counter()
    wall = 0.0
    for e in events["traceEvents"] if isinstance(events, dict) else events:
        if e.get("ph") != "X":
            continue
        if e["name"] == "ThunkExecutor::Execute (wait for completion)":
            wall += e.get("dur", 0)
        if e["name"] in stacks and not e["name"].startswith("while"):  # a loop's event spans its body's
            phase, function = attribute(stacks[e["name"]])
            by_phase[phase] += e.get("dur", 0)
            by_function[(phase, function)] += e.get("dur", 0)
    scale = 1e-3 / steps  # microseconds summed over the run -> ms per step
    return {"wall_ms": wall * scale, "ops_ms": sum(by_phase.values()) * scale,
            "by_phase": {k: v * scale for k, v in by_phase.most_common()},
            "by_function": [(p, f, v * scale) for (p, f), v in by_function.most_common(12)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--heads", action="append", default=None)
    parser.add_argument("--method", action="append", default=None,
                        help="ar and/or a row name (eagle3, a --drafter spec, ...)")
    parser.add_argument("--drafter", action="append", default=None, help="a training-free drafter's row (share, ...)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    model = load_hf(model_dir)
    prompt = make_prompts(model_dir, model.config.vocab_size, 1, args.prompt_len, 0)[0]
    decoders = make_decoders(model, model_dir, args.heads or ["auto"], ["auto"], args.drafter or [])
    print(f"`python benchmarks/cpu/step_profile.py {shlex.join(sys.argv[1:])}` — {args.prompt_len}-token prompt, "
          f"{args.steps} steps, {jax.devices()[0]}; ms per step (operation times summed over threads)\n")
    for method in args.method or ["ar"]:
        report = profile(decoders[method][0], prompt, args.steps)
        print(f"### {method}: {report['wall_ms']:.2f} ms wall per step under the profiler, "
              f"{report['ops_ms']:.2f} ms of operations\n\n| phase | ms/step |\n|---|---:|")
        print("\n".join(f"| {k} | {v:.2f} |" for k, v in report["by_phase"].items()))
        print("\n| phase | innermost function | ms/step |\n|---|---|---:|")
        print("\n".join(f"| {p} | {f} | {v:.2f} |" for p, f, v in report["by_function"]) + "\n")


if __name__ == "__main__":
    main()
