"""Decoding with and without the weights' decode-time layouts (`jaxaccel.model.decode_layout`: the
CPU panel kernel's packed copies, or without it the [d, V] copy of a tied LM head), in one process:
AR and each method's decoder twice (with the layouts, "new"; without, "old"), every Spec-Bench
category's first question decoded by each in turn, twice; ms per forward pass and speedup vs old AR.

    python benchmarks/cpu/verify_head_ab.py --model gemma3-270m --drafter pld:depth=2 --drafter recycling
    python benchmarks/cpu/verify_head_ab.py --model smollm2-135m-instruct --heads auto --tree auto --chat
"""
from __future__ import annotations

import argparse

import jax

import jaxaccel.decoding.autoregressive as autoregressive
import jaxaccel.decoding.speculative as speculative
from infer.spec_bench import decode_once, encode_questions
from infer.speculative_rows import make_decoders
from jaxaccel.decoding.sampling import Greedy
from jaxaccel.hf import load_hf
from jaxaccel.models import resolve_model
from jaxaccel.spec_bench import DEFAULT_QUESTIONS, first_per_category, read_questions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--heads", action="append", default=[])
    p.add_argument("--tree", default=None)
    p.add_argument("--drafter", action="append", default=[])
    p.add_argument("--chat", action="store_true", help="questions through the chat template")
    p.add_argument("--questions", type=int, default=5, help="categories' first questions to decode")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    model_dir = resolve_model(args.model)
    model = load_hf(model_dir)
    new = make_decoders(model, model_dir, args.heads, [args.tree], args.drafter)
    with_copies = speculative.decode_layout
    speculative.decode_layout = autoregressive.decode_layout = lambda m: m
    old = make_decoders(model, model_dir, args.heads, [args.tree], args.drafter)
    speculative.decode_layout = autoregressive.decode_layout = with_copies
    decoders = {}
    for name in new:
        decoders[f"{name} old"], decoders[f"{name} new"] = old[name][0], new[name][0]
    prompts, _ = encode_questions(first_per_category(read_questions(DEFAULT_QUESTIONS), 1), model_dir, args.chat)
    policy, totals = Greedy(), {name: [0.0, 0] for name in decoders}
    for prompt in prompts[:args.questions]:
        for decoder in decoders.values():
            decoder.compile([prompt], policy=policy, max_new_tokens=args.max_new_tokens)
        for _ in range(2):
            for name, decoder in decoders.items():
                _, seconds, passes, prefill_s = decode_once(decoder, prompt, policy=policy,
                                                            max_new_tokens=args.max_new_tokens, stop=[], seed=0)
                totals[name][0] += seconds - prefill_s  # the loop alone
                totals[name][1] += passes
    ar_s, ar_passes = totals["ar old"]
    print(f"{args.model}, {jax.devices()[0]}, {args.questions} questions x 2, {args.max_new_tokens} new tokens\n")
    print("| method | ms per pass | pass / old AR step | speedup vs old AR |\n|---|---:|---:|---:|")
    for name, (s, passes) in totals.items():
        print(f"| {name} | {s / passes * 1e3:.2f} | {s / passes / (ar_s / ar_passes):.3f} | {ar_s / s:.3f}x |")


if __name__ == "__main__":
    main()
