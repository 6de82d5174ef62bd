#!/bin/bash
# EigenPSF-DPS: train a prior on a folder of clean images as a Slurm job, requeued on preemption.
# Every #SBATCH line can be overridden on the sbatch command line (e.g. --gres=gpu:4 --time=24:00:00).
#
#SBATCH --job-name=eigenpsf-train
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#
#   sbatch scripts/slurm_train.sh CLEAN_DIR SAVE_DIR [main.py flags, e.g. --set train.steps=50000]
#
# Preemption: Slurm sends USR1 300 s before the time limit and TERM when it preempts; both are
# forwarded to main.py, which finishes its step, writes checkpoint.pt and exits with 75; this script
# then requeues the job, and the requeued job resumes from the newest train_*/checkpoint.pt in
# SAVE_DIR. With NPROC > 1 (one process per GPU of the node) it runs under torchrun, whose
# DistributedDataParallel splits the global batch (train.batch_size) among the processes.
#
# Environment: NPROC (processes, default 1), PYTHON (default python), EIGENPSF_DIR (repository,
# default the submit directory).
set -uo pipefail

CLEAN_DIR=${1:?usage: sbatch scripts/slurm_train.sh CLEAN_DIR SAVE_DIR [main.py flags]}
SAVE_DIR=${2:?usage: sbatch scripts/slurm_train.sh CLEAN_DIR SAVE_DIR [main.py flags]}
shift 2
REPO=${EIGENPSF_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-1}
mkdir -p "$SAVE_DIR"

CKPT=$(ls -t "$SAVE_DIR"/train_*/checkpoint.pt 2>/dev/null | head -n 1)
if [ -n "$CKPT" ]; then
  echo "resuming $(dirname "$CKPT") (restart ${SLURM_RESTART_COUNT:-0})"
  ARGS=(--resume "$(dirname "$CKPT")")
else
  ARGS=(--train_dir "$CLEAN_DIR" --save_dir "$SAVE_DIR" "$@")
fi
if [ "$NPROC" -gt 1 ]; then
  LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
else
  LAUNCH=("$PYTHON")
fi
echo "${LAUNCH[*]} main.py ${ARGS[*]}"

source "$REPO/scripts/run_and_requeue.sh"
run_and_requeue "" "${SLURM_JOB_ID:-}" "${LAUNCH[@]}" "$REPO/main.py" "${ARGS[@]}"
