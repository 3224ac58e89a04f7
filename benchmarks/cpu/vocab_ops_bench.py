"""What a step's passes over the vocabulary cost on XLA:CPU, ms per call (median of 15):
the greedy choice (`greedy_tokens`: chunked max, then the first chunk and entry holding it) against
`jnp.argmax` and a one-level max-then-index search; a sampled token (`Sampler`, T = 1); and tree
verification of a 4-node tree ([[0], [1], [0, 0]]), greedy and at T = 1.

    python benchmarks/cpu/vocab_ops_bench.py
"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.decoding.sampling import Greedy, Sampler, greedy_tokens
from jaxaccel.decoding.timing import median_seconds
from jaxaccel.decoding.tree import Tree
from jaxaccel.decoding.verify import verify_tree


def one_level(logits_xv):
    v = logits_xv.shape[-1]
    top_x1 = jnp.max(logits_xv, axis=-1, keepdims=True)
    return jnp.min(jnp.where(logits_xv == top_x1, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def ms(f, *args) -> str:
    return f"{median_seconds(lambda: f(*args), 15) * 1e3:.2f}"


WAYS = {"greedy_tokens": jax.jit(greedy_tokens), "argmax": jax.jit(lambda x: jnp.argmax(x, -1)),
        "one-level max, then index": jax.jit(one_level)}
rng = np.random.default_rng(0)
print(f"{jax.devices()[0]}\n\n| rows x vocabulary | " + " | ".join(WAYS) + " |\n|---|" + "---:|" * len(WAYS))
for rows, vocab in [(1, 49152), (8, 49152), (1, 262144), (3, 262144), (24, 262144)]:
    x = jnp.asarray(rng.standard_normal((rows, vocab), np.float32))
    assert all((f(x) == WAYS["argmax"](x)).all() for f in WAYS.values())
    print(f"| {rows} x {vocab} | " + " | ".join(ms(f, x) for f in WAYS.values()) + " |")

tree, sampler, key = Tree(((0,), (1,), (0, 0))), Sampler(temperature=1.0), jax.random.key(0)
draw = jax.jit(lambda x, k: sampler(x, k))
print("\n| vocabulary | Sampler (1 row) | verify 4 nodes, greedy | verify 4 nodes, T = 1 |\n|---|---:|---:|---:|")
for vocab in (49152, 262144):
    logits_bnv = jnp.asarray(rng.standard_normal((1, 4, vocab), np.float32) * 3)
    draft_bn = jnp.asarray(rng.integers(0, vocab, (1, 4)), jnp.int32)
    verify = {p: jax.jit(lambda x, k, p=p: verify_tree(tree, draft_bn, x, p, k)) for p in (Greedy(), sampler)}
    print(f"| {vocab} | {ms(draw, logits_bnv[:, 0], key)} | {ms(verify[Greedy()], logits_bnv, key)} | "
          f"{ms(verify[sampler], logits_bnv, key)} |")
