# Shared by the experiment scripts (sourced): run training jobs side by side, skip finished runs, resume killed ones.
#   JOBS (2): runs at once, each with one torch thread (two 2-thread jobs on 2 cores slow each other down up to 5x)
#   PA (array): the polyalign command; FAILED: set to 1 when a job failed
# train_run CONFIG RUN SEED [overrides...]: train (or resume) into RUN unless RUN/metrics.json exists; RUN.log holds
#   the output, RUN.wall the wall seconds. slot: wait until fewer than JOBS jobs run. wait_all: wait for every job.
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
}

slot() {
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || FAILED=1; done
}

wait_all() {
  while (( $(jobs -rp | wc -l) > 0 )); do wait -n || FAILED=1; done
}
