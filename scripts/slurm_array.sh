#!/bin/bash
# EigenPSF-DPS sweep task for a Slurm job array. Every #SBATCH line can be overridden on the
# sbatch command line (e.g. --time=04:00:00 --gres=gpu:a100:1 --partition=preempt).
#
#SBATCH --job-name=eigenpsf-dps
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=02:00:00
#SBATCH --output=slurm-%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#
# 1. On a login node (internet), fetch the weights once into a shared cache:
#      python main.py --download_only --model_cache /shared/hf-cache
# 2. Expand a sweep spec into one main.py argument line per task:
#      python scripts/sweep.py make sweep.yaml          # prints N and this sbatch line
# 3. Submit (compute nodes run offline, HF_HUB_OFFLINE=1):
#      MODEL_CACHE=/shared/hf-cache sbatch --array=0-$((N-1))%8 scripts/slurm_array.sh SWEEP_DIR
# 4. Gather:  python scripts/sweep.py collect SWEEP_DIR
#
# Preemption: Slurm sends USR1 120 s before the time limit (--signal=B:USR1@120) and TERM when it
# preempts. Both are forwarded to main.py, which finishes its step, writes checkpoint.pt and exits
# with 75; this script then requeues the task, and the requeued task resumes from the checkpoint.
#
# Folder runs (--image_dir/--blurred_dir in the task line) restore BATCH_SIZE measurements per
# sampler call (default: the task line's or config's); a stopped folder run resumes from its
# batch_*/checkpoint.pt like a single run. Sensible values per GPU are in docs/hpc.md.
#
# Environment: MODEL_CACHE (shared hub cache), BATCH_SIZE, PYTHON (interpreter, default python),
# EIGENPSF_DIR (repository, default the submit directory), HF_HUB_OFFLINE (default 1).
set -uo pipefail

SWEEP_DIR=${1:?usage: sbatch --array=0-N scripts/slurm_array.sh SWEEP_DIR}
REPO=${EIGENPSF_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
TASK=${SLURM_ARRAY_TASK_ID:?run this through sbatch --array}
LINE=$(sed -n "$((TASK + 1))p" "$SWEEP_DIR/tasks.txt")
if [ -z "$LINE" ]; then echo "error: no task $TASK in $SWEEP_DIR/tasks.txt" >&2; exit 2; fi
TASK_DIR=$SWEEP_DIR/$(printf 'task_%04d' "$TASK")
mkdir -p "$TASK_DIR"

CKPT=$(ls -t "$TASK_DIR"/run_*/checkpoint.pt "$TASK_DIR"/batch_*/checkpoint.pt 2>/dev/null | head -n 1)
if [ -n "$CKPT" ]; then
  echo "task $TASK: resuming $(dirname "$CKPT") (restart ${SLURM_RESTART_COUNT:-0})"
  ARGS=(--resume "$(dirname "$CKPT")")
else
  eval "ARGS=($LINE)"   # the line was written with shlex.join by sweep.py
  ARGS+=(--save_dir "$TASK_DIR")
  if [ -n "${MODEL_CACHE:-}" ]; then ARGS+=(--model_cache "$MODEL_CACHE"); fi
  if [ -n "${BATCH_SIZE:-}" ]; then ARGS+=(--batch_size "$BATCH_SIZE"); fi
  echo "task $TASK: $PYTHON main.py ${ARGS[*]}"
fi

source "$REPO/scripts/run_and_requeue.sh"
run_and_requeue "task $TASK: " "${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${TASK}}" "$PYTHON" "$REPO/main.py" "${ARGS[@]}"
