"""The CPU kernels (jaxaccel/cpu_kernels) alone, on SmolLM2-135M's shapes with random weights:

- matmul: a chain of every projection of 30 layers and the tied LM head (538 MB of panels), as a
  pass over M = 1..16 tokens multiplies them, each M / M = 1;
- attention: 30 layers' softmax attention of n queries (9 query heads over 3 KV heads of 64) over
  a cache of T slots, L + n of them visible, XLA's (`dot_product_attention`) against the kernel.

    python benchmarks/cpu/cpu_kernels_bench.py [--out FILE.json]

Times are the median of 20 calls of one jitted function each (wall time, this machine's load
included): compare the columns of one run, not runs.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.cpu_kernels import decode_attention as attention_kernel
from jaxaccel.cpu_kernels import panel_matmul as pm
from jaxaccel.layers.attention import dot_product_attention

LAYERS, D, FF, VOCAB, HQ, HKV, HEAD = 30, 576, 1536, 49152, 9, 3, 64


def median_ms(f, *args, calls: int = 20) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def matmul_chain(rng) -> list[dict]:
    def packed(*shape):
        return pm.pack_panels(jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02))

    layers = [{name: packed(*shape) for name, shape in (("q", (D, D)), ("k", (D, HKV * HEAD)), ("v", (D, HKV * HEAD)),
                                                        ("o", (D, D)), ("gate", (D, FF)), ("up", (D, FF)),
                                                        ("down", (FF, D)))} for _ in range(LAYERS)]
    lm_head = packed(D, VOCAB)

    @jax.jit
    def chain(layers, lm_head, x):
        mm = pm.panel_matmul
        for w in layers:
            kv = mm(x, w["k"]) + mm(x, w["v"])
            x = x + mm(mm(x, w["q"]) * 1e-3 + jnp.tile(kv, 3) * 1e-3, w["o"])
            x = x + mm(jax.nn.silu(mm(x, w["gate"])) * mm(x, w["up"]), w["down"])
        return mm(x, lm_head)

    rows = []
    for m in (1, 2, 4, 6, 8, 12, 16):
        ms = median_ms(chain, layers, lm_head, jnp.full((m, D), 0.1, jnp.float32))
        rows.append({"rows": m, "ms": ms, "over_1": ms / rows[0]["ms"] if rows else 1.0})
        print(f"matmul chain, {m:2d} rows: {ms:6.2f} ms  {rows[-1]['over_1']:.2f}x", flush=True)
    return rows


def attention(rng) -> list[dict]:
    rows = []
    for n, t, seen in ((1, 192, 128), (1, 1024, 900), (4, 1024, 900), (8, 1024, 900), (16, 1024, 900)):
        q = jnp.asarray(rng.standard_normal((1, n, HQ, HEAD)).astype(np.float32))
        ks, vs = ([jnp.asarray(rng.standard_normal((1, t, HKV, HEAD)).astype(np.float32)) for _ in range(LAYERS)]
                  for _ in range(2))
        visible = jnp.asarray(np.arange(t)[None, None, :] <= seen + np.arange(n)[None, :, None])  # causal over the new

        def layers(attend):
            @jax.jit
            def run(q, ks, vs, visible):
                x = q
                for k, v in zip(ks, vs):
                    x = attend(x, k, v, visible) * 0.5 + q
                return x
            return run

        xla = median_ms(layers(lambda *a: dot_product_attention(*a, impl="xla")), q, ks, vs, visible)
        kernel = median_ms(layers(attention_kernel.decode_attention), q, ks, vs, visible)
        rows.append({"queries": n, "cache_slots": t, "visible": seen, "xla_ms": xla, "kernel_ms": kernel})
        print(f"attention, {n:2d} queries over {seen} of {t} slots, 30 layers: XLA {xla:6.2f} ms, kernel "
              f"{kernel:6.2f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()
    if not (pm.available() and attention_kernel.available()):
        raise SystemExit("the CPU kernels do not run on this machine (x86-64 with AVX2 and FMA, a C++ compiler)")
    rng = np.random.default_rng(0)
    report = {"command": "python benchmarks/cpu/cpu_kernels_bench.py" + (f" --out {args.out}" if args.out else ""),
              "device": str(jax.devices()[0]), "matmul_chain": matmul_chain(rng), "attention": attention(rng)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
