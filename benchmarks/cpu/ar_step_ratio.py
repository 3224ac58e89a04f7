"""The AR step against the weight-streaming floor, and a forward over 8 tokens against one, in rounds
alternating in one process (every figure inside a compiled loop, as `infer.bench --step-costs`
measures it, without that command's speculative rows). For A/B runs of a change: run it in a
checkout before and after the change, in turns.

    PYTHONPATH=. python benchmarks/cpu/ar_step_ratio.py [--model smollm2-135m-instruct] [--rounds 3] [--label NAME]
"""
from __future__ import annotations

import argparse

from flax import nnx

from infer.bench import make_prompts
from infer.speculative_rows import make_decoders
from infer.step_costs import LOOP_STEPS, PROMPT_LEN, ForwardTimer, chain_cache_len
from jaxaccel.decoding.timing import decode_step_seconds, weight_streaming_floor
from jaxaccel.hf import load_hf
from jaxaccel.models import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--label", default="this checkout")
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    model = load_hf(model_dir)
    prompt = make_prompts(model_dir, model.config.vocab_size, 1, PROMPT_LEN, 0)[0]
    timer = ForwardTimer(model, prompt, repeats=5)
    decoder = make_decoders(model, model_dir, [], [None], [])["ar"][0]
    cache_len = chain_cache_len(len(prompt))  # as --step-costs
    for _ in range(args.rounds):
        floor_s = weight_streaming_floor(nnx.state(model, nnx.Param))["seconds"]
        ar_s = decode_step_seconds(decoder, [prompt], steps=LOOP_STEPS)
        one_s, eight_s = timer.seconds(1, cache_len), timer.seconds(8, cache_len)
        print(f"{args.label}: floor {floor_s * 1e3:.2f} ms, AR step {ar_s * 1e3:.2f} ms ({ar_s / floor_s:.2f}x), "
              f"forward over 1 / 8 tokens {one_s * 1e3:.2f} / {eight_s * 1e3:.2f} ms ({eight_s / one_s:.2f}x)",
              flush=True)


if __name__ == "__main__":
    main()
