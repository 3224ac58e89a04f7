"""Decode-loop ablations on SmolLM2 (notes: ar_step_notes.md), interleaved with the floor in one process.

Each variant patches the model code at trace time and compiles its own loop. On a shared machine the
minimum over rounds is the figure to compare (scheduling noise only adds time).

    python benchmarks/cpu/ar_step_ablate.py [NEW_TOKENS [VARIANT,VARIANT,... [ROUNDS]]]   (MODEL=dir)
"""
import os
import sys, time, statistics, functools, contextlib
import jax, jax.numpy as jnp, numpy as np
from jaxaccel.hf import load_hf
from jaxaccel.decoding import autoregressive as ar
from jaxaccel.decoding.sampling import Greedy
from jaxaccel.decoding.timing import weight_streaming_floor
from jaxaccel.layers import attention as attn
from jaxaccel import model as M

model = load_hf(os.environ.get('MODEL', '/tmp/smollm2_hf'))
dec = ar.AutoregressiveDecoder(model)
prompts = np.random.default_rng(0).integers(0, 49152, (1, 64)).tolist()
N = int(sys.argv[1]) if len(sys.argv) > 1 else 64

def logits_einsum(self, h):
    return jnp.einsum("bnd,vd->bnv", h, self.embed_tokens.embedding[...]).astype(jnp.float32)
def logits_attend(self, h):  # the LM head before this change: h @ E.T via Embed.attend
    return self.embed_tokens.attend(h).astype(jnp.float32)
def logits_none(self, h):
    return jnp.pad(h, ((0, 0), (0, 0), (0, 64))).astype(jnp.float32)  # argmax over something cheap
def dpa_none(q, k, v, vis, impl="xla"):
    return q + k[:, :1].mean() + v[:, :1].mean()
def dpa_reduce(q, k, v, vis, impl="xla"):   # scores and outputs as multiply+reduce over the cache's own layout
    b, n, hq, d = q.shape; hkv = k.shape[2]
    q5 = q.reshape(b, n, hkv, hq // hkv, d)
    s = jnp.sum(q5[:, :, None].astype(jnp.float32) * k[:, None, :, :, None, :], axis=-1)   # [b,n,t,k,g]
    s = jnp.where(vis[:, :, :, None, None], s * d**-0.5, attn.MASKED)
    p = jax.nn.softmax(s, axis=2).astype(v.dtype)
    o = jnp.sum(p[..., None] * v[:, None, :, :, None, :], axis=2)    # [b,n,k,g,d]
    return o.reshape(b, n, hq, d)

VARIANTS = {
    "base": {},
    "lm_attend": {(M.Transformer, "logits"): logits_attend},
    "lm_einsum": {(M.Transformer, "logits"): logits_einsum},
    "lm_einsum+attn_reduce": {(M.Transformer, "logits"): logits_einsum, (attn, "dot_product_attention"): dpa_reduce},
    "lm_einsum+no_attn": {(M.Transformer, "logits"): logits_einsum, (attn, "dot_product_attention"): dpa_none},
    "no_lm_head": {(M.Transformer, "logits"): logits_none},
}
names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)

@contextlib.contextmanager
def patched(p):
    old = {k: getattr(*k) for k in p}
    for (o, a), f in p.items(): setattr(o, a, f)
    try: yield
    finally:
        for (o, a), f in old.items(): setattr(o, a, f)

loops, toks = {}, {}
for n in names:
    with patched(VARIANTS[n]):
        jax.clear_caches()
        def loop_fn(*a, **k): return ar.decode_loop(*a, **k)
        fn = jax.jit(loop_fn, static_argnums=0, static_argnames=("policy",), donate_argnames=("state",))
        st, sid = dec.start(prompts, policy=Greedy(), max_new_tokens=N)
        out = fn(dec.graphdef, dec.params, st, sid, policy=Greedy())
        toks[n] = np.asarray(out.result.tokens_bn)[0].tolist()
        loops[n] = fn
    print(n, "tokens same as base:", toks[n] == toks[names[0]], flush=True)

def time_loop(fn):
    st, sid = dec.start(prompts, policy=Greedy(), max_new_tokens=N); jax.block_until_ready(st)
    t = time.perf_counter(); out = jax.block_until_ready(fn(dec.graphdef, dec.params, st, sid, policy=Greedy()))
    return (time.perf_counter() - t) / (int(out.step) - 1)

res = {n: [] for n in names}; floors = []
for r in range(int(sys.argv[3]) if len(sys.argv) > 3 else 3):
    fl = weight_streaming_floor(dec.params, repeats=3)["by_method"]; floors += list(fl.values())
    for n in names:
        res[n] += [time_loop(loops[n]) for _ in range(2)]
    print(f"round {r} load", open("/proc/loadavg").read().split()[0], " ".join(f"{n}={min(v)*1e3:.2f}" for n, v in res.items()), f"floor={min(floors)*1e3:.2f}", flush=True)
fl = min(floors)
print(f"floor min {fl*1e3:.2f} ms, median {np.median(floors)*1e3:.2f}")
for n in names:
    print(f"{n:24s} step min {min(res[n])*1e3:6.2f} ms ({min(res[n])/fl:.3f}x floor)  median {np.median(res[n])*1e3:6.2f} ms")
