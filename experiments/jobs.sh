# Shared by the experiment scripts (sourced): run training jobs side by side, skip finished runs, resume killed ones.
#   JOBS (2): runs at once, each with one torch thread (two 2-thread jobs on 2 cores slow each other down up to 5x)
#   PA (array): the polyalign command; FAILED: set to 1 when a job failed
# train_run CONFIG RUN SEED [overrides...]: train (or resume) into RUN unless RUN/metrics.json exists; RUN.log holds
#   the output, RUN.wall the wall seconds. slot: wait until fewer than JOBS jobs run. wait_all: wait for every job.
# KEEP (set by each script to experiments/results/<experiment>, "" when SMOKE=1 or to switch it off): every finished
#   run's small files (metrics, log, config, wall time) are saved there, in the repository, and restored into OUT
#   before the runs start, so a session on a new machine skips what an earlier one finished (experiments/keep.py)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
JOBS=${JOBS:-2}
FAILED=0

train_run() {
  local cfg=$1 run=$2 s=$3 t0
  shift 3
  [[ -f $run/metrics.json ]] && return 0
  mkdir -p "$(dirname "$run")"
  t0=$(date +%s)
  echo "$(date +%H:%M:%S) start $run"
  "${PA[@]}" train "$cfg" train.seed="$s" train.threads=1 "$@" --out "$run" --resume > "$run.log" 2>&1 \
    || { echo "FAILED: $run (see $run.log)"; return 1; }
  echo $(( $(date +%s) - t0 )) > "$run.wall"
  echo "$(date +%H:%M:%S) done  $run ($(cat "$run.wall") s)"
  keep_save
}

keep_restore() {  # before the first run: the kept runs back into OUT (never overwriting)
  [[ -z ${KEEP:-} || ! -d $KEEP ]] || ${PYTHON:-python} experiments/keep.py restore "$KEEP" "$OUT"
}

keep_save() {  # after a run finished: every finished run of OUT into KEEP
  [[ -z ${KEEP:-} ]] || ${PYTHON:-python} experiments/keep.py save "$OUT" "$KEEP" > /dev/null \
    || echo "warning: could not keep the finished runs in $KEEP"
}

slot() {
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || FAILED=1; done
}

wait_all() {
  while (( $(jobs -rp | wc -l) > 0 )); do wait -n || FAILED=1; done
}
