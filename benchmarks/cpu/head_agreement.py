"""How often an EAGLE-3 head's draft equals the model's own greedy token, per Spec-Bench category,
beside held-out training prompts: where acceptance is lost, without timing anything.

    python benchmarks/cpu/head_agreement.py --model smollm2-135m-instruct --heads auto --limit 2 --heldout 20

Each question (first turn, chat template) and each held-out training prompt (`--heldout N`: the
first N, in a fixed shuffle, of the prompts heads never train on) is answered greedily by our AR
loop (--max-new-tokens). One base forward over prompt + answer gives the head's features; the head
then drafts teacher-forced along the answer (`Eagle3Heads.teacher_forced`): top-1 agreement at each
draft depth over the answer's positions, and the mean accepted tokens per step of a 2-node chain
(root + one draft, the shipped tree), simulated by stepping along the answer (a hit skips the
position it drafted). Evaluation only: nothing here trains on Spec-Bench.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PAD = 256  # sequences padded to a multiple of this: few compilations


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--heads", action="append", default=[], help="EAGLE-3 heads directory or auto; repeatable")
    p.add_argument("--limit", type=int, default=2, help="first N Spec-Bench questions of each category")
    p.add_argument("--heldout", type=int, default=20, help="held-out training prompts to compare with (0: none)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, help="write the report here as JSON")
    return p.parse_args(argv)


def questions(args, model_dir):
    """[(category, prompt ids)] for Spec-Bench's first questions, then the held-out training prompts."""
    from infer.spec_bench import encode_questions
    from jaxaccel.chat import ChatTemplate
    from jaxaccel.decoding.text import load_model_tokenizer
    from jaxaccel.spec_bench import first_per_category, read_questions
    from jaxaccel.training.prompts import is_heldout, read_train_prompts

    qs = first_per_category(read_questions(), args.limit)
    prompts, turn_end = encode_questions(qs, model_dir, True)
    items = [(q.category, p) for q, p in zip(qs, prompts)]
    heldout = [p for p in read_train_prompts() if is_heldout(p.key)]
    random.Random(0).shuffle(heldout)
    template = ChatTemplate.from_model_dir(model_dir, load_model_tokenizer(model_dir))
    items += [("heldout training prompts", template.encode(template.conversation(p.text)))
              for p in heldout[:args.heldout]]
    return items, turn_end


def agreement(model, heads, sequences):
    """Per sequence (prompt ids, answer ids): hits [depth, answer positions] of the head's top-1, the
    base's own top-1 probability where depth 1 drafts (how predictable the text is to the base), and
    whether each token depth 1 drafts lies in the head's draft vocabulary (the most it could hit)."""
    graphdef, state = nnx.split(model)
    heads_graphdef, heads_state = nnx.split(heads)
    capture, depth = tuple(heads.capture), heads.config.num_heads

    @jax.jit
    def top1(state, heads_state, tokens_bt):  # weights as arguments, not constants to fold
        base, head = nnx.merge(graphdef, state), nnx.merge(heads_graphdef, heads_state)
        out = base.forward(tokens_bt, capture=capture)
        logits = head.teacher_forced(base, out.captured, tokens_bt, depth).logits_kbtv
        confidence_t = jnp.max(jax.nn.softmax(out.logits[0], axis=-1), axis=-1)  # the base's own top-1 probability
        return head.d2t[...][jnp.argmax(logits, axis=-1)][:, 0], confidence_t  # [depth, T] target ids, [T]

    d2t = np.asarray(heads.d2t[...])
    out = []
    for prompt, answer in sequences:
        tokens = np.array(prompt + answer, np.int32)
        padded = np.zeros((1, -(-len(tokens) // PAD) * PAD), np.int32)
        padded[0, :len(tokens)] = tokens
        drafted, confidence = map(np.asarray, top1(state, heads_state, jnp.asarray(padded)))
        # Row t at depth k drafts the token at t + k + 2 (the base's prediction at t + 1); the first
        # step's root is the answer's first token.
        rows = np.arange(len(prompt) - 1, len(tokens) - 2)
        out.append(([drafted[k, rows[:len(rows) - k]] == tokens[rows[:len(rows) - k] + k + 2]
                     for k in range(drafted.shape[0])], confidence[rows + 1], np.isin(tokens[rows + 2], d2t)))
    return out


def chain_accepted(hits_0) -> float:
    """Mean tokens per step of a root + one-draft chain stepping along the answer."""
    steps = accepted = 0
    i = 0
    while i < len(hits_0):
        steps, accepted = steps + 1, accepted + int(hits_0[i])
        i += 2 if hits_0[i] else 1
    return 1 + accepted / max(steps, 1)


def main(argv=None) -> int:
    from jaxaccel.decoding import AutoregressiveDecoder
    from jaxaccel.decoding.text import stop_tokens
    from jaxaccel.heads import load_heads
    from jaxaccel.hf import load_hf
    from jaxaccel.models import resolve_model
    from jaxaccel.pretrained.shipped_heads import resolve_heads

    args = parse_args(argv)
    model_dir = resolve_model(args.model)
    model = load_hf(model_dir)
    items, turn_end = questions(args, model_dir)
    stop = sorted(set(stop_tokens(model.config, model_dir)) | set(turn_end))
    decoder = AutoregressiveDecoder(model)
    answers = [decoder.generate([p], max_new_tokens=args.max_new_tokens, stop_tokens=stop).sequences()[0]
               for _, p in items]
    report = {"model": str(model_dir), "limit": args.limit, "max_new_tokens": args.max_new_tokens,
              "command": "python benchmarks/cpu/head_agreement.py " + " ".join(argv or sys.argv[1:]), "heads": []}
    for heads_dir in resolve_heads(args.heads or ["auto"], model_dir):
        heads = load_heads(heads_dir, model_dir)
        if heads.config.kind != "eagle3":
            raise SystemExit(f"error: {heads_dir} holds {heads.config.kind} heads; this measures eagle3 heads")
        measured = agreement(model, heads, [(p, a) for (_, p), a in zip(items, answers)])
        groups = {}
        for (category, _), m in zip(items, measured):
            groups.setdefault(category, []).append(m)
        spec_bench = [m for (c, _), m in zip(items, measured) if c != "heldout training prompts"]
        groups = {"Spec-Bench overall": spec_bench, **groups}
        rows = []
        for category, ms in groups.items():
            hs = [h for h, _, _ in ms]
            depth = [float(np.mean(np.concatenate([h[k] for h in hs]))) for k in range(len(hs[0]))]
            chain = float(np.mean([chain_accepted(h[0]) for h in hs]))
            base = float(np.mean(np.concatenate([c for _, c, _ in ms])))
            covered = float(np.mean(np.concatenate([v for _, _, v in ms])))
            rows.append({"category": category, "sequences": len(hs), "top1_by_depth": depth, "chain2_accepted": chain,
                         "base_top1_probability": base, "draft_vocab_coverage": covered})
        report["heads"].append({"heads": str(heads_dir), "rows": rows})
        print(f"\n{heads_dir}\n\n| questions | n | base's top-1 probability | in draft vocabulary | top-1 depth 1 "
              "| depth 2 | depth 3 | 2-node chain accepts |\n|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            d = r["top1_by_depth"]
            print(f"| {r['category']} | {r['sequences']} | {r['base_top1_probability']:.2f} | "
                  f"{r['draft_vocab_coverage']:.2f} | {d[0]:.2f} | {d[1]:.2f} | "
                  f"{d[2]:.2f} | {r['chain2_accepted']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
