#!/usr/bin/env bash
# Issue 22: FDT at its operating point. Two tasks — the granularity task (shapes_clutter: queries name one object of
# a cluttered scene, any scene containing it is a hit) and four-style emoji (held-out twitter style) — both on
# pretrained towers (EfficientNet-Lite0 patch tokens, MiniLM word tokens); rows at equal samples (configs/fdt22/):
#   clip-mean  CLIP, pooled tokens → linear head (today's)      clip-max  CLIP, FDT's query MLP per token, max-pooled
#   fdt        FDT alone, T_fdt calibrated to 10 % active         fdt-clip  FDT + CLIP losses (1/1)
#   fdt-c16k   FDT at the authors' C = 16,384, T = 1,000
#   bash experiments/fdt22.sh                          # everything (3 seeds), JOBS=2 side by side
#   python experiments/fdt22_report.py runs/fdt22      # tables, active-fraction plot, paired differences
#   SMOKE=1 OUT=/tmp/fdt22-smoke bash experiments/fdt22.sh   # 2 steps on small data: the pipeline end to end
# Env: OUT (runs/fdt22), POLYALIGN (polyalign), SEEDS ("0 1 2"), TASKS ("clutter emoji"), ROWS (all five), JOBS (2).
# Layout: OUT/<task>/<row>/seed-<s>; finished runs are skipped, killed ones resumed; finished runs are kept in KEEP
# (experiments/results/fdt22, in the repository: commit it) and restored from there (experiments/jobs.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
read -ra PA <<< "${POLYALIGN:-polyalign}"
OUT=${OUT:-runs/fdt22}
SEEDS=${SEEDS:-0 1 2}
TASKS=${TASKS:-clutter emoji}
ROWS=${ROWS:-clip-mean clip-max fdt fdt-clip fdt-c16k}
KEEP=${KEEP-experiments/results/fdt22}
source experiments/jobs.sh

SMOKE_ARGS=()
if [[ ${SMOKE:-0} == 1 ]]; then
  KEEP=""
  SMOKE_ARGS=(train.max_steps=2 train.warmup_steps=1 train.checkpoint_every=1 train.log_every=1 train.batch_size=16
              eval.probe_max_train=200 eval.bootstrap_resamples=20 data.train_size=200 data.val_size=20
              data.test_size=100)
fi
smoke() {  # the smoke overrides that apply to TASK (emoji reads manifests: no data sizes)
  local a
  for a in "${SMOKE_ARGS[@]}"; do
    [[ $1 == emoji && $a == data.* ]] || echo "$a"
  done
}

config() {  # config TASK ROW
  if [[ $2 == fdt ]]; then echo "configs/fdt22/$1.yaml"; else echo "configs/fdt22/$1-$2.yaml"; fi
}

keep_restore
# the first run of each task alone: it writes the frozen EfficientNet prefix's outputs to data.cache_dir (minutes for
# the 20k clutter images at 128 px), which every later row and seed of the task then loads instead
for task in $TASKS; do
  first_seed=${SEEDS%% *} first_row=${ROWS%% *}
  # shellcheck disable=SC2046
  train_run "$(config "$task" "$first_row")" "$OUT/$task/$first_row/seed-$first_seed" "$first_seed" $(smoke "$task") \
    || FAILED=1
done
for task in $TASKS; do
  for s in $SEEDS; do
    for row in $ROWS; do
      slot
      # shellcheck disable=SC2046
      train_run "$(config "$task" "$row")" "$OUT/$task/$row/seed-$s" "$s" $(smoke "$task") &
    done
  done
done
wait_all
(( FAILED == 0 )) || { echo "some runs failed: rerun to retry them (finished runs are skipped)"; exit 1; }
echo "all runs done: python experiments/fdt22_report.py $OUT"
