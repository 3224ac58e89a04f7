"""`python -m infer.bench --step-costs`: what one decode step costs, as ratios measured in one run.
At a realistic cache fill (a prompt of 128 tokens prefilled), batch 1, every cost measured inside a
compiled loop (`timing.loop_step_seconds`: the slope between a short and a long run), as decoding
pays it, without a Python call's dispatch and copies:
(a) the verify pass cost curve: a forward over n tokens (a chain: causal mask; the tied LM head's
    [d, V] copy for n > 1 and its logits reduced to their greedy tokens, as verification does) / a
    forward over 1 token, n = 1, 2, 4, 8, 16;
(b) the AR loop's step / the weight-streaming floor;
(c) with --heads (or --drafter), the whole speculative step (`SpeculativeDecoder.step_seconds`: draft +
    verify + accept + commit) / the forward over its tree's node count, at the same cache size.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel.cache import KVCache
from jaxaccel.decoding.prompts import bucket_length
from jaxaccel.decoding.sampling import greedy_tokens
from jaxaccel.decoding.timing import loop_step_seconds
from jaxaccel.model import decode_layout

CHAIN_SIZES = (1, 2, 4, 8, 16)
PROMPT_LEN = 128
LOOP_STEPS = (4, 20)  # the short and the long run of every in-loop measurement


def chain_cache_len(prompt_len: int) -> int:
    """One cache size for the whole forward curve: the prompt's bucket and a few steps' tokens."""
    return bucket_length(prompt_len) + 64


def _prefill(graphdef, params, cache, tokens_bs, lengths_b):
    return nnx.merge(graphdef, params).prefill(tokens_bs, lengths_b, cache).cache


def _forwards(graphdef, params, cache, tokens_bn, steps):
    """`steps` forwards over the same n tokens after the cache (each writes the same slots); their
    greedy tokens summed, so that no part of the pass is dead code."""
    model = nnx.merge(graphdef, params)

    def body(_, carry):
        cache, total = carry
        out = model.forward(tokens_bn, cache=cache)  # causal mask, positions after the cache
        return out.cache, total + jnp.sum(greedy_tokens(out.logits))

    return jax.lax.fori_loop(0, steps, body, (cache, jnp.int32(0)))


_prefill_jit = jax.jit(_prefill, static_argnums=0, donate_argnames=("cache",))
_forwards_jit = jax.jit(_forwards, static_argnums=0, donate_argnames=("cache",))


class ForwardTimer:
    """Seconds of one forward over n tokens, inside a loop, after `prompt` is in a cache of `cache_len` slots."""

    def __init__(self, model, prompt: list[int], repeats: int):
        self.config = model.config
        self.graphdef, self.params = nnx.split(decode_layout(model))  # as a SpeculativeDecoder's verify
        self.prompt, self.repeats = prompt, repeats

    def seconds(self, n: int, cache_len: int) -> float:
        width = bucket_length(len(self.prompt))
        tokens_1s = jnp.zeros((1, width), jnp.int32).at[0, :len(self.prompt)].set(jnp.asarray(self.prompt))
        tokens_1n = jnp.asarray(self.prompt[:1] * n, jnp.int32)[None]

        def prepare():
            return _prefill_jit(self.graphdef, self.params, KVCache.create(self.config, 1, cache_len), tokens_1s,
                                jnp.array([len(self.prompt)], jnp.int32))

        def run(cache, steps):
            return _forwards_jit(self.graphdef, self.params, cache, tokens_1n, steps)

        short, long = LOOP_STEPS
        return loop_step_seconds(prepare, run, short=short, long=long, repeats=self.repeats)


def step_costs(model, model_dir: Path, prompt: list[int], *, heads_dirs=(), tree_specs=(None,), drafter_specs=(),
               repeats: int = 7) -> dict:
    """The three tables' numbers (seconds and ratios) for `model` with `prompt` (PROMPT_LEN tokens) in cache."""
    from infer.speculative_rows import make_decoders
    from jaxaccel.decoding.timing import decode_step_seconds, weight_streaming_floor

    timer = ForwardTimer(model, prompt, repeats)
    chain_cache = chain_cache_len(len(prompt))
    chain = {n: timer.seconds(n, chain_cache) for n in CHAIN_SIZES}
    decoders = make_decoders(model, model_dir, list(heads_dirs), list(tree_specs), list(drafter_specs))
    ar_step_s = decode_step_seconds(decoders["ar"][0], [prompt], steps=LOOP_STEPS)
    floor = weight_streaming_floor(nnx.state(model, nnx.Param))  # the weights, not their decode-time copies
    spec = []
    for name, (decoder, info) in decoders.items():
        if name == "ar" or not hasattr(decoder, "step_seconds"):
            continue
        nodes = decoder.tree.num_nodes
        step_s = decoder.step_seconds([prompt], steps=LOOP_STEPS)
        forward_s = timer.seconds(nodes, chain_cache)
        spec.append({"method": name, "num_nodes": nodes, "step_s": step_s, "forward_s": forward_s,
                     "step_over_forward": step_s / forward_s, **info})
    return {"prompt_len": len(prompt), "device": str(jax.devices()[0]), "in_loop_steps": list(LOOP_STEPS),
            "chain": [{"n": n, "forward_s": s, "over_forward_1": s / chain[1]} for n, s in chain.items()],
            "chain_cache_len": chain_cache,
            "ar": {"step_s": ar_step_s, "floor_s": floor["seconds"], "step_over_floor": ar_step_s / floor["seconds"],
                   "floor_gb_per_s": floor["gb_per_s"], "weights_mb": floor["bytes"] / 1e6},
            "speculative": spec}


def step_costs_markdown(report: dict, header: str) -> str:
    """The three tables."""
    lines = [header, "", f"(a) verify pass cost curve: forward over n tokens (chain, causal mask) / over 1 token "
             f"({report['prompt_len']} prompt tokens in a cache of {report['chain_cache_len']}, inside a loop)", "",
             "| n tokens | forward ms | / forward(1) |", "|---:|---:|---:|"]
    lines += [f"| {r['n']} | {r['forward_s'] * 1e3:.2f} | {r['over_forward_1']:.2f}x |" for r in report["chain"]]
    ar = report["ar"]
    lines += ["", "(b) AR loop step / weight-streaming floor", "",
              "| AR step ms | floor ms | step / floor | floor GB/s | weights MB |", "|---:|---:|---:|---:|---:|",
              f"| {ar['step_s'] * 1e3:.2f} | {ar['floor_s'] * 1e3:.2f} | {ar['step_over_floor']:.2f}x | "
              f"{ar['floor_gb_per_s']:.1f} | {ar['weights_mb']:.1f} |"]
    if report["speculative"]:
        lines += ["", "(c) speculative step (draft + verify + accept) / forward over the tree's nodes", "",
                  "| method | tree nodes | step ms | forward(nodes) ms | step / forward |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['num_nodes']} | {r['step_s'] * 1e3:.2f} | {r['forward_s'] * 1e3:.2f} | "
                  f"{r['step_over_forward']:.2f}x |" for r in report["speculative"]]
    return "\n".join(lines) + "\n"


def main_with(args) -> int:
    """`infer.bench --step-costs`: args from infer.bench (model, heads, tree, repeats, seed, out, argv)."""
    import shlex
    import sys

    from infer.bench import make_prompts
    from infer.generate import attention_override
    from jaxaccel.hf import load_hf

    if args.model is None:
        print("error: --step-costs needs --model DIR_OR_NAME", file=sys.stderr)
        return 2
    try:
        model = load_hf(args.model, **attention_override(args))
        prompt = make_prompts(args.model, model.config.vocab_size, 1, PROMPT_LEN, args.seed)[0]
        report = step_costs(model, args.model, prompt, heads_dirs=args.heads, tree_specs=args.tree or [None],
                            drafter_specs=getattr(args, "drafter", []), repeats=max(2 * args.repeats + 1, 3))
    except (ValueError, FileNotFoundError) as e:  # HeadsMismatchError and ModelDirectoryError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"command": "python -m infer.bench " + shlex.join(args.argv), "model": str(args.model), **report}
    table = step_costs_markdown(report, f"model: {args.model} ({report['device']}), batch 1, step costs as ratios "
                                        f"measured in one run")
    print(table, end="")
    if args.out:
        from jaxaccel.files import write_report

        write_report(args.out, "step_costs", report, table)
    return 0
