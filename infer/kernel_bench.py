"""Pallas kernel benchmark: decode attention bandwidth and flash attention TFLOP/s, as ratios.

    python -m infer.kernel_bench [--out DIR] [--repeats N]

Writes DIR/kernels.json (default benchmarks/<device kind>/kernels.json) with the device name and
the command. Figures are ratios measured in the same run:
  - decode attention: bytes of K/V read per call / time, as a fraction of a measured
    device-to-device copy bandwidth (reads + writes of a large array), at long context;
  - flash attention (causal, forward): useful FLOP/s as a fraction of a measured bf16 matmul.
The XLA path (the model's attention / the reference) is measured beside each kernel. On CPU the
kernels run in the Pallas interpreter on small shapes: that checks the program runs end to end,
and its speed figures mean nothing (the JSON says so).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path


# (batch, n, Hq, Hkv, D, T) for decode; (batch, T, H, D) for flash; matmul size; copy MiB
SHAPES = {
    "accelerator": dict(decode=[(4, 1, 32, 8, 128, 32768), (4, 16, 32, 8, 128, 32768)], flash=(1, 4096, 16, 128),
                        matmul=8192, copy_mib=1024, dtype="bfloat16", block_t=128, block_q=128, block_k=64),
    "cpu": dict(decode=[(1, 1, 4, 2, 32, 512)], flash=(1, 128, 2, 32), matmul=256, copy_mib=16,
                dtype="float32", block_t=128, block_q=32, block_k=32),
}


def median_seconds(fn, *args, repeats: int) -> float:
    """Median wall time of fn(*args) after one warm-up (compile) call."""
    from jaxaccel.decoding.timing import median_seconds as median_of

    return median_of(lambda: fn(*args), repeats)


def copy_bandwidth(mib: int, repeats: int) -> float:
    """Bytes per second of x -> x + 1 over `mib` MiB (each byte read once and written once)."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.PRNGKey(2), (mib * 2**20 // 4,), jnp.float32)  # zeros can run faster than data
    seconds = median_seconds(jax.jit(lambda x: x + 1), x, repeats=repeats)
    return 2 * x.nbytes / seconds


def matmul_flops(size: int, dtype, repeats: int) -> float:
    import jax

    a, b = (jax.random.normal(key, (size, size), dtype) for key in jax.random.split(jax.random.PRNGKey(3)))  # not ones
    seconds = median_seconds(jax.jit(lambda a, b: a @ b), a, b, repeats=repeats)
    return 2 * size**3 / seconds


def bench_decode(shape, dtype, block_t, interpret, copy_bw, repeats):
    import jax
    import jax.numpy as jnp

    from jaxaccel.layers.attention import dot_product_attention
    from pallas_kernels import decode_attention

    b, n, hq, hkv, d, t = shape
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (b, n, hq, d), dtype)
    k = jax.random.normal(keys[1], (b, t, hkv, d), dtype)
    v = jax.random.normal(keys[2], (b, t, hkv, d), dtype)
    visible = jnp.broadcast_to(jnp.tril(jnp.ones((n, t), bool), k=t - n), (b, n, t))  # a full cache
    kv_bytes = k.nbytes + v.nbytes
    row = {"shape": dict(zip(("batch", "n", "q_heads", "kv_heads", "head_dim", "cache_len"), shape)),
           "kv_bytes": kv_bytes}
    impls = {"xla": jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, m, impl="xla")),
             "pallas": jax.jit(lambda q, k, v, m: decode_attention(q, k, v, m, block_t=block_t, interpret=interpret))}
    for name, fn in impls.items():
        seconds = median_seconds(fn, q, k, v, visible, repeats=repeats)
        row[name] = {"seconds": seconds, "bytes_per_s": kv_bytes / seconds,
                     "fraction_of_copy_bandwidth": kv_bytes / seconds / copy_bw}
    return row


def bench_flash(shape, dtype, block_q, block_k, interpret, matmul, repeats):
    import jax

    from pallas_kernels import flash_attention, flash_attention_reference

    b, t, h, d = shape
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q, k, v = (jax.random.normal(key, (b, t, h, d), dtype) for key in keys)
    flops = 4 * b * h * d * t * (t + 1) / 2  # QK^T and PV over the causal half
    row = {"shape": dict(zip(("batch", "seq_len", "heads", "head_dim"), shape)), "causal": True, "flops": flops}
    kw = dict(causal=True, block_q=block_q, block_k=block_k)
    impls = {"xla": jax.jit(lambda q, k, v: flash_attention_reference(q, k, v, **kw)),
             "pallas": jax.jit(lambda q, k, v: flash_attention(q, k, v, interpret=interpret, **kw))}
    for name, fn in impls.items():
        seconds = median_seconds(fn, q, k, v, repeats=repeats)
        row[name] = {"seconds": seconds, "flops_per_s": flops / seconds, "fraction_of_matmul": flops / seconds / matmul}
    return row


def device_kind() -> str:
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-")


def run(repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    on_cpu = jax.default_backend() == "cpu"
    cfg = SHAPES["cpu" if on_cpu else "accelerator"]
    dtype = jnp.dtype(cfg["dtype"])
    copy_bw = copy_bandwidth(cfg["copy_mib"], repeats)
    matmul = matmul_flops(cfg["matmul"], jnp.bfloat16, repeats)
    report = {
        "device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
        "command": ("python -m infer.kernel_bench " + shlex.join(sys.argv[1:])).strip(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "dtype": cfg["dtype"], "pallas_interpret": on_cpu,
        "copy_bandwidth_bytes_per_s": copy_bw, "bf16_matmul_flops_per_s": matmul, "matmul_size": cfg["matmul"],
        "decode_attention": [bench_decode(s, dtype, cfg["block_t"], on_cpu, copy_bw, repeats) for s in cfg["decode"]],
        "flash_attention": bench_flash(cfg["flash"], dtype, cfg["block_q"], cfg["block_k"], on_cpu, matmul, repeats),
        "targets": {"decode_fraction_of_copy_bandwidth": 0.8, "flash_fraction_of_matmul": 0.5},
    }
    if on_cpu:
        report["note"] = ("CPU: the Pallas kernels ran in the Pallas interpreter on small shapes. This shows the "
                          "benchmark runs end to end; the pallas speed figures (and xla vs pallas) are not "
                          "meaningful and say nothing about GPU/TPU performance.")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer.kernel_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="directory for kernels.json (default: benchmarks/<device kind>)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure (median)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    report = run(args.repeats)
    out = args.out or Path("benchmarks") / device_kind()
    from jaxaccel.files import write_report

    write_report(out, "kernels", report)
    for row in report["decode_attention"]:
        figures = ", ".join(f"{impl} {row[impl].get('fraction_of_copy_bandwidth', float('nan')):.3f}"
                            for impl in ("xla", "pallas"))
        print(f"decode n={row['shape']['n']} T={row['shape']['cache_len']}: fraction of copy bandwidth {figures}")
    flash = report["flash_attention"]
    print(f"flash T={flash['shape']['seq_len']}: fraction of bf16 matmul xla {flash['xla']['fraction_of_matmul']:.3f}, "
          f"pallas {flash['pallas']['fraction_of_matmul']:.3f}")
    if "note" in report:
        print(report["note"])
    print(f"wrote {out / 'kernels.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
