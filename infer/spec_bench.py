"""Spec-Bench on any model: ar vs each heads directory (and optional peers), per category and overall.

    python -m infer.spec_bench --model smollm2-135m-instruct --heads HEADS_DIR --out runs/spec_bench
    python -m infer.spec_bench --model small --no-chat --heads H --limit 2 --max-new-tokens 32 --json
    python -m infer.spec_bench --model smollm2-135m-instruct --limit 1 --peers transformers --out DIR
    python -m infer.spec_bench --model smollm2-135m-instruct --drafter pld --drafter recycling --limit 2

Questions: Spec-Bench's `question.jsonl` (`--questions FILE` in the same format), first turn only,
through the model's chat template (a model without one, or `--no-chat`: the plain question text); `--limit N`
keeps the first N of each category in file order, `--subtask NAME` only that subtask's (repeatable).
Each question is decoded at batch 1 by every method in turn (question-major, so load on a shared
machine falls on all methods alike), greedy by default, up to --max-new-tokens, stopping on the
model's EOS and the template's end of turn.
Questions that do not fit the model's context with --max-new-tokens (and the largest tree) are
skipped and counted.

Per category: tokens/s = the category's tokens over its total decode time (prefill + loop; each
prompt-length bucket is compiled, and each method run once, before any timing), mean accepted tokens = tokens / forward passes
(the base's own token counted), speedup = tokens/s / ar's in the same category, identical_to_ar
(T = 0: every question's tokens equal ar's). "multi-turn conversation" pools MT-bench's eight
categories and "overall" pools all, as Spec-Bench's leaderboard does.

Peers (`--peers transformers llama.cpp`, see infer/spec_bench_peers.py): transformers `generate` and
its prompt lookup decoding (float32, torch CPU); llama.cpp (the `bench` extra) and its prompt lookup
on the named model's original GGUF file and on a float32 copy of it; greedy, precision per row.
Bad input (unknown model, malformed question file, --limit < 1) exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from infer.arguments import add_speculative_arguments
from infer.spec_bench_peers import PEER_NAMES
from jaxaccel.spec_bench import MT_BENCH, SUBTASKS

EXIT_BAD_INPUT = 2
OVERALL = "overall"
POOLED = {"multi-turn conversation": MT_BENCH}  # the leaderboard's one subtask of several categories


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m infer.spec_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model name (python -m infer.models) or model directory")
    add_speculative_arguments(p, repeatable=True)
    p.add_argument("--questions", type=Path, help="question file in Spec-Bench's format (default: the shared one)")
    p.add_argument("--no-chat", action="store_true", help="plain question text, no chat template (the default "
                   "for a model without one)")
    p.add_argument("--limit", type=int, help="first N questions of each category (file order)")
    p.add_argument("--subtask", action="append", choices=list(SUBTASKS), help="only this Spec-Bench subtask's "
                   "questions (repeat for several; default: all)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (identical to ar is checked)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", nargs="+", choices=PEER_NAMES, default=[], help="peer methods in the same run "
                   "(llama.cpp needs a model name and the bench extra)")
    p.add_argument("--peer-threads", type=int, help="threads for the peers (torch, llama.cpp; default: all cores)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--out", type=Path, help="directory for spec_bench.json and spec_bench.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-compilation-cache", action="store_true", help="compile everything afresh (default: JAX's "
                   "persistent cache, $JAXACCEL_CACHE_DIR or ~/.cache/jaxaccel/jax-compilation; timing never includes it)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the first flag out of range."""
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")


def encode_questions(questions, model_dir: Path, chat: bool) -> tuple[list[list[int]], list[int]]:
    """(token ids per question's first turn, end-of-turn stop ids): through the chat template, or
    the plain text as the tokenizer encodes it (`chat` False)."""
    from jaxaccel.chat import ChatTemplate
    from jaxaccel.decoding.text import encode_prompts, load_model_tokenizer

    tokenizer = load_model_tokenizer(model_dir)
    if not chat:
        return encode_prompts(tokenizer, [q.turns[0] for q in questions]), []
    template = ChatTemplate.from_model_dir(model_dir, tokenizer)
    return [template.encode(template.conversation(q.turns[0])) for q in questions], list(template.stop_ids)


def compile_buckets(decoders: dict, prompts: list[list[int]], *, policy, max_new_tokens: int, stop) -> None:
    """Compiles every decoder once per prompt-length bucket and runs it once, so that no timed call
    compiles or warms up."""
    from jaxaccel.decoding.prompts import bucket_length

    first_of_bucket = {}
    for p in prompts:
        first_of_bucket.setdefault(bucket_length(len(p)), p)
    for decoder, _ in decoders.values():
        for p in first_of_bucket.values():
            decoder.compile([p], policy=policy, max_new_tokens=max_new_tokens, stop_tokens=stop)
        # The first executed call still pays one-off costs (1.5-3.5 s seen on our AR's first question).
        decode_once(decoder, prompts[0], policy=policy, max_new_tokens=max_new_tokens, stop=stop, seed=0)
        if hasattr(decoder, "reset"):  # a drafter that learns across calls starts the timed run afresh
            decoder.reset()


def decode_once(decoder, prompt: list[int], *, policy, max_new_tokens: int, stop, seed: int):
    """(tokens, seconds, forward passes, prefill seconds) of one batch-1 decode; seconds = prefill + loop."""
    import jax

    start = time.perf_counter()
    state, stop_ids = decoder.start([prompt], policy=policy, max_new_tokens=max_new_tokens, stop_tokens=stop,
                                    seed=seed)
    jax.block_until_ready(state)  # the prefill's share is reported beside tokens/s; the sync costs microseconds
    prefill_s = time.perf_counter() - start
    state = jax.block_until_ready(decoder.finish(state, stop_ids, policy=policy))
    seconds = time.perf_counter() - start
    result = jax.device_get(state.result)
    return result.sequences()[0], seconds, int(result.num_steps_b.sum()), prefill_s


def run_questions(decoders: dict, peers: dict, questions, prompts, *, policy, max_new_tokens: int, stop, seed: int,
                  progress: bool) -> dict[str, list[dict]]:
    """Method -> one record per question {category, tokens, seconds, passes}; question-major."""
    from tqdm import tqdm

    runs = {name: [] for name in [*decoders, *peers]}
    bar = tqdm(total=len(prompts) * len(runs), desc="spec_bench", unit="decode", disable=not progress,
               file=sys.stderr)
    for q, prompt in zip(questions, prompts):
        for name in runs:
            if name in decoders:
                tokens, seconds, passes, prefill_s = decode_once(decoders[name][0], prompt, policy=policy,
                                                                 max_new_tokens=max_new_tokens, stop=stop, seed=seed)
            else:  # transformers' generate does not say how long its prefill took
                (tokens, seconds, passes), prefill_s = peers[name].run(prompt), None
            runs[name].append({"question_id": q.question_id, "category": q.category, "prompt_len": len(prompt),
                               "tokens": tokens, "seconds": seconds, "prefill_seconds": prefill_s, "passes": passes})
            bar.update()
    bar.close()
    return runs


def pooled_stats(records: list[dict], ar_records: list[dict], greedy: bool) -> dict:
    """tokens/s, mean accepted tokens and identical-to-ar over a group of questions."""
    tokens = sum(len(r["tokens"]) for r in records)
    seconds = sum(r["seconds"] for r in records)
    passes = sum(r["passes"] for r in records)
    prefill = [r["prefill_seconds"] for r in records]
    return {"tokens": tokens, "seconds": seconds, "num_questions": len(records),
            "prefill_seconds": None if None in prefill else sum(prefill),
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "mean_accepted_tokens": tokens / passes if passes else 0.0,
            "identical_to_ar": all(r["tokens"] == a["tokens"] for r, a in zip(records, ar_records)) if greedy else None}


def make_rows(runs: dict[str, list[dict]], info: dict[str, dict], greedy: bool) -> list[dict]:
    """A row per method and group: each category, each pooled subtask, and overall."""
    categories = list(dict.fromkeys(r["category"] for r in runs["ar"]))
    groups = {c: (c,) for c in categories}
    groups |= {name: cats for name, cats in POOLED.items() if any(c in cats for c in categories)}
    groups[OVERALL] = tuple(categories)
    rows = []
    for group, cats in groups.items():
        ar = pooled_stats([r for r in runs["ar"] if r["category"] in cats], [], False)
        for method, records in runs.items():
            mine = [i for i, r in enumerate(records) if r["category"] in cats]
            stats = pooled_stats([records[i] for i in mine], [runs["ar"][i] for i in mine], greedy)
            rows.append({"method": method, "category": group, **stats,
                         "speedup": stats["tokens_per_s"] / ar["tokens_per_s"] if ar["tokens_per_s"] else 0.0,
                         **info[method]})
    return rows


def spec_bench(args: argparse.Namespace) -> dict:
    """Runs the benchmark; returns the report (rows, skipped questions, settings, the command)."""
    import jax
    import numpy as np

    from infer.spec_bench_peers import make_peers
    from infer.speculative_rows import make_decoders
    from jaxaccel.chat import has_chat_template
    from jaxaccel.decoding import make_policy
    from jaxaccel.decoding.text import stop_tokens
    from jaxaccel.hf import load_hf
    from jaxaccel.models import resolve_model
    from jaxaccel.spec_bench import first_per_category, read_questions

    began = time.perf_counter()
    model_dir = resolve_model(args.model)
    questions = first_per_category(read_questions(args.questions), args.limit)
    if args.subtask:
        questions = [q for q in questions if q.subtask in args.subtask]
        if not questions:
            raise ValueError(f"no questions of subtask {', '.join(args.subtask)} in "
                             f"{args.questions or 'the Spec-Bench question file'}")
    model = load_hf(model_dir)
    decoders = make_decoders(model, model_dir, args.heads, args.tree or [None], args.drafter)
    chat = not args.no_chat and has_chat_template(model_dir)  # a base model reads the plain question
    prompts, turn_end = encode_questions(questions, model_dir, chat)
    stop = sorted(set(stop_tokens(model.config, model_dir)) | set(turn_end))
    # The speculative cache also holds one tree of unaccepted K/V past the generated tokens.
    room = model.config.max_position_embeddings - args.max_new_tokens - max(
        (info.get("num_nodes", 0) for _, info in decoders.values()), default=0)
    fits = [len(p) <= room for p in prompts]
    skipped = {}
    for q, ok in zip(questions, fits):
        if not ok:
            skipped[q.category] = skipped.get(q.category, 0) + 1
    questions = [q for q, ok in zip(questions, fits) if ok]
    prompts = [p for p, ok in zip(prompts, fits) if ok]
    if not prompts:
        raise ValueError(f"no question fits in the model's context of {model.config.max_position_embeddings} "
                         f"positions with --max-new-tokens {args.max_new_tokens}")
    policy = make_policy(args.temperature)
    compile_began = time.perf_counter()
    compile_buckets(decoders, prompts, policy=policy, max_new_tokens=args.max_new_tokens, stop=stop)
    compile_s = time.perf_counter() - compile_began
    peers = make_peers(args.peers, str(args.model), model_dir, stop, args.max_new_tokens,
                       model.config.max_position_embeddings, args.peer_threads)
    for peer in peers.values():  # a peer's first call pays for allocations; not timed
        peer.run(prompts[0])
    ours = str(np.dtype(jax.tree.leaves(decoders["ar"][0].params)[0].dtype))
    info = {name: {"precision": f"{ours} (jax {jax.devices()[0].platform})", "peer": False, **extra}
            for name, (_, extra) in decoders.items()}
    info |= {name: {"precision": peer.precision, "peer": True} for name, peer in peers.items()}
    runs = run_questions(decoders, peers, questions, prompts, policy=policy, max_new_tokens=args.max_new_tokens,
                         stop=stop, seed=args.seed, progress=not args.no_progress)
    return {"command": "python -m infer.spec_bench " + shlex.join(args.argv), "model": str(model_dir),
            "device": str(jax.devices()[0]), "num_params": model.config.num_params(),
            "chat": chat, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
            "limit": args.limit, "num_questions": len(questions),
            "skipped_too_long": {"total": sum(skipped.values()), "by_category": skipped},
            "rows": make_rows(runs, info, args.temperature == 0),
            "questions": {name: [{k: v for k, v in r.items() if k != "tokens"} | {"num_tokens": len(r["tokens"])}
                                 for r in records] for name, records in runs.items()},
            "compile_s": compile_s, "seconds": time.perf_counter() - began,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv=None) -> int:
    """Entry point: prints the tables (or JSON), writes --out; bad input exits with status 2."""
    from infer.spec_bench_markdown import markdown

    args = parse_args(argv)
    try:
        check_args(args)
        if not args.no_compilation_cache:  # a rerun skips most compiles (they are never timed either way)
            from jaxaccel.compilation_cache import enable_compilation_cache

            enable_compilation_cache()
        report = spec_bench(args)
    except (ValueError, FileNotFoundError) as e:  # ModelCacheError, ModelDirectoryError, HeadsMismatchError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    table = markdown(report)
    print(json.dumps(report, indent=1) if args.json else table, end="\n" if args.json else "")
    if args.out:
        from jaxaccel.files import write_report

        write_report(args.out, "spec_bench", report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
