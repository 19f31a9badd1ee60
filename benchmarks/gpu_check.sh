#!/usr/bin/env bash
# One prepared check for a single-GPU machine whose image lacks DeepSpeed: installs the wheels that
# ../shared/device/make-wheels.sh put in .whl/, then prints the GPU figures (a few minutes).
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== attention: correctness vs float64, then timings"
python3 benchmarks/attention.py --dtype bf16
echo "== demo config on the GPU, fp32"
python3 benchmarks/train_throughput.py --steps 60
echo "== GPT-2 small, bf16, B=16 T=1024"
python3 benchmarks/train_throughput.py --config configs/gpt2-small.yaml --steps 40 --set train.batch_size=16 --compile
echo "== GPT-2 small, twicing in all layers"
python3 benchmarks/train_throughput.py --config configs/gpt2-small.yaml --steps 40 --set train.batch_size=16 --set model.twicing_layers=all --compile
