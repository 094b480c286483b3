#!/usr/bin/env bash
# The four-style emoji baseline table (docs/results.md §1): 5 rows × 3 seeds on the leave-one-style-out split that
# holds out twitter and on the grouped concept split, then the best row and LiT on the other three held-out styles.
# Two queues run side by side, one torch thread each (train.threads=1); finished seeds are reused, killed ones resume.
#   bash experiments/emoji4_baseline.sh [OUT=runs/emoji4]
# Needs: polyalign data emoji --out data/emoji4 --styles google,twitter,fluent,emojione
set -euo pipefail
OUT=${1:-runs/emoji4}
PA=${PA:-polyalign}
split_args() {  # split name → data overrides
  case $1 in
    concept) echo "data.train_manifest=data/emoji4/concept_train.jsonl data.test_manifest=data/emoji4/concept_test.jsonl" ;;
    *) echo "data.train_manifest=data/emoji4/loso_$1_train.jsonl data.test_manifest=data/emoji4/loso_$1_test.jsonl" ;;
  esac
}
run() {  # split row
  # shellcheck disable=SC2046
  $PA sweep "configs/emoji4-$2.yaml" --seeds 0,1,2 --out "$OUT/$1/$2" $(split_args "$1") train.threads=1 \
    > "$OUT/logs/$1-$2.log" 2>&1 || echo "FAILED: $1 $2 (see $OUT/logs/$1-$2.log)"
}
mkdir -p "$OUT/logs"
queue_a() { for job in "twitter locked" "twitter tuned" "twitter scratch" "concept effnet" "concept lit" \
                       "google locked" "fluent locked" "emojione locked"; do run $job; done; }
queue_b() { for job in "twitter effnet" "twitter lit" "concept locked" "concept tuned" "concept scratch" \
                       "google lit" "fluent lit" "emojione lit"; do run $job; done; }
queue_a & queue_b & wait
echo "done: $OUT"
