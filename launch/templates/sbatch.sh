#!/bin/bash
# Multi-node training under SLURM: TP inside a node, DP across nodes.
#   sbatch launch/templates/sbatch.sh configs/gpt2-small.yaml
# Edit the resources for your cluster. One srun task per GPU; every task finds its rank, the
# world size and rank 0's node from SLURM's variables (lm/distributed.py), so no launcher and no
# ssh between nodes are needed. Checkpoints, metrics and TensorBoard logs go to train.out_dir,
# which must be on a filesystem every node sees.
# 120 s before the time limit SLURM sends USR1 to this script (B:), which passes it to the tasks:
# they checkpoint the step they reach and exit 0 (train.save_on_signal), and the job is requeued
# to continue from that checkpoint (--resume auto). A preemption's SIGTERM ends the tasks alike.
#SBATCH --job-name=twicing-lm
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail
CONFIG=${1:?usage: sbatch sbatch.sh CONFIG [lm train options]}
shift
cd "${SLURM_SUBMIT_DIR}"
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK}
# Check the layout against the allocation before any GPU is touched (prints, starts nothing).
.venv/bin/lm launch --config "$CONFIG" --slurm --dry-run --set train.tensor_parallel=8 "$@" >/dev/null

signalled="" interrupted="" srun_pid=""
on_usr1() {
    signalled=USR1 interrupted=1
    if [ -n "$srun_pid" ]; then kill -USR1 "$srun_pid" || true; fi  # srun passes it on to every task
}
trap on_usr1 USR1
# TP 8 within a node (NVLink), DP over the 4 nodes; --resume auto continues after a requeue.
srun --kill-on-bad-exit=1 .venv/bin/python -m lm.train --config "$CONFIG" --set train.tensor_parallel=8 \
    --resume auto "$@" &
srun_pid=$!
# A trapped signal ends `wait` early: wait again until it returns srun's own status.
while true; do
    interrupted="" status=0
    wait "$srun_pid" || status=$?
    if [ -z "$interrupted" ]; then break; fi
done
if [ -n "$signalled" ]; then
    echo "sbatch.sh: stopped by $signalled (srun status $status): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
