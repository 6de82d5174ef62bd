# Sourced by the Slurm scripts: run_and_requeue LABEL REQUEUE_ID COMMAND...
# Runs COMMAND (main.py) in the background, forwards USR1 and TERM to it as USR1 (main.py finishes
# its step, writes checkpoint.pt and exits with 75), waits for that checkpoint, and on exit 75
# requeues REQUEUE_ID (empty: outside Slurm, no requeue). Returns COMMAND's exit code. LABEL
# prefixes the messages (e.g. "task 3: ").
run_and_requeue() {
  local label=$1 requeue_id=$2
  shift 2
  "$@" &
  local pid=$!
  trap "echo \"${label}signal received, asking main.py to checkpoint\"; kill -USR1 $pid 2>/dev/null" USR1 TERM
  wait $pid
  local rc=$?
  while kill -0 $pid 2>/dev/null; do  # a trapped signal ends `wait` early: wait for the checkpoint
    wait $pid
    rc=$?
  done
  if [ "$rc" -eq 75 ] && [ -n "$requeue_id" ]; then
    echo "${label}preempted with a checkpoint; requeueing"
    scontrol requeue "$requeue_id"
  fi
  return $rc
}
