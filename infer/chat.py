"""Chat with a model in the terminal; each answer is printed as it is decoded.

    python -m infer.chat --model smollm2-135m-instruct --system "Be brief." --max-new-tokens 256

Each line read is one user message; `/reset` starts the conversation over, `/exit` or the end of
the input ends. The answers go to stdout; the prompt marker (on a terminal), notes and, after each
answer, a line with its tokens, tokens/s and mean accepted tokens (tokens per forward pass, above
1 with --heads or --drafter) go to stderr. Bad arguments exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys

from infer.arguments import add_speculative_arguments


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m infer.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory or model name (prepared on first use)")
    add_speculative_arguments(parser, repeatable=False)
    parser.add_argument("--system", help="a system message at the start of the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def open_session(args):
    """Loads the model, its chat template and the decoder: a ChatSession (ValueError/OSError if bad)."""
    from infer.generate import make_decoder
    from jaxaccel.chat import ChatTemplate
    from jaxaccel.chat_session import ChatSession
    from jaxaccel.decoding import make_policy
    from jaxaccel.decoding.text import stop_tokens
    from jaxaccel.hf import load_hf
    from jaxaccel.models import resolve_model

    policy = make_policy(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model_dir = resolve_model(args.model)
    template = ChatTemplate.from_model_dir(model_dir)  # before the weights: a non-chat model fails fast
    model = load_hf(model_dir)
    return ChatSession(make_decoder(args, model, model_dir), template, system=args.system, policy=policy,
                       max_new_tokens=args.max_new_tokens, stop_tokens=stop_tokens(model.config, model_dir),
                       seed=args.seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        session = open_session(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        try:
            for piece in session.reply(text):
                print(piece, end="", flush=True)
        except ValueError as e:  # a message too long for the context: the conversation goes on
            print(f"error: {e}", file=sys.stderr)
            continue
        print(flush=True)
        last = session.last
        print(f"[{len(last.tokens)} tokens, {last.tokens_per_s:.1f} tokens/s, "
              f"mean accepted tokens {last.mean_accepted_tokens:.2f}]", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
