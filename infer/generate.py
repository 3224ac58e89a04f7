"""Generate completions from a model directory.

    python -m infer.generate --model DIR --prompt "def f(x):" --max-new-tokens 64 --temperature 0
    python -m infer.generate --model DIR --prompt-file prompts.jsonl --max-new-tokens 64 \\
        --temperature 0.8 --top-p 0.95 --seed 1 --json
    python -m infer.generate --model smollm2-135m-instruct --chat --system "Be brief." --prompt "Hi!"
    python -m infer.generate --model smollm2-135m-instruct --chat --drafter pld:depth=6 --prompt "..."

--model is a model directory or a registry name (`python -m infer.models` lists them; prepared on
first use). With --chat each prompt is one user message put through the model's chat template, and
generation stops at the template's end-of-turn token, which the completion text leaves out.

A prompt file is JSON lines with a `prompt` field. Prompts run in batches of --batch-size (all
at once by default). With --json, one JSON object per prompt, in order: prompt, completion,
tokens (the generated ids), num_tokens, finish_reason ("stop" or "length"), tokens_per_s (the
row's tokens over its batch's decode time, compilation excluded), mean_accepted_tokens (tokens per
forward pass: 1.0 for plain decoding). Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from infer.arguments import add_speculative_arguments


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory (config.json, *.safetensors, "
                        "tokenizer.json) or a model name, e.g. smollm2-135m-instruct (prepared on first use)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompt-file", type=Path, help="JSON lines with a 'prompt' field")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, help="prompts per batch (default: all)")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")
    parser.add_argument("--chat", action="store_true", help="each prompt is a user message: apply the model's "
                        "chat template, stop at its end-of-turn token")
    parser.add_argument("--system", help="with --chat: a system message before each prompt")
    add_speculative_arguments(parser, repeatable=False)
    parser.add_argument("--attention-impl", choices=("auto", "xla", "pallas"),
                        help="attention implementation (default: the model config's; 'auto': Pallas kernels on "
                        "GPU and TPU, XLA on CPU; 'pallas' on CPU runs the Pallas interpreter, slowly)")
    return parser.parse_args(argv)


def attention_override(args) -> dict:
    """load_hf overrides for --attention-impl (none when the flag is absent)."""
    return {} if args.attention_impl is None else {"attention_impl": args.attention_impl}


def batch_seed(seed: int, batch_index: int) -> int:
    """The sampling seed of one batch: rows of different batches must not share draws."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


def make_decoder(args, model, model_dir: Path):
    """The decoder the arguments ask for: speculative with --heads and/or --drafter (and --tree),
    else autoregressive."""
    from jaxaccel.decoding import AutoregressiveDecoder

    drafter_spec = getattr(args, "drafter", None)
    if args.heads is None and drafter_spec is None:
        if args.tree is not None:
            raise ValueError("--tree needs --heads or --drafter")
        return AutoregressiveDecoder(model)
    from infer.speculative_rows import resolve_tree
    from jaxaccel.decoding.speculative import SpeculativeDecoder
    from jaxaccel.drafters import make_drafter
    from jaxaccel.heads import load_heads

    from jaxaccel.pretrained.shipped_heads import resolve_heads

    heads_dir = None if args.heads is None else resolve_heads([args.heads], model_dir)[0]  # auto: the first shipped
    heads = None if heads_dir is None else load_heads(heads_dir, model_dir)
    tree = resolve_tree(args.tree, heads_dir, heads)
    return SpeculativeDecoder(model, make_drafter(drafter_spec, heads=heads, tree=tree, model_dir=model_dir))


def completion_text(tokenizer, tokens: list[int], chat_stop: tuple[int, ...] = ()) -> str:
    """The generated text; a chat's end-of-turn token (always the last token) is left out."""
    return tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in chat_stop else tokens)


def run(args) -> list[dict]:
    """Generates for every prompt; returns one record per prompt, in order."""
    from jaxaccel.decoding import make_policy, pad_batch, pad_prompts
    from jaxaccel.decoding.prompts import check_prompts
    from jaxaccel.decoding.text import encode_prompts, load_model_tokenizer, read_prompt_file, stop_tokens
    from jaxaccel.hf import load_hf
    from jaxaccel.models import resolve_model

    policy = make_policy(args.temperature, args.top_k, args.top_p)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat")
    texts = [args.prompt] if args.prompt is not None else read_prompt_file(args.prompt_file)
    model_dir = resolve_model(args.model)  # a ModelCacheError (a ValueError) names what is wrong
    model = load_hf(model_dir, **attention_override(args))
    tokenizer = load_model_tokenizer(model_dir)
    config = model.config
    stop, chat_stop = stop_tokens(config, model_dir), ()
    if args.chat:
        from jaxaccel.chat import ChatTemplate

        chat = ChatTemplate.from_model_dir(model_dir, tokenizer)
        prompts = [chat.encode(chat.conversation(text, args.system)) for text in texts]
        chat_stop = chat.stop_ids
        stop = sorted({*stop, *chat_stop})
    else:
        prompts = encode_prompts(tokenizer, texts)
    check_prompts(prompts, args.max_new_tokens, config.max_position_embeddings)
    if max(max(p) for p in prompts) >= config.vocab_size:
        raise ValueError(f"the tokenizer produced ids beyond the model's vocabulary of {config.vocab_size}")
    decoder = make_decoder(args, model, model_dir)
    batch_size = args.batch_size or len(prompts)
    compiled, records = set(), []
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start:start + batch_size]
        padded = pad_batch(batch, batch_size)
        kw = dict(policy=policy, max_new_tokens=args.max_new_tokens, stop_tokens=stop)
        shape = pad_prompts(padded, args.max_new_tokens, config.max_position_embeddings)[0].shape
        if shape not in compiled:  # so that tokens_per_s excludes compilation
            decoder.compile(padded, **kw)
            compiled.add(shape)
        seed = batch_seed(args.seed, index)
        began = time.perf_counter()
        result = decoder.generate(padded, seed=seed, **kw)
        seconds = time.perf_counter() - began
        for b, tokens in enumerate(result.sequences()[:len(batch)]):
            records.append({
                "prompt": texts[start + b],
                "completion": completion_text(tokenizer, tokens, chat_stop),
                "tokens": tokens,
                "num_tokens": len(tokens),
                "finish_reason": "stop" if tokens and tokens[-1] in stop else "length",
                "tokens_per_s": len(tokens) / seconds,
                "mean_accepted_tokens": float(result.num_generated_b[b]) / int(result.num_steps_b[b]),
            })
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        records = run(args)
    except (ValueError, OSError) as e:  # ModelDirectoryError and JSON errors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, record in enumerate(records):
        if args.json:
            print(json.dumps(record, ensure_ascii=False))
        else:
            if len(records) > 1:
                print(f"=== prompt {i} ===")
            print(record["completion"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
