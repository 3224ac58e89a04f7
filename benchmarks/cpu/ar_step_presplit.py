"""Pre-split weights (each matmul as two independent half-products on weights stored apart, so that
XLA:CPU's thunk executor could run the halves on both cores) vs the plain chain vs the floor. ar_step_notes.md."""
import jax, jax.numpy as jnp, numpy as np
from jaxaccel.decoding.timing import median_seconds
rng = np.random.default_rng(0)
def mk(*s): return jnp.asarray(rng.standard_normal(s, np.float32) * 0.02)
shapes = dict(q=(576, 576), k=(576, 192), v=(576, 192), o=(576, 576), g=(576, 1536), u=(576, 1536), d=(1536, 576))
L = [{n: mk(*s) for n, s in shapes.items()} for _ in range(30)]
E = mk(49152, 576)
def split_out(w, parts=2): return [jnp.asarray(c) for c in np.split(np.asarray(w), parts, axis=1)]
LS = [{n: split_out(w) for n, w in p.items()} for p in L]
ES = [jnp.asarray(c) for c in np.split(np.asarray(E), 2, axis=0)]
def mm(x, w): return x @ w
def mms(x, ws): return jnp.concatenate([x @ w for w in ws], axis=-1)
def chain(L, E, x, mm, head):
    for p in L:
        q, k, v = mm(x, p["q"]), mm(x, p["k"]), mm(x, p["v"])
        a = q * 1e-3 + jnp.tile(k + v, 3) * 1e-3
        x = x + mm(a, p["o"])
        x = x + mm(jax.nn.silu(mm(x, p["g"])) * mm(x, p["u"]), p["d"])
    return head(x, E)
plain_head = lambda x, E: jnp.einsum("bd,vd->bv", x, E)
split_head = lambda x, Es: jnp.concatenate([jnp.einsum("bd,vd->bv", x, e) for e in Es], axis=-1)
def floor(arrs): return [a @ jnp.ones(a.shape[-1]) for a in arrs]
x = jnp.ones((1, 576)) * 0.1
g = jax.jit(floor)
arrs = jax.tree.leaves((L, E))
f_plain = jax.jit(lambda L, E, x: chain(L, E, x, mm, plain_head))
f_split = jax.jit(lambda L, E, x: chain(L, E, x, mms, split_head))
print("maxdiff", float(jnp.max(jnp.abs(f_plain(L, E, x) - f_split(LS, ES, x)))))
for _ in range(4):
    fl = median_seconds(lambda: g(arrs), 9)
    a = median_seconds(lambda: f_plain(L, E, x), 9)
    b = median_seconds(lambda: f_split(LS, ES, x), 9)
    print(f"floor {fl*1e3:.2f}  plain {a*1e3:.2f} ({a/fl:.2f})  presplit {b*1e3:.2f} ({b/fl:.2f})  load", open("/proc/loadavg").read().split()[0], flush=True)
