# Sourced by the sbatch scripts of this folder; submit them from the repository root.
#
# What it gives a script:
#   t2i_setup            cd to the submit directory, pick python, set RUN_NAME / RUN_DIR and
#                        T2I_OVERRIDES (run directory, W&B name/group, a sweep's line)
#   t2i_step CMD ...     run the job step in the background, pass a signal the batch shell gets
#                        (Slurm's pre-timeout USR1, a TERM) on to every step, and requeue the
#                        job when USR1 stopped it early
#   t2i_sweep_line F N   the N-th (0-based) run of a sweep file
#
# Sweeps (job arrays): SWEEP=slurm/sweeps/t2i_init_and_freezing.txt sbatch --array=0-5 SCRIPT ...
# Each non-comment line of the file is `name section.key=value ...`; array task N runs line N
# with its overrides applied after the command line's, in runs/<job name>-<array job id>-<name>,
# as W&B run <name> in group <job name>-<array job id>.
#
# Exit codes the trainer returns (megatron_t2i/training/faults.py): 0 done, 1 error,
# 2 bad config, 75 stopped on a signal after saving a checkpoint.

T2I_PREEMPTED=75

t2i_log() { echo "[slurm $(date +%H:%M:%S)] $*"; }

t2i_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif [ -x .venv/bin/python ]; then echo .venv/bin/python
  else command -v python3
  fi
}

t2i_sweep_line() {
  grep -vE '^[[:space:]]*(#|$)' "$1" | sed -n "$(($2 + 1))p"
}

t2i_setup() {
  cd "${SLURM_SUBMIT_DIR:-.}"
  PY=$(t2i_python)
  local job_id=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:?not inside a Slurm job}}
  RUN_NAME="${SLURM_JOB_NAME:-t2i}-$job_id"
  local sweep_overrides=() group=""
  if [ -n "${SWEEP:-}" ]; then
    [ -n "${SLURM_ARRAY_TASK_ID:-}" ] || { t2i_log "SWEEP=$SWEEP needs sbatch --array"; exit 2; }
    local line words
    line=$(t2i_sweep_line "$SWEEP" "$SLURM_ARRAY_TASK_ID")
    [ -n "$line" ] || { t2i_log "$SWEEP has no run $SLURM_ARRAY_TASK_ID (0-based)"; exit 2; }
    read -r -a words <<<"$line"
    group=$RUN_NAME
    RUN_NAME="$RUN_NAME-${words[0]}"
    sweep_overrides=("${words[@]:1}")
    t2i_log "sweep $SWEEP run $SLURM_ARRAY_TASK_ID: $line"
  elif [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    RUN_NAME="$RUN_NAME-$SLURM_ARRAY_TASK_ID"
  fi
  RUN_DIR=${T2I_RUNS:-runs}/$RUN_NAME
  # the job's defaults, then the command line's overrides, then the sweep line's: last wins
  T2I_OVERRIDES=("train.run_dir=$RUN_DIR" "logging.wandb_name=$RUN_NAME")
  [ -z "$group" ] || T2I_OVERRIDES+=("logging.wandb_group=$group")
  T2I_OVERRIDES+=("$@" "${sweep_overrides[@]}")
  # A step's ranks compute the same port from the job id; a requeued job keeps its id.
  export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
  t2i_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST," \
    "run $RUN_NAME, python $PY"
}

_t2i_forward() {
  T2I_SIGNAL=$1
  t2i_log "batch shell got SIG$1: passing it on to the job's steps"
  # every step of the job, not this shell (scancel spares the batch step unless --batch/--full)
  scancel --signal="$1" "$SLURM_JOB_ID" || true
}

t2i_step() {
  T2I_SIGNAL=""
  trap '_t2i_forward USR1' USR1
  trap '_t2i_forward TERM' TERM
  "$@" &
  local pid=$! rc
  # a trapped signal also ends `wait` (status 128 + the signal), so wait until the step is
  # gone; its own status then comes from one more `wait` (bash keeps it): a step that exited
  # while the trap ran would otherwise be reported with the trap's 138
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || true
  done
  rc=0
  wait "$pid" || rc=$?
  trap - USR1 TERM
  t2i_log "step exited with status $rc"
  # USR1 is the pre-timeout warning (--signal=B:USR1@SECONDS): when the ranks saved and left
  # with 75, the job goes back to the queue to resume from `latest` under the same job id.
  # Any other status (an error, a save that failed) is not requeued: it would fail again.
  if [ "$T2I_SIGNAL" = USR1 ] && [ "$rc" = "$T2I_PREEMPTED" ]; then
    # logged first: a successful requeue cancels this batch shell at once, often before the
    # next line would run
    t2i_log "requeueing job $SLURM_JOB_ID; it resumes from the last checkpoint"
    scontrol requeue "$SLURM_JOB_ID" \
      || t2i_log "could not requeue job $SLURM_JOB_ID (submitted with --no-requeue?)"
  elif [ -n "$T2I_SIGNAL" ]; then
    t2i_log "not requeued: the step exited $rc after SIG$T2I_SIGNAL, not $T2I_PREEMPTED" \
      "(stopped after a complete checkpoint)"
  fi
  return "$rc"
}
