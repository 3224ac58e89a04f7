"""KV-cache bytes of a model at given context lengths: sliding layers in a ring of `sliding_window`
slots (what KVCache.create makes) against a dense cache on every layer.

    python -m infer.kv_memory --model gemma3-270m                  # 8k and 32k, batch 1, the config's dtype
    python -m infer.kv_memory --model DIR_OR_CONFIG_JSON --context 4096 8192 --dtype bfloat16 --json

--model: a model directory, its config.json, a .gguf file (its metadata only) or a registry name
(prepared on first use). Sizes come from the config alone: the caches are shaped, never allocated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_config(spec: str):
    """Our ModelConfig from a directory, a config.json, a GGUF file's metadata or a registry name."""
    from jaxaccel.hf import config_from_hf

    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        from jaxaccel.gguf_import.convert import family_of
        from jaxaccel.gguf_import.reader import open_gguf, read_metadata

        reader = open_gguf(path)
        meta = read_metadata(reader)
        arch, family = family_of(meta, path)
        return config_from_hf(family.hf_config(meta, arch, family, {t.name for t in reader.tensors}, path))
    if path.is_file():
        return config_from_hf(json.loads(path.read_text()))
    from jaxaccel.models import resolve_model

    return config_from_hf(json.loads((resolve_model(spec) / "config.json").read_text()))


def kv_bytes(config, context: int, batch: int, dtype: str, sliding: str) -> int:
    """Bytes of the cache KVCache.create makes for `batch` rows of `context` tokens (shapes only)."""
    import jax

    from jaxaccel.cache import KVCache

    shapes = jax.eval_shape(lambda: KVCache.create(config, batch, context, dtype, sliding=sliding))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def rows(config, contexts: list[int], batch: int, dtype: str) -> list[dict]:
    """One row per context length: ring and dense bytes and their ratio."""
    sliding = sum(config.layer_window(i) is not None for i in range(config.num_layers))
    out = []
    for context in contexts:
        ring, dense = (kv_bytes(config, context, batch, dtype, s) for s in ("ring", "dense"))
        out.append({"context": context, "batch": batch, "dtype": dtype, "layers": config.num_layers,
                    "sliding_layers": sliding, "sliding_window": config.sliding_window,
                    "ring_bytes": ring, "dense_bytes": dense, "ratio": ring / dense})
    return out


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer.kv_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory, config.json, .gguf file or model name")
    parser.add_argument("--context", type=int, nargs="+", default=[8192, 32768], help="context lengths (tokens)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", help="cache dtype (default: the config's activation dtype)")
    parser.add_argument("--json", action="store_true", help="one JSON object per context length")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.model)
        if args.batch <= 0 or min(args.context) <= 0:
            raise ValueError("--batch and --context must be > 0")
        config = config.replace(max_position_embeddings=max(config.max_position_embeddings, *args.context))
        table = rows(config, args.context, args.batch, args.dtype or config.dtype)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        for row in table:
            print(json.dumps(row))
        return 0
    first = table[0]
    print(f"{args.model}: {first['layers']} layers, {first['sliding_layers']} sliding (window "
          f"{first['sliding_window']}), batch {args.batch}, {first['dtype']}")
    print("| context | ring on sliding layers | dense on every layer | ratio |")
    print("|--:|--:|--:|--:|")
    for row in table:
        print(f"| {row['context']:,} | {mib(row['ring_bytes'])} | {mib(row['dense_bytes'])} | {row['ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
