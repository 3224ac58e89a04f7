"""How much of a prefill is its weight products: the jitted prefill of an n-token prompt (as the
decoders run it: cache of the prompt's bucket + --max-new-tokens) against a jitted chain of the same
[n, K] x [K, N] products, XLA's GEMM, at the model's shapes. What is left is attention (among the
prompt's tokens, in causal blocks past 128; over every cache slot before that change), norms, RoPE
and the cache writes. Each figure is the best of three calls after a warm-up.

    PYTHONPATH=. python benchmarks/cpu/prefill_costs.py [--model smollm2-135m-instruct] [--lengths 64 256 1024]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from infer.bench import make_prompts
from jaxaccel.decoding import AutoregressiveDecoder, Greedy
from jaxaccel.decoding.prompts import pad_prompts
from jaxaccel.hf import load_hf
from jaxaccel.models import resolve_model


def best_seconds(run, repeats: int = 3) -> float:
    jax.block_until_ready(run())  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return min(times)


def product_shapes(config) -> list[tuple[int, int]]:
    """[K, N] of one layer's weight products (q, k, v, o, gate, up, down)."""
    d, ff, hd = config.hidden_size, config.intermediate_size, config.resolved_head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    return [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)]


def gemm_chain(config):
    """The layers' products in sequence on random weights of the model's shapes (the same FLOPs)."""
    rng = np.random.default_rng(0)
    wq, wk, wv, wo, wg, wu, wd = [jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.02)
                                  for s in product_shapes(config)]

    @jax.jit
    def chain(x_nd):
        for _ in range(config.num_layers):
            q, k, v = x_nd @ wq, x_nd @ wk, x_nd @ wv
            mlp = (jax.nn.silu(x_nd @ wg) * (x_nd @ wu)) @ wd
            x_nd = x_nd + 1e-3 * (q @ wo + mlp) + 1e-3 * (k.sum() + v.sum())  # every product is used
        return x_nd
    return chain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    model = load_hf(model_dir)
    config = model.config
    decoder, chain = AutoregressiveDecoder(model), gemm_chain(config)
    flops_per_row = 2 * config.num_layers * sum(k * n for k, n in product_shapes(config))
    print("| prompt tokens | cache slots | prefill | its weight products alone | their GFLOP/s | rest of the prefill |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.lengths:
        prompt = make_prompts(model_dir, config.vocab_size, 1, n, seed=0)[0]  # corpus text
        prefill_s = best_seconds(
            lambda: decoder.start([prompt], policy=Greedy(), max_new_tokens=args.max_new_tokens)[0])
        x_nd = jnp.asarray(np.random.default_rng(1).standard_normal((n, config.hidden_size), dtype=np.float32))
        gemm_s = best_seconds(lambda: chain(x_nd))
        cache_len = pad_prompts([prompt], args.max_new_tokens, config.max_position_embeddings)[2]
        print(f"| {n} | {cache_len} | {prefill_s * 1e3:.0f} ms | {gemm_s * 1e3:.0f} ms | "
              f"{flops_per_row * n / gemm_s / 1e9:.0f} | {(prefill_s - gemm_s) / prefill_s:.0%} |", flush=True)


if __name__ == "__main__":
    main()
