#!/usr/bin/env bash
# Issue 23: the soft-mask ablation branched from one trained baseline (configs/albef23/shapes.yaml).
#   bash experiments/albef23.sh baseline   # train the baseline (resumable: rerun after a kill), then its gate report
#   bash experiments/albef23.sh branches   # every row x 3 seeds from the baseline's last checkpoint, BRANCH_STEPS more
#   bash experiments/albef23.sh eval       # the mechanism probes of every finished run (experiments/albef23_eval.py)
# Rows (overrides on the baseline's config): base (nothing: the paired control), soft (model.fusion.soft_mask, the word
# drawn from content words), focal (focal_gamma=2), textmask (text_mask_aug), distort (blur, noise, cut-out on top of
# the baseline's crop + RandAugment), all (the four together). A branch's seed changes its data order.
# Env: OUT (runs/albef23), POLYALIGN (polyalign), PYTHON (python), SEEDS ("0 1 2"), ROWS (all six), JOBS (2),
# BRANCH_STEPS (300), SMOKE=1 (a few steps on small data: the pipeline end to end).
set -euo pipefail
cd "$(dirname "$0")/.."
read -ra PA <<< "${POLYALIGN:-polyalign}"
read -ra PY <<< "${PYTHON:-python}"
OUT=${OUT:-runs/albef23}
SEEDS=${SEEDS:-0 1 2}
ROWS=${ROWS:-base soft focal textmask distort all}
BRANCH_STEPS=${BRANCH_STEPS:-300}
CFG=configs/albef23/shapes.yaml
source experiments/jobs.sh
EXTRA=()
[[ ${SMOKE:-0} != 1 ]] || EXTRA=(train.max_steps=4 train.checkpoint_every=2 train.warmup_steps=1 train.batch_size=8
                                 data.train_size=64 data.val_size=0 data.test_size=48 eval.probe_max_train=48
                                 eval.bootstrap_resamples=10 model.fusion.queue_size=32)
BASE=$OUT/shapes/baseline

row_overrides() {  # row_overrides ROW: the array `extra`
  local soft=(model.fusion.soft_mask=true) focal=(model.fusion.focal_gamma=2) textmask=(model.fusion.text_mask_aug=true)
  local distort=(data.augment.blur=0.3 data.augment.noise=0.3 data.augment.cutout=0.3)
  case $1 in
    base) extra=() ;;
    soft) extra=("${soft[@]}") ;;
    focal) extra=("${focal[@]}") ;;
    textmask) extra=("${textmask[@]}") ;;
    distort) extra=("${distort[@]}") ;;
    all) extra=("${soft[@]}" "${focal[@]}" "${textmask[@]}" "${distort[@]}") ;;
    *) echo "unknown row $1 (base soft focal textmask distort all)" >&2; exit 2 ;;
  esac
}

case ${1:-} in
  baseline)
    train_run "$CFG" "$BASE" 0 "${EXTRA[@]}"
    "${PY[@]}" experiments/albef23_eval.py "$BASE" ;;
  branches)
    [[ -f $BASE/metrics.json ]] || { echo "train the baseline first: bash $0 baseline" >&2; exit 1; }
    start=$(sed -n 's/.*"step": *\([0-9]*\).*/\1/p' "$BASE/checkpoints/latest.json" | head -1)
    total=$(( start + $( [[ ${SMOKE:-0} == 1 ]] && echo 2 || echo "$BRANCH_STEPS") ))
    for s in $SEEDS; do
      for row in $ROWS; do
        row_overrides "$row"
        slot
        train_run "$CFG" "$OUT/shapes/$row/seed-$s" "$s" "${EXTRA[@]}" "${extra[@]}" train.max_steps=$total \
          --branch-from "$BASE@$start" &
      done
    done
    wait_all ;;
  eval)
    for run in "$BASE" "$OUT"/shapes/*/seed-*; do
      [[ -f $run/metrics.json && ! -f $run/itm_probes.json ]] || continue
      "${PY[@]}" experiments/albef23_eval.py "$run" || FAILED=1
    done ;;
  *) echo "usage: $0 baseline | branches | eval" >&2; exit 2 ;;
esac
(( FAILED == 0 )) || { echo "some runs failed: rerun to retry them (finished runs are skipped)"; exit 1; }
