#!/usr/bin/env bash
# Issue 21, item 4: the MCT ablation where the intra-modal terms should matter. Shapes (20,000 training scenes) at
# caption fractions 1 and 0.05, four-style emoji (held-out twitter style; EfficientNet-Lite0 + MiniLM tuned) at 1 and
# 0.1; rows inter only, image-intra only, intra + inter, + text-text, + tags (configs/mct21/); 3 seeds; plus the
# references the gains are measured from: the untrained tower (each seed's step 0; emoji: a randomly initialised
# EfficientNet-Lite0) and the ImageNet-pretrained tower's features (EfficientNet-Lite0 locked, step 0).
#   bash experiments/mct21.sh                       # everything, JOBS=2 runs side by side, one torch thread each
#   python experiments/mct21_report.py runs/mct21   # the tables
#   SMOKE=1 OUT=/tmp/mct21-smoke bash experiments/mct21.sh   # 2 steps, small data: checks the pipeline end to end
# Env: OUT (runs/mct21), POLYALIGN (polyalign), PYTHON (python), SEEDS ("0 1 2"), JOBS (2), DATASETS ("emoji shapes"),
# VIEW_ROWS (1: emoji also runs intra + inter and image-intra with SimCLR view positives, the control of the style ones),
# ROWS ("tags text intra-inter inter intra-inter-w01 inter-full intra-inter-half inter-half intra-inter-w01-half": the
# captioned rows, in launch order; w01: image-image weight 0.1; low-label fraction only: inter-full = inter only with
# every batch drawn from the captioned items, *-half = half of every batch captioned, data.captioned_share=0.5),
# FRACS ("f1 f0.05" / "f1 f0.1": the caption fractions of those rows), IMAGE_ROW (1: also the image-intra row).
# A partial pass first (ROWS="inter intra-inter") gives the core comparison on every seed early; rerun for the rest.
# Finished runs (metrics.json) are skipped, killed ones resumed from their last checkpoint; each run's output is in
# RUN.log and its wall time in seconds in RUN.wall. Finished runs are kept in KEEP (experiments/results/mct21, in the
# repository: commit it) and restored into OUT before the runs start (experiments/jobs.sh), so a new machine carries on.
# Layout: OUT/<dataset>/<f1|f0.05|f0.1>/<row>/seed-<s>; OUT/<dataset>/image[-view]/seed-<s> (the image-intra rows read no
# caption, so one run serves both fractions); OUT/<dataset>/untrained/seed-<s>; OUT/<dataset>/imagenet/seed-0.
set -euo pipefail
cd "$(dirname "$0")/.."
read -ra PA <<< "${POLYALIGN:-polyalign}"  # may be a command line: "python -m polyalign"
read -ra PY <<< "${PYTHON:-python}"
OUT=${OUT:-runs/mct21}
SEEDS=${SEEDS:-0 1 2}
ROWS=${ROWS:-tags text intra-inter inter intra-inter-w01 inter-full intra-inter-half inter-half intra-inter-w01-half}
IMAGE_ROW=${IMAGE_ROW:-1}
VIEW_ROWS=${VIEW_ROWS:-1}  # emoji: also the control rows with view positives (intra_positive=view)
DATASETS=${DATASETS:-emoji shapes}
KEEP=${KEEP-experiments/results/mct21}
source experiments/jobs.sh  # JOBS (2) side by side, one thread each (the probes' BLAS too); slot, keep_save
mkdir -p "$OUT"

declare -A FRACTION=([shapes]=0.05 [emoji]=0.1)
declare -A FIELDS=([shapes]=colour,count [emoji]="")  # probes beyond eval.probe_field (shapes: shape; emoji: subcategory)
SMOKE_shapes=() SMOKE_emoji=() SMOKE_all=()
if [[ ${SMOKE:-0} == 1 ]]; then
  KEEP=""
  SMOKE_all=(train.max_steps=2 train.warmup_steps=1 train.checkpoint_every=1 train.log_every=1 eval.probe_max_train=300
             eval.bootstrap_resamples=50)
  SMOKE_shapes=(data.train_size=400 data.val_size=50 data.test_size=200)
  S=$OUT/smoke-data
  if [[ " $DATASETS " == *" emoji "* && ! -f $S/test.jsonl ]]; then  # 40 test concepts (twitter) and the google/fluent/emojione rows of 120 concepts
    mkdir -p "$S"
    "${PY[@]}" - "$S" <<'EOF'
import json, sys
from pathlib import Path
d, out = Path("data/emoji4").resolve(), Path(sys.argv[1])
rows = lambda p: [json.loads(l) for l in (d / p).read_text().splitlines() if l.strip()]
train, test = rows("loso_twitter_train.jsonl"), rows("loso_twitter_test.jsonl")
concepts = sorted({r["concept_id"] for r in train})[::12][:120]
for name, rs in (("train", [r for r in train if r["concept_id"] in concepts]),
                 ("test", [r for r in test if r["concept_id"] in concepts][:40])):
    (out / f"{name}.jsonl").write_text("".join(json.dumps({**r, "image": str(d / r["image"])}) + "\n" for r in rs))
    print(f"smoke {name}: {len(rs)} rows")
EOF
  fi
  SMOKE_emoji=(data.train_manifest=$S/train.jsonl data.test_manifest=$S/test.jsonl data.tag_min_count=2)
fi

smoke() {  # smoke DATASET: the SMOKE=1 overrides of that dataset (none otherwise)
  local -n extra=SMOKE_$1
  echo "${SMOKE_all[@]}" "${extra[@]}"
}

train_one() {  # train_one DATASET CONFIG RUN SEED: train (or resume), then the extra probes
  local ds=$1 cfg=$2 run=$3 s=$4 t0
  if [[ ! -f $run/metrics.json ]]; then
    mkdir -p "$(dirname "$run")"
    t0=$(date +%s)
    echo "$(date +%H:%M:%S) start $run"
    # shellcheck disable=SC2046
    "${PA[@]}" train "$cfg" train.seed="$s" train.threads=1 $(smoke "$ds") --out "$run" --resume > "$run.log" 2>&1 \
      || { echo "FAILED: $run (see $run.log)"; return 1; }
    echo $(( $(date +%s) - t0 )) > "$run.wall"
    echo "$(date +%H:%M:%S) done  $run ($(cat "$run.wall") s)"
  fi
  [[ -z ${FIELDS[$ds]} ]] || "${PY[@]}" experiments/mct21_eval.py probes "$run" --fields "${FIELDS[$ds]}" >> "$run.log" 2>&1 \
    || { echo "FAILED: probes of $run (see $run.log)"; return 1; }
  keep_save
}

baseline_one() {  # baseline_one DATASET CONFIG RUN SEED TOWER [overrides]: the step-0 reference
  local ds=$1 cfg=$2 run=$3 s=$4 tower=$5
  shift 5
  [[ -f $run/metrics.json ]] && return 0
  mkdir -p "$(dirname "$run")"
  echo "$(date +%H:%M:%S) start $run"
  # shellcheck disable=SC2046
  "${PY[@]}" experiments/mct21_eval.py baseline "$cfg" "$@" $(smoke "$ds") --seed "$s" --out "$run" --tower "$tower" \
    --fields "${FIELDS[$ds]}" > "$run.log" 2>&1 || { echo "FAILED: $run (see $run.log)"; return 1; }
  echo "$(date +%H:%M:%S) done  $run"
  keep_save
}

keep_restore

# longest first (emoji), so the two queues end close together; the references last (a few minutes each)
for ds in $DATASETS; do
  f=${FRACTION[$ds]}
  for s in $SEEDS; do
    for row in $ROWS; do
      for frac in ${FRACS:-f1 f$f}; do
        # a row may exist at one fraction only (inter-full: the low-label control)
        [[ -f configs/mct21/$ds-$frac-$row.yaml ]] || { [[ $frac == f1 ]] || echo "no configs/mct21/$ds-$frac-$row.yaml"; continue; }
        slot; train_one "$ds" "configs/mct21/$ds-$frac-$row.yaml" "$OUT/$ds/$frac/$row/seed-$s" "$s" &
      done
    done
    [[ $IMAGE_ROW != 1 ]] || { slot; train_one "$ds" "configs/mct21/$ds-f1-image.yaml" "$OUT/$ds/image/seed-$s" "$s" & }
    if [[ $ds == emoji && $VIEW_ROWS == 1 ]]; then  # controls: SimCLR's own-image positives instead of the style ones
      for frac in f1 "f$f"; do
        slot; train_one emoji "configs/mct21/emoji-$frac-intra-inter-view.yaml" "$OUT/emoji/$frac/intra-inter-view/seed-$s" \
          "$s" &
      done
      slot; train_one emoji configs/mct21/emoji-f1-image-view.yaml "$OUT/emoji/image-view/seed-$s" "$s" &
    fi
  done
done
for ds in $DATASETS; do
  for s in $SEEDS; do
    if [[ $ds == shapes ]]; then
      slot; baseline_one shapes configs/mct21/shapes-f1-inter.yaml "$OUT/shapes/untrained/seed-$s" "$s" init &
    else
      slot; baseline_one emoji configs/mct21/emoji-f1-inter.yaml "$OUT/emoji/untrained/seed-$s" "$s" random &
    fi
  done
  # the ImageNet tower's features are the same for every seed: one reference run
  if [[ $ds == shapes ]]; then  # the same 48 px scenes as every row
    slot; baseline_one shapes configs/mct21/shapes-f1-inter.yaml "$OUT/shapes/imagenet/seed-0" 0 init \
      model.image.kind=efficientnet_lite0 model.image.lock=true &
  else  # the recipe's own tower at step 0
    slot; baseline_one emoji configs/mct21/emoji-f1-inter.yaml "$OUT/emoji/imagenet/seed-0" 0 init &
  fi
done
wait_all
(( FAILED == 0 )) || { echo "some runs failed: rerun to retry them (finished runs are skipped)"; exit 1; }
echo "all runs done: ${PY[*]} experiments/mct21_report.py $OUT"
