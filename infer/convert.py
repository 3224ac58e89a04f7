"""Convert a GGUF file (llama.cpp) into a Hugging Face model directory.

    python -m infer.convert --gguf model.gguf --out DIR

The directory (config.json, model.safetensors in float32, tokenizer.json, tokenizer_config.json,
generation_config.json) loads with `jaxaccel.load_hf`, `python -m infer.generate --model DIR` and
transformers. It appears whole or not at all. Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m infer.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, required=True, help="the GGUF file")
    parser.add_argument("--out", type=Path, required=True, help="the model directory to write (replaced if present)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxaccel.gguf_import import convert_gguf

    try:
        out = convert_gguf(args.gguf, args.out)
    except (ValueError, OSError) as e:  # GGUFError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in sorted(out.iterdir()):
        print(f"wrote {f} ({f.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
