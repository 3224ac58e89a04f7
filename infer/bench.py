"""Benchmark: our jitted decode loop vs transformers `generate` vs the weight-streaming floor.

One run, the same weights and prompts for all three, greedy, a fixed number of new tokens
(no early stop, so both sides do the same work):

    python -m infer.bench --model DIR --max-new-tokens 64 --out runs/bench
    python -m infer.bench --random-params 250 --out runs/bench_250mb
    python -m infer.bench --model DIR --heads HEADS_DIR [--heads ...] [--tree auto] --out runs/spec
    python -m infer.bench --model DIR --heads HEADS_DIR --tune-tree
    python -m infer.bench --model DIR [--heads HEADS_DIR] --step-costs --out runs/costs   # infer/step_costs.py
    python -m infer.bench --model smollm2-135m-instruct --drafter pld --drafter recycling --out runs/spec

With --heads, the table is the speculative one (see infer/speculative_rows.py): ar vs each heads
directory at each --temperatures, on --num-prompts test-split prompts decoded at batch 1.
--tune-tree measures this device's step cost per tree size and the heads' acceptance on
prompts never evaluated on (a chat model's training prompts held out from head training, else
validation-split snippets), and saves the best tree beside the heads (`--tree auto` uses it).

`--random-params N` builds a random Llama of about N MB of float32 weights (no download) and
saves it to a temporary directory for transformers. Prompts come from the test split of the
corpus when the model directory has a tokenizer, else they are random token ids. Writes
bench.json and bench.md to --out and prints the table.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from infer.arguments import add_speculative_arguments
from infer.generate import attention_override
from jaxaccel.config import ModelConfig
from jaxaccel.models import model_argument


def random_config(megabytes: float) -> ModelConfig:
    """A Llama shape (d=1024, GQA 16/4 heads, vocab 8192) with enough layers for `megabytes` of float32."""
    base = ModelConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_layers=1, num_heads=16,
                       num_kv_heads=4, max_position_embeddings=2048)
    per_layer = base.replace(num_layers=2).num_params() - base.num_params()
    embed = base.num_params() - per_layer
    layers = max(1, math.ceil((megabytes * 1e6 / 4 - embed) / per_layer))
    return base.replace(num_layers=layers)


def build_random(megabytes: float, seed: int, directory: Path, **overrides):
    """A random-init model of `random_config(megabytes)` (with config `overrides`), also saved to
    `directory` for transformers."""
    from flax import nnx

    from jaxaccel.hf import save_hf
    from jaxaccel.model import Transformer

    model = Transformer(random_config(megabytes).replace(**overrides), rngs=nnx.Rngs(seed))
    save_hf(model, directory)
    return model


def make_prompts(model_dir: Path, vocab_size: int, batch_size: int, prompt_len: int, seed: int,
                 split: str = "test") -> list[list[int]]:
    """`batch_size` prompts of exactly prompt_len tokens: corpus snippets if there is a tokenizer."""
    if (model_dir / "tokenizer.json").is_file():
        from jaxaccel.data import load_tokenizer, sample_prompts

        tokenizer = load_tokenizer(model_dir)
        texts = sample_prompts(split, n=batch_size, num_chars=16 * prompt_len, seed=seed)
        prompts = [tokenizer.encode(t).ids[:prompt_len] for t in texts]
        if min(map(len, prompts)) == prompt_len:
            return prompts
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, (batch_size, prompt_len)).tolist()


def tuning_prompts(model_dir: Path, vocab_size: int, n: int, prompt_len: int, seed: int) -> list[list[int]]:
    """Prompts to tune trees on, never evaluated on: for a chat model, `n` training prompts held out
    from head training (jaxaccel.training.prompts.is_heldout; seeded), through its chat template
    (up to 4 * prompt_len tokens); else validation-split corpus snippets (make_prompts)."""
    from jaxaccel.chat import has_chat_template

    if not has_chat_template(model_dir):
        return make_prompts(model_dir, vocab_size, n, prompt_len, seed, split="validation")
    from jaxaccel.chat import ChatTemplate
    from jaxaccel.training.prompts import is_heldout, read_train_prompts

    template = ChatTemplate.from_model_dir(model_dir)
    held = [p for p in read_train_prompts() if is_heldout(p.key)]
    encoded = (template.encode(template.conversation(held[i].text)) for i in np.random.default_rng(seed).permutation(len(held)))
    return [ids for ids in encoded if len(ids) <= 4 * prompt_len][:n]


def time_transformers(model_dir: Path, prompts: list[list[int]], max_new_tokens: int, repeats: int) -> dict:
    """transformers `generate` (torch CPU, default attention and threads), greedy, no early stop.

    The loop's per-step time is (time for N tokens - time for 1 token) / (N - 1).
    """
    import torch
    import transformers

    from jaxaccel.decoding.timing import median_seconds

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # the same fixed number of tokens as ours
    hf.generation_config.pad_token_id = 0
    input_ids = torch.tensor(prompts, dtype=torch.long)

    def run(n):
        with torch.no_grad():
            return hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                               max_new_tokens=n)

    total_s = median_seconds(lambda: run(max_new_tokens), repeats)
    prefill_s = median_seconds(lambda: run(1), repeats)
    tokens = run(max_new_tokens)[:, input_ids.shape[1]:].tolist()
    n = len(prompts) * max_new_tokens
    return {"total_s": total_s, "prefill_s": prefill_s, "step_s": (total_s - prefill_s) / max(max_new_tokens - 1, 1),
            "tokens_per_s": n / total_s, "tokens": tokens, "torch_threads": torch.get_num_threads(),
            "attn_implementation": hf.config._attn_implementation}


def markdown(report: dict) -> str:
    ours, hf, floor = report["ours"], report.get("transformers"), report["floor"]
    rows = [("jaxaccel (jit, while_loop)", ours["tokens_per_s"], ours["step_s"], ours["prefill_s"])]
    if hf:
        rows.append((f"transformers generate ({hf['attn_implementation']}, torch threads={hf['torch_threads']})",
                     hf["tokens_per_s"], hf["step_s"], hf["prefill_s"]))
    lines = [f"model: {report['model']} ({report['weights_mb']:.1f} MB of weights, {report['device']}), "
             f"batch {report['batch_size']}, prompt {report['prompt_len']} tokens, "
             f"{report['max_new_tokens']} new tokens",
             "", "| decoder | tokens/s | per-step ms | prefill ms |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {tps:.1f} | {step * 1e3:.2f} | {pre * 1e3:.1f} |" for name, tps, step, pre in rows]
    lines.append(f"| weight-streaming floor | | {floor['seconds'] * 1e3:.2f} | |")
    lines.append("")
    r = report["ratios"]
    if hf:
        lines.append(f"- ours / transformers tokens/s: **{r['ours_over_transformers_tokens_per_s']:.2f}x**; "
                     f"greedy tokens identical: **{report['tokens_identical']}**")
    lines.append(f"- ours decode step / weight-streaming floor: **{r['step_over_floor']:.2f}x** "
                 f"(floor {floor['gb_per_s']:.1f} GB/s over {floor['bytes'] / 1e6:.1f} MB)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=model_argument, help="model directory (config.json, *.safetensors[, tokenizer.json]) "
                       "or model name (python -m infer.models)")
    which.add_argument("--random-params", type=float, metavar="MB", help="random Llama of about MB MB of weights")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads for transformers (default: "
                        "torch's own; on an oversubscribed machine its thread barriers can slow it several-fold)")
    parser.add_argument("--out", type=Path, help="directory for bench.json and bench.md")
    add_speculative_arguments(parser, repeatable=True)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--num-prompts", type=int, default=8, help="test-split prompts for the speculative rows")
    parser.add_argument("--tune-tree", action="store_true", help="choose and save the best tree for each --heads")
    parser.add_argument("--attention-impl", choices=("auto", "xla", "pallas"),
                        help="attention implementation (default: the model config's; 'auto': Pallas on GPU and TPU, XLA on CPU)")
    from infer import long_context_bench

    parser.add_argument("--long-context", action="store_true", help="the attention kinds at long contexts "
                        "(infer/long_context_bench.py; --out DIR gets long_context.json)")
    long_context_bench.add_arguments(parser.add_argument_group("--long-context"))
    parser.add_argument("--step-costs", action="store_true", help="forward cost per token count, AR step / floor, "
                        "speculative step / forward (infer/step_costs.py; --out DIR gets step_costs.json)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the reports
    if args.step_costs:
        from infer import step_costs

        return step_costs.main_with(args)
    if args.long_context:
        if args.model is None or len(args.heads) > 1:
            print("error: --long-context needs --model DIR and at most one --heads DIR", file=sys.stderr)
            return 2
        args.heads = args.heads[0] if args.heads else None
        args.out = None if args.out is None else args.out / "long_context.json"
        return long_context_bench.main_with(args)
    if args.heads or args.drafter or args.tune_tree:
        return speculative_main(args)

    import jax
    from flax import nnx

    from jaxaccel.decoding import AutoregressiveDecoder
    from jaxaccel.decoding.timing import time_decode, weight_streaming_floor
    from jaxaccel.hf import ModelDirectoryError, load_hf

    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.model is not None:
                model_dir = args.model
                model = load_hf(model_dir, **attention_override(args))
            else:
                model_dir = Path(tmp)
                model = build_random(args.random_params, args.seed, model_dir, **attention_override(args))
            prompts = make_prompts(model_dir, model.config.vocab_size, args.batch_size, args.prompt_len, args.seed)
            decoder = AutoregressiveDecoder(model)
            ours = time_decode(decoder, prompts, max_new_tokens=args.max_new_tokens, repeats=args.repeats)
        except (ModelDirectoryError, ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        floor = weight_streaming_floor(nnx.state(model, nnx.Param))  # the weights, not their decode-time copies
        hf = None
        if not args.skip_transformers:
            if args.torch_threads:
                import torch

                torch.set_num_threads(args.torch_threads)
            hf = time_transformers(model_dir, prompts, args.max_new_tokens, args.repeats)

    our_tokens = ours.pop("result").sequences()
    report = {
        "model": str(args.model) if args.model else f"random llama {model.config.num_params() / 1e6:.1f}M params",
        "config": model.config.to_dict(), "weights_mb": floor["bytes"] / 1e6, "device": str(jax.devices()[0]),
        "batch_size": args.batch_size, "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
        "ours": {**ours, "tokens": our_tokens}, "transformers": hf, "floor": floor,
        "ratios": {"step_over_floor": ours["step_s"] / floor["seconds"]},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "python -m infer.bench " + shlex.join(args.argv),
    }
    if hf:
        report["ratios"]["ours_over_transformers_tokens_per_s"] = ours["tokens_per_s"] / hf["tokens_per_s"]
        report["tokens_identical"] = our_tokens == hf["tokens"]
    table = markdown(report)
    print(table, end="")
    if args.out:
        from jaxaccel.files import write_report

        write_report(args.out, "bench", report, table)
    return 0


def speculative_main(args) -> int:
    """--heads / --drafter / --tune-tree: the speculative table, or tree tuning."""
    import jax

    from infer import speculative_rows
    from jaxaccel.hf import load_hf

    if args.model is None or not (args.heads or (args.drafter and not args.tune_tree)):
        print("error: --heads, --drafter and --tune-tree need --model DIR, and --tune-tree at least one --heads DIR",
              file=sys.stderr)
        return 2
    try:
        model = load_hf(args.model, **attention_override(args))
        if args.tune_tree:
            tuning = tuning_prompts(args.model, model.config.vocab_size, 16, args.prompt_len, args.seed + 1)
            from jaxaccel.pretrained.shipped_heads import resolve_heads

            for heads_dir in resolve_heads(args.heads, args.model):
                report = speculative_rows.tune_tree(model, args.model, heads_dir, tuning, tuning[0],
                                              max_new_tokens=args.max_new_tokens)
                print(f"{heads_dir}: chose {report['chosen_num_nodes']} nodes")
                for row in report["table"]:
                    print(f"  {row['num_nodes']:3d} nodes: {row['expected_tokens_per_step']:.2f} tokens/step, "
                          f"{row['step_ms']:.1f} ms/step -> {row['expected_tokens_per_s']:.1f} tokens/s")
            return 0
        prompts = make_prompts(args.model, model.config.vocab_size, args.num_prompts, args.prompt_len, args.seed)
        report = speculative_rows.speculative_report(model, args.model, args.heads, prompts,
                                                     tree_specs=args.tree or [None],
                                                     temperatures=args.temperatures,
                                                     max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                                                     seed=args.seed, drafter_specs=args.drafter)
    except (ValueError, FileNotFoundError) as e:  # HeadsMismatchError and ModelDirectoryError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    header = (f"model: {args.model} ({jax.devices()[0]}), batch 1, {args.num_prompts} test-split prompts of "
              f"{args.prompt_len} tokens, {args.max_new_tokens} new tokens")
    table = speculative_rows.speculative_markdown(report, header)
    print(table, end="")
    if args.out:
        from jaxaccel.files import write_report

        command = "python -m infer.bench " + shlex.join(args.argv)
        write_report(args.out, "spec_bench", {"command": command, "device": str(jax.devices()[0]), **report}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
