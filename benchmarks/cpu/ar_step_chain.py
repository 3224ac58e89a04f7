"""The decode step's matmuls alone (random SmolLM2-shaped weights, 538 MB), as a dependent chain, against
the floor's independent matrix-vector products; variants of the matmul formulation. ar_step_notes.md."""
import os, sys, jax, jax.numpy as jnp, numpy as np
from jaxaccel.decoding.timing import median_seconds
rng = np.random.default_rng(0)
def mk(*s): return jnp.asarray(rng.standard_normal(s, np.float32) * 0.02)
L = [dict(q=mk(576, 576), k=mk(576, 192), v=mk(576, 192), o=mk(576, 576), g=mk(576, 1536), u=mk(576, 1536), d=mk(1536, 576)) for _ in range(30)]
E = mk(49152, 576)
MM = {
  "dot": lambda x, w: x @ w,
  "reduce": lambda x, w: jnp.sum(x[0][:, None] * w, axis=0)[None],
  "split2": lambda x, w: sum(x[:, h * (w.shape[0] // 2):(h + 1) * (w.shape[0] // 2)] @ w.reshape(2, -1, w.shape[1])[h] for h in range(2)),
  "bmm2": lambda x, w: jnp.einsum("bhi,hio->bo", x.reshape(1, 2, -1), w.reshape(2, -1, w.shape[1])),
}
def chain(L, E, x, mm):
    for p in L:
        q, k, v = mm(x, p["q"]), mm(x, p["k"]), mm(x, p["v"])
        a = q * 1e-3 + jnp.tile(k + v, 3) * 1e-3
        x = x + mm(a, p["o"])
        x = x + mm(jax.nn.silu(mm(x, p["g"])) * mm(x, p["u"]), p["d"])
    return jnp.einsum("bd,vd->bv", x, E)
def floor(arrs): return [a @ jnp.ones(a.shape[-1]) for a in arrs]
x = jnp.ones((1, 576)) * 0.1
g = jax.jit(floor)
arrs = jax.tree.leaves((L, E))
names = sys.argv[1:] or list(MM)
fs = {n: jax.jit(lambda L, E, x, mm=MM[n]: chain(L, E, x, mm)) for n in names}
ref = fs[names[0]](L, E, x)
for n in names:
    txt = fs[n].lower(L, E, x).compile().as_text()
    print(n, "copies of weights?", txt.count("f32[288,1536]") + txt.count("f32[768,576]"), "maxdiff", float(jnp.max(jnp.abs(fs[n](L, E, x) - ref))))
res = {n: [] for n in names}
for _ in range(3):
    fl = median_seconds(lambda: g(arrs), 7)
    line = f"  floor {fl*1e3:.2f}"
    for n in names:
        c = median_seconds(lambda: fs[n](L, E, x), 7); res[n].append(c / fl); line += f"  {n} {c*1e3:.2f} ({c/fl:.2f})"
    print(line, "load", open("/proc/loadavg").read().split()[0], flush=True)
