"""Long-context benchmark of the attention kinds against full attention:

    python -m infer.long_context_bench --model runs/small/model --duo-model runs/long_context/small_duo \
        [--linear-model DIR] [--heads runs/small/heads/medusa] --contexts 2048 8192 \
        --out benchmarks/cpu/long_context.json
    (also: python -m infer.bench --long-context ...the same flags...)

For each context C and kind, one row: KV-cache bytes at batch 1 (C + the decode room), passkey
accuracy (jaxaccel.passkey, test-split filler, C tokens), test-split loss (nats/token over windows
of C tokens, training-mode forward), and decode tokens/s after a C-token prompt — plain greedy
decoding and speculative decoding with --heads (the prefill is not timed; --model's heads, so
no speculative row for `linear`).

Kinds: `full` is the base model; `duo` and `block_sparse` run the base model's weights with the
heads of --duo-model (its config.json from train.retrieval_heads: retrieval heads, sink, recent;
block_sparse makes the retrieval heads its dense heads, the streaming heads its Λ heads);
`linear` needs its own trained model (--linear-model; skipped without one). A base trained at a
shorter context than C gets linear RoPE interpolation (factor C / trained context) for every kind
alike (--no-rope-scaling to turn it off) — no fine-tuning, so long-context quality is what it is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from jaxaccel.models import model_argument

MARGIN = 128  # positions past C: the generated tokens and one speculative tree


def kind_model(kind: str, base, duo_spec, context: int, rope_scaling: bool, linear=None):
    """The model of one row: base weights under another attention config, or the linear model."""
    from flax import nnx

    from jaxaccel.config import AttentionSpec, RopeScaling
    from jaxaccel.model import Transformer

    source = linear if kind == "linear" else base
    config = source.config
    overrides = {"max_position_embeddings": context + MARGIN}
    trained = base.config.max_position_embeddings
    if rope_scaling and context > trained and kind != "linear":  # linear layers have no RoPE
        overrides["rope_scaling"] = RopeScaling(kind="linear", factor=context / trained)
    if kind == "duo":
        overrides["attention"] = duo_spec
    elif kind == "block_sparse":
        unit = duo_spec.sink_size
        overrides["attention"] = AttentionSpec(
            kinds=("block_sparse",), retrieval_heads=duo_spec.retrieval_heads, block_size=unit, sink_blocks=1,
            local_blocks=max(1, duo_spec.recent_size // unit), page_size=unit, token_budget=BLOCK_BUDGET)
    shell = nnx.eval_shape(lambda: Transformer(config.replace(**overrides), rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(shell), nnx.state(source))


BLOCK_BUDGET = 512  # Quest's token budget for block_sparse decoding


def heads_for(heads, config):
    """The heads over a row's model config: a draft layer (EAGLE, Hydra's prefix layer) gets the
    row's context length and RoPE scaling (its own attention stays full)."""
    from flax import nnx

    from jaxaccel.heads.registry import make_heads

    shell = nnx.eval_shape(lambda: make_heads(heads.config, config, rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(shell), nnx.state(heads))


def kv_bytes(config, max_len: int) -> int:
    import jax

    from jaxaccel.cache import KVCache

    shapes = jax.eval_shape(lambda: KVCache.create(config, 1, max_len))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def test_loss(model, stream: np.ndarray, context: int, windows: int) -> float:
    """Mean next-token NLL (nats) over `windows` consecutive test-split windows of `context` tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, tokens_1t):
        logits = nnx.merge(graphdef, state)(tokens_1t[:, :-1])
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens_1t[:, 1:, None], -1))

    starts = np.linspace(0, len(stream) - context - 1, windows).astype(int)
    return float(np.mean([nll(state, jnp.asarray(stream[s:s + context + 1])[None]) for s in starts]))


def decode_speed(decoder, prompt: list[int], max_new_tokens: int, repeats: int) -> dict:
    """Median decode tokens/s (prefill excluded) of one prompt at batch 1, greedy, no stop token."""
    import jax

    from jaxaccel.decoding.sampling import Greedy

    decoder.compile([prompt], policy=Greedy(), max_new_tokens=max_new_tokens)
    seconds, steps = [], None
    for _ in range(repeats):
        state, stop_ids = decoder.start([prompt], policy=Greedy(), max_new_tokens=max_new_tokens)
        jax.block_until_ready(state)
        began = time.perf_counter()
        final = jax.block_until_ready(decoder.finish(state, stop_ids, policy=Greedy()))
        seconds.append(time.perf_counter() - began)
        steps = int(final.result.num_steps_b[0]) if hasattr(final.result, "num_steps_b") else None
    # The first token comes from the prefill; the loop makes the other max_new_tokens - 1.
    median = float(np.median(seconds))
    return {"tokens_per_s": (max_new_tokens - 1) / median, "seconds": median, "forward_passes": steps}


def run(args: argparse.Namespace) -> dict:
    import jax

    from jaxaccel.data import load_tokenizer, token_stream
    from jaxaccel.decoding.autoregressive import AutoregressiveDecoder
    from jaxaccel.hf import load_hf
    from jaxaccel.passkey import passkey_accuracy, passkey_batch

    base = load_hf(args.model)
    duo_spec = load_hf(args.duo_model).config.attention
    if duo_spec is None or set(duo_spec.kinds) != {"duo"}:
        raise ValueError(f"{args.duo_model} is not a duo model directory (see train.retrieval_heads)")
    linear = load_hf(args.linear_model) if args.linear_model else None
    tokenizer = load_tokenizer(args.model)
    stream = token_stream(tokenizer, "test", cache_dir=args.cache_dir)
    heads = None
    if args.heads:
        from jaxaccel.heads.io import load_heads
        heads = load_heads(args.heads, args.model)
    kinds = [k for k in args.kinds if k != "linear" or linear is not None]
    rows = []
    for context in args.contexts:
        prompt = stream[:context - args.max_new_tokens - 32].tolist()  # a test-split prompt; bucket = C
        batches = [passkey_batch(tokenizer, stream, 1, context, seed=args.seed + i) for i in range(args.passkeys)]
        for kind in kinds:
            model = kind_model(kind, base, duo_spec, context, not args.no_rope_scaling, linear)
            row = {"context": context, "kind": kind, "kv_bytes": kv_bytes(model.config, context + MARGIN)}
            began = time.perf_counter()
            row["passkey_accuracy"] = float(np.mean([passkey_accuracy(model, b) for b in batches]))
            row["test_loss"] = test_loss(model, stream, context, args.loss_windows)
            row["ar"] = decode_speed(AutoregressiveDecoder(model), prompt, args.max_new_tokens, args.repeats)
            if heads is not None and kind != "linear":  # the heads are --model's: not the linear model's
                from jaxaccel.decoding.speculative import SpeculativeDecoder
                row["speculative"] = decode_speed(SpeculativeDecoder(model, heads_for(heads, model.config)), prompt,
                                                  args.max_new_tokens, args.repeats)
            row["row_seconds"] = time.perf_counter() - began
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    for row in rows:  # ratios against full at the same context
        full = next((r for r in rows if r["context"] == row["context"] and r["kind"] == "full"), None)
        if full is not None:
            row["kv_bytes_vs_full"] = row["kv_bytes"] / full["kv_bytes"]
            row["ar_speed_vs_full"] = row["ar"]["tokens_per_s"] / full["ar"]["tokens_per_s"]
            if "speculative" in row:
                row["speculative_speed_vs_full_ar"] = row["speculative"]["tokens_per_s"] / full["ar"]["tokens_per_s"]
    return {"device": str(jax.devices()[0]), "model": str(args.model), "duo_model": str(args.duo_model),
            "linear_model": str(args.linear_model), "heads": str(args.heads), "passkeys": args.passkeys,
            "loss_windows": args.loss_windows, "max_new_tokens": args.max_new_tokens,
            "rope_scaling": not args.no_rope_scaling, "block_sparse_token_budget": BLOCK_BUDGET,
            "duo_spec": {"sink_size": duo_spec.sink_size, "recent_size": duo_spec.recent_size,
                         "retrieval_heads": duo_spec.retrieval_heads}, "rows": rows}


def markdown(report: dict) -> str:
    lines = ["| context | kind | KV bytes (× full) | passkey acc | test loss | AR tok/s (× full) | spec tok/s |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        spec = f"{r['speculative']['tokens_per_s']:.1f}" if "speculative" in r else "-"
        lines.append(f"| {r['context']} | {r['kind']} | {r['kv_bytes'] / 1e6:.1f} MB ({r.get('kv_bytes_vs_full', 1):.2f}) "
                     f"| {r['passkey_accuracy']:.2f} | {r['test_loss']:.3f} | {r['ar']['tokens_per_s']:.1f} "
                     f"({r.get('ar_speed_vs_full', 1):.2f}) | {spec} |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duo-model", type=Path, help="duo model directory from train.retrieval_heads")
    p.add_argument("--linear-model", type=Path, default=None, help="a model trained with --attention linear")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--kinds", nargs="+", default=["full", "duo", "block_sparse", "linear"])
    p.add_argument("--passkeys", type=int, default=4, help="passkey sequences per context")
    p.add_argument("--loss-windows", type=int, default=2, help="test-split windows per context")
    p.add_argument("--no-rope-scaling", action="store_true")
    p.add_argument("--cache-dir", type=Path, default=None, help="token-stream cache (e.g. runs/small/data)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infer.long_context_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=model_argument, required=True, help="the full-attention base model directory "
                   "or model name")
    p.add_argument("--heads", type=Path, default=None, help="heads directory of --model (speculative rows)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON report path (a .md table is written beside it)")
    add_arguments(p)
    return p.parse_args(argv)


def main_with(args: argparse.Namespace) -> int:
    if args.duo_model is None:
        print("error: --long-context needs --duo-model DIR (python -m train.retrieval_heads)", file=sys.stderr)
        return 2
    try:
        report = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown(report)
    print(table, end="")
    if args.out:
        from jaxaccel.files import write_report

        write_report(args.out.parent, args.out.stem, report, table)
    return 0


def main(argv=None) -> int:
    return main_with(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
