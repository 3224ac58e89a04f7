"""The base model's own answers to the training prompts: the targets of self-distilled draft heads.

    python -m train.responses --model smollm2-135m-instruct --out runs/smollm2/responses

Each prompt of `../shared/data/train_prompts/` (never Spec-Bench) becomes one user message, goes
through the model's chat template (`--no-chat`: plain text, for base models) and is answered
greedily by our autoregressive loop, in batches of prompts of similar length, until the
template's end of turn or --max-new-tokens. `--temperature T` samples the answers instead (more
training text from the same prompts: write them to another --out and train on both feature
directories); the draws are seeded by --seed, the shard and the batch, so a resumed run draws the
same. Prompts are taken in a seeded order and written in shards of --shard-size (`shard-00000.jsonl`, ..., each written atomically when complete), so a
run killed at any point and restarted with the same command goes on from the first missing
shard, and a partial run already covers every source file. `config.json` records the model's
fingerprint and the settings; a restart with another model or other settings is an error.
One JSON object per answer: key, source, index, prompt_ids, response_ids, finish_reason.
`--prompts-file` answers other prompts instead (train.self_prompts' messages written by the model
itself), keyed by that file's name and row; the held-out split applies to them alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.common import check_same_settings, guarded_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.responses", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or model name")
    p.add_argument("--out", type=Path, required=True, help="directory of the shards (rerun to resume)")
    p.add_argument("--prompts-dir", type=Path, help="training prompt files (default: ../shared/data/train_prompts)")
    p.add_argument("--prompts-file", type=Path, help="answer these prompts instead: a JSON-lines file of "
                   "{\"prompt\": text}, or a directory of such shards (train.self_prompts' output)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts (or ones that leave no room "
                   "for --max-new-tokens in the context) are skipped")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--shard-size", type=int, default=256, help="prompts per shard file")
    p.add_argument("--limit", type=int, help="only the first N prompts of the seeded order")
    p.add_argument("--seed", type=int, default=0, help="prompt order")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy answers; > 0: sampled ones")
    p.add_argument("--no-chat", action="store_true", help="plain prompts, no chat template (base models)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)  # guarded_main's flag
    return p.parse_args(argv)


def settings(args: argparse.Namespace, fingerprint: dict) -> dict:
    """What a shard's content depends on: a restart must match it exactly."""
    return {"base": fingerprint, "max_new_tokens": args.max_new_tokens, "max_prompt_tokens": args.max_prompt_tokens,
            "seed": args.seed, "shard_size": args.shard_size, "chat": not args.no_chat,
            "prompts_dir": str(args.prompts_dir or "../shared/data/train_prompts"),
            **({"prompts_file": str(args.prompts_file)} if args.prompts_file else {}),
            **({"temperature": args.temperature} if args.temperature else {})}  # greedy runs predate the flag


def encode_all(args, tokenizer, prompts) -> list[list[int]]:
    """Token ids of each prompt: through the chat template, or as plain text."""
    if args.no_chat:
        return [e.ids for e in tokenizer.encode_batch([p.text for p in prompts])]
    from jaxaccel.chat import ChatTemplate

    template = ChatTemplate.from_model_dir(args.model, tokenizer)
    return [template.encode(template.conversation(p.text)) for p in prompts]


def answer_shard(decoder, records: list[dict], *, batch_size: int, max_new_tokens: int, stop: list[int],
                 on_batch, temperature: float = 0.0, seed: int = 0) -> None:
    """Fills `response_ids` and `finish_reason` of each record, batching prompts of similar length
    (sampled at `temperature` > 0, batch k drawing with seed `seed` + k)."""
    from jaxaccel.decoding import make_policy, pad_batch

    policy = make_policy(temperature)

    order = sorted(range(len(records)), key=lambda i: len(records[i]["prompt_ids"]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = pad_batch([records[i]["prompt_ids"] for i in rows], batch_size)
        result = decoder.generate(batch, policy=policy, max_new_tokens=max_new_tokens, stop_tokens=stop,
                                  seed=seed + start // batch_size)
        for i, tokens in zip(rows, result.sequences()):
            records[i]["response_ids"] = [int(t) for t in tokens]
            records[i]["finish_reason"] = "stop" if tokens and tokens[-1] in stop else "length"
        on_batch(len(rows))


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from jaxaccel.decoding import AutoregressiveDecoder
    from jaxaccel.decoding.text import load_model_tokenizer, stop_tokens
    from jaxaccel.files import write_atomically, write_json_atomically
    from jaxaccel.heads.io import base_fingerprint
    from jaxaccel.hf import load_hf
    from jaxaccel.models import resolve_model
    from jaxaccel.training.prompts import read_prompt_file, read_train_prompts

    args.model = resolve_model(args.model)  # a name is prepared on first use

    for name in ("max_new_tokens", "max_prompt_tokens", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    wanted = settings(args, base_fingerprint(args.model))
    prompts = read_prompt_file(args.prompts_file) if args.prompts_file else read_train_prompts(args.prompts_dir)
    if args.prompts_file:  # the shards follow a seeded order of all the prompts: a grown file would reshuffle them
        wanted["num_prompts"] = len(prompts)
    check_same_settings(args.out, wanted, "responses")
    args.out.mkdir(parents=True, exist_ok=True)
    config_file = args.out / "config.json"

    order = np.random.default_rng(args.seed).permutation(len(prompts))
    prompts = [prompts[i] for i in order][:args.limit]
    model = load_hf(args.model)
    tokenizer = load_model_tokenizer(args.model)
    ids = encode_all(args, tokenizer, prompts)
    stop = stop_tokens(model.config, args.model)
    if not args.no_chat:
        from jaxaccel.chat import ChatTemplate

        stop = sorted(set(stop) | set(ChatTemplate.from_model_dir(args.model, tokenizer).stop_ids))
    room = min(args.max_prompt_tokens, model.config.max_position_embeddings - args.max_new_tokens)
    kept = [(p, i) for p, i in zip(prompts, ids) if len(i) <= room]  # the rest: too long to answer here
    write_json_atomically(config_file, {"settings": wanted, "model": str(args.model), "prompts": len(prompts),
                                        "kept": len(kept), "skipped_too_long": len(prompts) - len(kept),
                                        "sources": sorted({p.source for p in prompts}), "stop_ids": stop})
    decoder = AutoregressiveDecoder(model)
    shards = [kept[s:s + args.shard_size] for s in range(0, len(kept), args.shard_size)]
    done = [s for s in range(len(shards)) if (args.out / f"shard-{s:05d}.jsonl").is_file()]
    bar = tqdm(total=len(kept), initial=sum(len(shards[s]) for s in done), unit="prompt",
               disable=args.no_progress, dynamic_ncols=True)
    for s, shard in enumerate(shards):
        path = args.out / f"shard-{s:05d}.jsonl"
        if path.is_file():
            continue
        records = [{"key": p.key, "source": p.source, "index": p.index, "prompt_ids": i} for p, i in shard]
        answer_shard(decoder, records, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, stop=stop,
                     on_batch=bar.update, temperature=args.temperature, seed=args.seed * 1_000_003 + s * 1_000)
        lines = "".join(json.dumps(r) + "\n" for r in records)
        write_atomically(path, lambda tmp, lines=lines: Path(tmp).write_text(lines))
    bar.close()
    print(f"{len(kept)} answers in {len(shards)} shards under {args.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2."""
    return guarded_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
