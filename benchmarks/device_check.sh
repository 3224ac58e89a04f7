#!/usr/bin/env bash
# The GPU checks of the Pallas kernels in one call of a lent GPU machine (which holds jax, flax,
# optax, orbax, pytest; the checkout runs from PYTHONPATH=., nothing is installed there; gguf, which
# it lacks, travels as a wheel in an ignored .whl/ and goes on PYTHONPATH first, e.g.
# `pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site bash ...`):
#   1. the kernel tests with the kernels compiled for the GPU (not the interpreter);
#   2. python -m infer.kernel_bench: decode bandwidth / copy, flash FLOP/s / bf16 matmul;
#   3. python -m infer.bench: the speculative table (ar, hydra, eagle) on the shipped small model,
#      and the autoregressive loop on a random ~2 GB Llama against its weight-streaming floor.
# Usage there: bash benchmarks/device_check.sh   (~8 min; JAX_PLATFORMS=cpu is a dry run here)
# Results under $OUT (else runs/device), six files: device_check.log, kernels.json,
# spec/spec_bench.{json,md}, ar_2gb/bench.{json,md}; the end of the output is a summary.
# Those of an H200 are in benchmarks/h200/ (README, "On an H200").
# Floors on an H200 (copy ~4.3 TB/s, bf16 matmul ~790 TFLOP/s as measured there before): decode
# B=4, T=32768, Hkv=8, D=128 reads 537 MB of K/V -> 0.125 ms; causal flash B=1, T=4096, H=16,
# D=128 is 68.7 GFLOP -> 0.087 ms. kernel_bench reports the measured fractions of both ceilings.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/device}
mkdir -p "$out"
log="$out/device_check.log"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log everything, keep going
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*" >> "$log"
    timeout "$limit" "$@" >> "$log" 2>&1 || { echo "=== $name FAILED ($?)" >> "$log"; status=1; }
}
: > "$log"
step gpu 20 nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
step jax 60 python3 -c "import jax; print(jax.__version__, jax.devices())"

# 1. float32 dots compare IEEE with IEEE: without "highest" Triton and XLA both round to TF32
#    (each its own way), which the CPU tolerances do not allow. The TPU-interpreter tests are CPU work.
JAX_DEFAULT_MATMUL_PRECISION=highest step kernel-tests 300 python3 -m pytest -p no:cacheprovider -rfE \
    tests/test_pallas_decode_attention.py tests/test_pallas_flash_attention.py \
    tests/test_pallas_linear_attention.py tests/test_pallas_grouped_matmul.py tests/test_pallas_speculative.py \
    -k "not tpu"

# 2. kernel figures (bf16, long context), JSON with the device name and the command
step kernel-bench 180 python3 -m infer.kernel_bench --out "$out" --repeats 20

# 3. end to end: speculative vs autoregressive in one run; AR on a weight-bandwidth-bound model
small=jaxaccel/pretrained/small
step spec-bench 240 python3 -m infer.bench --model $small/model --heads $small/heads/hydra \
    --heads $small/heads/eagle --tree auto --tree dynamic:8,6,32 --temperatures 0 1 --num-prompts 8 \
    --max-new-tokens 128 --skip-transformers --out "$out/spec"
step ar-bench 120 python3 -m infer.bench --random-params 2000 --batch-size 1 --max-new-tokens 256 \
    --skip-transformers --out "$out/ar_2gb"

grep -E "^=== |passed|failed|error|fraction of|^\| |floor" "$log" | tail -n 60
exit $status
