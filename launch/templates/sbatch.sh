#!/bin/bash
# Multi-node training under SLURM: TP inside a node, DP across nodes.
#   sbatch launch/templates/sbatch.sh configs/gpt2-small.yaml
# Edit the resources for your cluster. One srun task per GPU; every task finds its rank, the
# world size and rank 0's node from SLURM's variables (lm/distributed.py), so no launcher and no
# ssh between nodes are needed. Checkpoints, metrics and TensorBoard logs go to train.out_dir,
# which must be on a filesystem every node sees.
#SBATCH --job-name=twicing-lm
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
CONFIG=${1:?usage: sbatch sbatch.sh CONFIG [lm train options]}
shift
cd "${SLURM_SUBMIT_DIR}"
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK}
# Check the layout against the allocation before any GPU is touched (prints, starts nothing).
.venv/bin/lm launch --config "$CONFIG" --slurm --dry-run --set train.tensor_parallel=8 "$@" >/dev/null
# TP 8 within a node (NVLink), DP over the 4 nodes; --resume auto continues after a requeue.
srun --kill-on-bad-exit=1 .venv/bin/python -m lm.train --config "$CONFIG" --set train.tensor_parallel=8 --resume auto "$@"
