"""Floor and AR step alternating in one process, 3 rounds (ar_step_notes.md). python benchmarks/cpu/ar_step_ratio.py [max_new_tokens]"""
import sys, os, numpy as np, jax
from jaxaccel.hf import load_hf
from jaxaccel.decoding.autoregressive import AutoregressiveDecoder
from jaxaccel.decoding.timing import weight_streaming_floor, time_decode
model = load_hf(os.environ.get("MODEL", "/tmp/smollm2_hf"))
dec = AutoregressiveDecoder(model)
prompts = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 64)).tolist()
n = int(sys.argv[1]) if len(sys.argv) > 1 else 64
out = []
for r in range(3):
    fl = weight_streaming_floor(dec.params)["seconds"]
    t = time_decode(dec, prompts, max_new_tokens=n, repeats=3)
    out.append((fl, t["step_s"]))
    print(f"  floor {fl*1e3:.2f} ms  step {t['step_s']*1e3:.2f} ms  ratio {t['step_s']/fl:.3f}", flush=True)
print(f"{os.environ.get('XLA_FLAGS','')}: median ratio {np.median([s/f for f, s in out]):.3f}  step {np.median([s for f,s in out])*1e3:.2f}  floor {np.median([f for f,s in out])*1e3:.2f}")
print("tokens", t["result"].sequences()[0][:12])
