"""The greedy choice over a vocabulary on XLA:CPU: `jaxaccel.decoding.sampling.greedy_tokens` (chunked
max, then the first chunk and entry holding it) against `jnp.argmax` and a one-level max-then-index
search, for an AR step's and verify passes' shapes. ms per call, median of 15.

    python benchmarks/cpu/greedy_tokens_bench.py
"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.decoding.sampling import greedy_tokens
from jaxaccel.decoding.timing import median_seconds


def one_level(logits_xv):
    v = logits_xv.shape[-1]
    top_x1 = jnp.max(logits_xv, axis=-1, keepdims=True)
    return jnp.min(jnp.where(logits_xv == top_x1, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


WAYS = {"greedy_tokens": jax.jit(greedy_tokens), "argmax": jax.jit(lambda x: jnp.argmax(x, -1)),
        "one-level max, then index": jax.jit(one_level)}
print(f"{jax.devices()[0]}\n\n| rows x vocabulary | " + " | ".join(WAYS) + " |\n|---|" + "---:|" * len(WAYS))
rng = np.random.default_rng(0)
for rows, vocab in [(1, 49152), (8, 49152), (1, 262144), (3, 262144), (24, 262144)]:
    x = jnp.asarray(rng.standard_normal((rows, vocab), np.float32))
    assert all((f(x) == WAYS["argmax"](x)).all() for f in WAYS.values())
    print(f"| {rows} x {vocab} | " + " | ".join(f"{median_seconds(lambda: f(x), 15) * 1e3:.2f}" for f in WAYS.values()) + " |")
