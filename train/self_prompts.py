"""User messages written by the chat model itself (Magpie): more, and more chat-like, prompts to distil heads on.

    python -m train.self_prompts --model smollm2-135m-instruct --count 6400 --out data/distill/smollm2-135m-instruct/self-prompts
    python -m train.responses --model smollm2-135m-instruct --prompts-file data/distill/smollm2-135m-instruct/self-prompts \\
        --out data/distill/smollm2-135m-instruct/self-responses

An aligned chat model given its template up to the start of a user turn (system message included,
if the template writes one) writes a plausible user message: sampled at --temperature until the
turn ends, it yields requests of the kinds the model was tuned on (advice, writing, code, ...), where
the shared training prompts are mostly NLP-task prompts. Kept: messages that end their turn within
--max-tokens, are not empty, are not a repeat of an earlier one, and share no run of
--overlap-words words with any Spec-Bench question (the evaluation set is never trained on, not even
by the model's recollection of it). Shards of --shard-size generated messages (`shard-00000.jsonl`,
one {"prompt": text} a line, written atomically; the draws seeded by --seed and the shard), so a
rerun resumes; `config.json` records the settings and how many were kept and why the rest were not.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from train.common import check_same_settings, guarded_main

SENTINEL = "\u2063user\u2063"  # a user message no one writes: where the template puts the user's text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.self_prompts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="chat model directory or model name")
    p.add_argument("--out", type=Path, required=True, help="directory of the shards (rerun to resume)")
    p.add_argument("--count", type=int, default=6400, help="messages to generate (before filtering)")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=96, help="a message longer than this is dropped")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overlap-words", type=int, default=8, help="drop messages sharing a run of this many words "
                   "with a Spec-Bench question")
    p.add_argument("--questions", type=Path, help="Spec-Bench question file to keep away from (default: the shared one)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)  # guarded_main's flag
    return p.parse_args(argv)


def user_turn_prefix(template) -> list[int]:
    """Token ids of the template's conversation up to where a user message's text begins."""
    text = template.render(template.conversation(SENTINEL), add_generation_prompt=False)
    if SENTINEL not in text:
        raise ValueError(f"the chat template of {template.model_dir} does not write the user's message as given")
    return template.tokenizer.encode(text.split(SENTINEL, 1)[0], add_special_tokens=False).ids


def word_runs(text: str, n: int) -> set[tuple[str, ...]]:
    """Every run of n consecutive words (lower-cased, punctuation dropped)."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def drop_reason(tokens: list[int], text: str, stop: list[int], seen: set[str], evaluation: set, n: int) -> str | None:
    """Why a generated message is not kept (None: kept): it did not end its turn, says nothing,
    repeats an earlier message, or shares a run of n words with the evaluation set."""
    if not tokens or tokens[-1] not in stop:
        return "unfinished"
    if not text:
        return "empty"
    if text in seen:
        return "repeat"
    return "spec_bench_overlap" if word_runs(text, n) & evaluation else None


def written_prompts(directory: Path) -> list[str]:
    """The messages of every complete shard so far, in order (none before the first)."""
    from jaxaccel.training.prompts import read_prompt_file

    return [p.text for p in read_prompt_file(directory)] if any(directory.glob("shard-*.jsonl")) else []


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from jaxaccel.chat import ChatTemplate, has_chat_template
    from jaxaccel.decoding import AutoregressiveDecoder, make_policy
    from jaxaccel.decoding.text import load_model_tokenizer
    from jaxaccel.files import write_atomically, write_json_atomically
    from jaxaccel.heads.io import base_fingerprint
    from jaxaccel.hf import load_hf
    from jaxaccel.models import resolve_model
    from jaxaccel.spec_bench import read_questions

    args.model = resolve_model(args.model)
    for name in ("count", "shard_size", "batch_size", "max_tokens", "overlap_words"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0 (greedy would write one message), got {args.temperature}")
    if not has_chat_template(args.model):
        raise ValueError(f"{args.model} has no chat template: self-written prompts need a chat model")
    settings = {"base": base_fingerprint(args.model), "count": args.count, "shard_size": args.shard_size,
                "batch_size": args.batch_size, "max_tokens": args.max_tokens, "temperature": args.temperature,
                "seed": args.seed, "overlap_words": args.overlap_words}
    check_same_settings(args.out, settings, "prompts")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.out / "config.json", {"settings": settings, "model": str(args.model)})
    tokenizer = load_model_tokenizer(args.model)
    template = ChatTemplate.from_model_dir(args.model, tokenizer)
    prefix = user_turn_prefix(template)
    stop = list(template.stop_ids)
    evaluation = set().union(*(word_runs(turn, args.overlap_words) for q in read_questions(args.questions)
                               for turn in q.turns))
    decoder = AutoregressiveDecoder(load_hf(args.model))
    policy = make_policy(args.temperature)
    shards = -(-args.count // args.shard_size)
    seen = set(written_prompts(args.out))
    bar = tqdm(total=shards, unit="shard", disable=args.no_progress, dynamic_ncols=True)
    for s in range(shards):
        path = args.out / f"shard-{s:05d}.jsonl"
        if path.is_file():
            bar.update()
            continue
        size = min(args.shard_size, args.count - s * args.shard_size)
        kept, dropped = [], {"unfinished": 0, "empty": 0, "repeat": 0, "spec_bench_overlap": 0}
        for b in range(0, size, args.batch_size):
            n = min(args.batch_size, size - b)
            result = decoder.generate([prefix] * n, policy=policy, max_new_tokens=args.max_tokens, stop_tokens=stop,
                                      seed=args.seed * 1_000_003 + s * 1_000 + b // args.batch_size)
            for tokens in result.sequences():
                text = tokenizer.decode([t for t in tokens if t not in stop]).strip()
                reason = drop_reason(tokens, text, stop, seen, evaluation, args.overlap_words)
                if reason:
                    dropped[reason] += 1
                else:
                    seen.add(text)
                    kept.append(text)
        stats_file = args.out / "dropped.json"  # before the shard: a shard on disk always has its counts
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        write_json_atomically(stats_file, {**stats, path.name: dropped})
        lines = "".join(json.dumps({"prompt": t}) + "\n" for t in kept)
        write_atomically(path, lambda tmp, lines=lines: Path(tmp).write_text(lines, encoding="utf-8"))
        bar.update()
    bar.close()
    print(f"{len(written_prompts(args.out))} messages in {shards} shards under {args.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2."""
    return guarded_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
