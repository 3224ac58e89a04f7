"""Which tiles of the GPU decode-attention kernel fit in shared memory, on the GPU at hand.

Compiles pallas_kernels.decode_attention for each (dtype, head_dim, rows = n * g, block_t) with the
tile rule switched off, runs it once on random inputs, and prints whether it compiled (or the shared
memory Triton asked for) next to whether the rule (`_fits_shared_memory`) allows that tile. The rule
in pallas_kernels/decode_attention.py is read off this table; the last line counts the tiles it
allows that failed (0 is the point).

Usage (on a GPU): PYTHONPATH=. python benchmarks/h200/decode_tiles.py [--out FILE.json]
"""

import argparse
import importlib
import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import decode_attention

# the module (the package exports the function under the same name)
kernel_module = importlib.import_module("pallas_kernels.decode_attention")


def try_tile(dtype, d, n, block_t, t=1024, hq=4, hkv=2):
    rng = np.random.default_rng(n * 1000 + block_t + d)
    q, k, v = (jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in ((1, n, hq, d), (1, t, hkv, d), (1, t, hkv, d)))
    visible = jnp.ones((1, n, t), bool)
    try:
        out = decode_attention(q, k, v, visible, block_t=block_t, num_splits=4)
        return "ok" if bool(jnp.all(jnp.isfinite(out))) else "non-finite"
    except Exception as error:  # noqa: BLE001 - the table records what the compiler said
        asked = re.search(r"requested (\d+)", str(error))
        return f"asked {int(asked.group(1)) // 1024} KiB" if asked else type(error).__name__


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    rule = kernel_module._fits_shared_memory
    kernel_module._fits_shared_memory = lambda *_: True  # the rule off: every block_t as asked
    rows = []
    print(jax.devices()[0].device_kind)
    print("| dtype | head_dim | rows | block_t | result | K block KiB | rule allows it |")
    print("|---|---:|---:|---:|---|---:|---|")
    for dtype in (jnp.float32, jnp.bfloat16):
        itemsize = jnp.dtype(dtype).itemsize
        for d in (64, 128, 256):
            for n in (8, 16, 32):  # g = 2: rows 16, 32, 64 (one row block)
                for block_t in (32, 64, 128, 256):
                    result = try_tile(dtype, d, n, block_t)
                    row = dict(dtype=jnp.dtype(dtype).name, head_dim=d, rows=2 * n, block_t=block_t, result=result,
                               k_block_kib=block_t * d * itemsize // 1024, rule_allows=rule(2 * n, block_t, d, itemsize))
                    rows.append(row)
                    print(f"| {row['dtype']} | {d} | {2 * n} | {block_t} | {result} | {row['k_block_kib']} | "
                          f"{'yes' if row['rule_allows'] else 'no'} |", flush=True)
    bad = [r for r in rows if r["rule_allows"] and r["result"] != "ok"]
    print(f"tiles the rule allows that failed: {len(bad)} of {sum(r['rule_allows'] for r in rows)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
