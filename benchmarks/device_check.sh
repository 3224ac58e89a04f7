#!/usr/bin/env bash
# The GPU checks of the Pallas kernels in one call of a lent GPU machine (which holds jax, flax,
# optax, orbax, pytest; the checkout runs from PYTHONPATH=., nothing is installed there):
#   1. the kernel tests with the kernels compiled for the GPU (not the interpreter);
#   2. python -m infer.kernel_bench: decode bandwidth / copy, flash FLOP/s / bf16 matmul;
#   3. python -m infer.bench: the speculative table (ar, hydra, eagle) on the shipped small model,
#      and the autoregressive loop on a random ~2 GB Llama against its weight-streaming floor.
# Usage there: bash benchmarks/device_check.sh   (results under $OUT, else runs/device; ~8 min)
# Floors on an H200 (copy ~4.3 TB/s, bf16 matmul ~790 TFLOP/s as measured there before): decode
# B=4, T=32768, Hkv=8, D=128 reads 537 MB of K/V -> 0.125 ms; causal flash B=1, T=4096, H=16,
# D=128 is 68.7 GFLOP -> 0.087 ms. kernel_bench reports the measured fractions of both ceilings.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/device}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
status=0
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$out/gpu.csv" 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee "$out/jax.txt"

# 1. float32 dots compare IEEE with IEEE: without "highest" Triton and XLA both round to TF32
#    (each its own way), which the CPU tolerances do not allow. The TPU-interpreter tests are CPU work.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 300 python3 -m pytest -q -p no:cacheprovider \
    tests/test_pallas_decode_attention.py tests/test_pallas_flash_attention.py \
    tests/test_pallas_linear_attention.py tests/test_pallas_grouped_matmul.py tests/test_pallas_speculative.py \
    -k "not tpu" > "$out/kernel_tests.log" 2>&1 || status=1
tail -n 15 "$out/kernel_tests.log"

# 2. kernel figures (bf16, long context), JSON with the device name and the command
timeout 180 python3 -m infer.kernel_bench --out "$out" --repeats 20 > "$out/kernel_bench.log" 2>&1 || status=1
tail -n 5 "$out/kernel_bench.log"

# 3. end to end: speculative vs autoregressive in one run; AR on a weight-bandwidth-bound model
small=jaxaccel/pretrained/small
timeout 240 python3 -m infer.bench --model $small/model --heads $small/heads/hydra --heads $small/heads/eagle \
    --tree auto --tree dynamic:8,6,32 --temperatures 0 1 --num-prompts 8 --max-new-tokens 128 \
    --skip-transformers --out "$out/spec" > "$out/spec_bench.log" 2>&1 || status=1
tail -n 12 "$out/spec_bench.log"
timeout 120 python3 -m infer.bench --random-params 2000 --batch-size 1 --max-new-tokens 256 --skip-transformers \
    --out "$out/ar_2gb" > "$out/ar_bench.log" 2>&1 || status=1
tail -n 6 "$out/ar_bench.log"
exit $status
