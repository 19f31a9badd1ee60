#!/usr/bin/env bash
# One prepared check for a single-GPU machine whose image lacks DeepSpeed: installs the wheels that
# ../shared/device/make-wheels.sh put in .whl/, runs the twicing kernel's GPU tests (bf16 and fp16),
# the attention benchmark (softmax SDPA, the Triton kernel, two SDPA passes, materialised; fwd and
# fwd+bwd time and peak memory at T = 1024, 2048, 4096 for D = 64 and 128, bf16) and the
# training-throughput tables of GPT-2 small (B=16, T=1024, bf16; softmax, then twicing in all
# layers with model.attention_impl fused and triton; compiled plain loop and DeepSpeed ZeRO stages
# GPU_CHECK_STAGES, default 0). Meant to take about 10 minutes on an H100/H200; every step is
# time-limited, so at worst 13 minutes. What it measures for the kernel goes into
# benchmarks/RESULTS.md and benchmarks/measured_fastest.json (which decides attention_impl: fused).
#   bash benchmarks/gpu_check.sh [--smoke] [RESULTS_DIR]      (default: $OUT when set, else /tmp/gpu-check)
# --smoke runs every step at toy size, on a CPU too, so that CI keeps this script working
# (tests/test_benchmarks.py).
#
# Budget, from GPU-NOTES.md (~16k tokens and ~0.04 s per step): 30 steps are ~1.5 s of training
# per row; each group of rows is dominated by compilation (~60 s cold for the plain loop, then
# Inductor's cache makes the DeepSpeed rows' compiles cheaper) and ~15 s per DeepSpeed process
# start. Every step has a timeout, so the tables written so far come back whatever hangs; the
# throughput benchmark rewrites its table after every row.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
RESULTS=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$RESULTS"
if ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$RESULTS/gpu.txt"

# What each step runs: the real sizes, or toy ones with --smoke.
TESTS=(tests/test_twicing_kernel.py)
ATTENTION=(--dtype bf16 --head-dims 64 128)
SHARDS=/tmp/gpu-check-shards  # made once (demo corpus, 2048-piece tokenizer), reused by both groups
read -r -a STAGES <<< "${GPU_CHECK_STAGES:-0}"
TRAIN=(--config configs/gpt2-small.yaml --set train.batch_size=16 --set train.micro_batch_size=16
       --set train.precision=bf16 --steps 30 --stages "${STAGES[@]}" --compile on)
TRAIN_GROUPS=(none:fused all:fused all:triton)  # twicing_layers:attention_impl; the softmax group needs one
TRAIN_TIMEOUT=150
TESTS_TIMEOUT=200  # mostly Triton compiling the five programs per head size, dtype and dQ mode
if [ "$SMOKE" = 1 ]; then
  TESTS=(tests/test_twicing_kernel.py -k "strided and multi")  # one test: a GQA kernel on strided views
  ATTENTION=(--dtype fp32 --lengths 64 --repeats 1 --head-dims 64)
  SHARDS=${GPU_CHECK_SHARDS:-$RESULTS/shards}  # tests pass shards they already have
  # The GPU's rows (the plain loop, one DeepSpeed process), uncompiled: the two-process rows are
  # the CPU's own (profile_step's test runs DDP and ZeRO-2 over two processes).
  TRAIN=(--set model.n_layer=1 --set train.precision=bf16 --steps 2 --stages 0 --two-process-stages --compile off)
  TRAIN_GROUPS=(all:fused)  # a CPU cannot run attention_impl: triton
  TRAIN_TIMEOUT=300
  TESTS_TIMEOUT=100
fi

echo "== GPU tests"
if [ -f tests/test_twicing_kernel.py ]; then
  timeout "$TESTS_TIMEOUT" python3 -m pytest -q -p no:cacheprovider "${TESTS[@]}" 2>&1 | tail -n 15 | tee "$RESULTS/tests.txt"
else
  echo "tests/test_twicing_kernel.py is missing: skipped" | tee "$RESULTS/tests.txt"
fi

echo "== attention: correctness vs float64, then timings"
timeout 240 python3 benchmarks/attention.py "${ATTENTION[@]}" 2>&1 | tee "$RESULTS/attention.txt"

tables=()
for group in "${TRAIN_GROUPS[@]}"; do
  layers=${group%%:*} impl=${group##*:}
  name=train-$layers$([ "$impl" = fused ] || echo "-$impl")
  tables+=("$name")
  echo "== GPT-2 small, bf16, B=16 T=1024, twicing_layers=$layers, attention_impl=$impl: plain compiled vs DeepSpeed"
  timeout "$TRAIN_TIMEOUT" python3 benchmarks/train_throughput.py "${TRAIN[@]}" --set "model.attention_impl=$impl" \
    --shards "$SHARDS" --twicing "$layers" --out "$RESULTS/$name.txt" 2>&1 | grep -v -e "^\[" -e Warning | tail -n 25
done

echo
echo "================ tables ================"
for f in tests attention "${tables[@]}"; do
  [ -f "$RESULTS/$f.txt" ] && { echo "--- $f"; cat "$RESULTS/$f.txt"; }
done
exit 0
