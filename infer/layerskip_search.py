"""Search the layers the layer-skip drafter skips for a model, and record them beside it.

    python -m infer.layerskip_search --model smollm2-135m-instruct [--depth 3] [--prompts 4]

Scores skip sets by speculative decoding (T = 0) on a few training prompts (never Spec-Bench's
questions; ../shared/data/train_prompts) and writes the best to MODEL_DIR/layerskip.json with
this command, which `--drafter layerskip` then uses by default (jaxaccel.drafters.layerskip_search
describes the objective). Bad arguments exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infer.layerskip_search", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory or prepared name")
    p.add_argument("--depth", type=int, default=3, help="drafted tokens per step (the drafter's depth=)")
    p.add_argument("--prompts", type=int, default=4, help="training prompts to score on")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens decoded per prompt and skip set")
    p.add_argument("--rounds", type=int, default=4, help="rounds of one-layer changes after the first batch")
    p.add_argument("--sets-per-batch", type=int, default=16, help="skip sets scored together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify-cost", type=float, help="a verify pass over depth + 1 tokens in 1-token passes "
                   "(default: measured; on a busy machine, give a quiet machine's figure)")
    p.add_argument("--prompts-dir", help="training prompt files (default: ../shared/data/train_prompts)")
    p.add_argument("--dry-run", action="store_true", help="print the result, write nothing")
    args = p.parse_args(argv)
    for name in ("depth", "prompts", "max_new_tokens", "sets_per_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def run(args) -> dict:
    import json

    from jaxaccel.chat import ChatTemplate
    from jaxaccel.decoding.text import load_model_tokenizer
    from jaxaccel.drafters.layerskip import RECORD_FILE
    from jaxaccel.drafters.layerskip_search import search_skip
    from jaxaccel.files import write_json_atomically
    from jaxaccel.hf import load_hf
    from jaxaccel.models import resolve_model
    from jaxaccel.training.prompts import read_train_prompts

    model_dir = resolve_model(args.model)
    model = load_hf(model_dir)
    tokenizer = load_model_tokenizer(model_dir)
    template = ChatTemplate.from_model_dir(model_dir, tokenizer)
    texts = [p.text for p in read_train_prompts(args.prompts_dir)[:args.prompts]]
    prompts = [template.encode(template.conversation(t)) for t in texts]
    result = search_skip(model, prompts, depth=args.depth, rounds=args.rounds, sets_per_batch=args.sets_per_batch,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, verify=args.verify_cost,
                         log=lambda line: print(line, file=sys.stderr))
    record = {"command": "python -m infer.layerskip_search " + shlex.join(args.argv), "model": str(model_dir),
              "prompts": texts, "result": result}
    if not args.dry_run:
        write_json_atomically(model_dir / RECORD_FILE, record)
    print(json.dumps({k: result[k] for k in ("skip", "depth", "mean_accepted_tokens", "step_cost", "objective")}))
    if result["objective"] <= 1:
        print(f"note: no skip set tried beats plain decoding on these prompts ({result['objective']:.2f} tokens per "
              f"1-token pass of the base; plain decoding makes 1)", file=sys.stderr)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
