#!/usr/bin/env bash
# The tables of docs/results.md §1 from the sweeps of experiments/emoji4_baseline.sh: per split, mean ± std over
# 3 seeds and the paired difference of every row to LiT (per seed, mean and 95% t-interval).
#   bash experiments/emoji4_table.sh [OUT=runs/emoji4]
set -euo pipefail
OUT=${1:-runs/emoji4}
for split in twitter concept; do
  rows=(); for r in scratch lit effnet locked tuned; do [ -f "$OUT/$split/$r/summary.json" ] && rows+=("$OUT/$split/$r"); done
  names=$(for r in "${rows[@]}"; do basename "$r"; done | paste -sd, -)
  for metrics in retrieval/t2i_R@1,retrieval/t2i_R@10,retrieval/i2t_R@10 \
                 retrieval_any/t2i_R@1,retrieval_any/t2i_R@10,retrieval_any/t2i_MdR \
                 zeroshot/category_acc,zeroshot/subcategory_acc,probe/subcategory_acc; do
    echo "### $split: $metrics"; echo
    polyalign table "${rows[@]}" --names "$names" --baseline lit --metrics "$metrics"; echo
  done
done
