#!/usr/bin/env bash
# C-MCR on independent spaces, emoji4 concept split (the C-MCR issue): X = image–text on pretrained towers
# (EfficientNet-Lite0 + MiniLM, tuned: configs/emoji4-tuned.yaml, from experiments/emoji4_table.sh), Y = audio–text
# whose text tower is its own BPE transformer trained from scratch (configs/cmcr/emoji4-y-clap-scratch.yaml). The
# two spaces share no tower and no sample; the pivot modality is text (captions of the training concepts).
#   bash experiments/cmcr4.sh data          # manifests + spoken captions (espeak-ng), once
#   bash experiments/cmcr4.sh [SPACE_SEEDS]  # default "0 1 2": for each seed s, X = tuned seed-s, Y trained seed s
#   python experiments/cmcr_report.py runs/cmcr4/connect retrieval --plot docs/img/cmcr4-memory.png
# Rows per pair of spaces (projector seed = space seed): full (soft pseudo pairs), nearest_pairs (no consistency: the
# raw nearest memory row), random_pairs, no_noise, noise_dim (σ² · 512/d), no_intra, no_memories (shared modality
# only), anchor_x; every run also reports the hard and the soft pivot (τ chosen on the val pairs).
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/cmcr_rows.sh
PA=${POLYALIGN:-polyalign}
PY=${PYTHON:-python}
OUT=${OUT:-runs/cmcr4}
XRUNS=${XRUNS:-runs/emoji4/concept/tuned}
D=data/emoji4
SP=data/emoji4-speech
mkdir -p "$OUT"

data() {
  "$PY" - <<'EOF'
import json
from pathlib import Path
d = Path("data/emoji4")
rows = lambda p: [json.loads(line) for line in (d / p).read_text().splitlines() if line.strip()]
train, test = rows("concept_train.jsonl"), rows("concept_test.jsonl")
google = [r for r in train if r["style"] == "google"]
out = {"cmcr4_y_train": google, "cmcr4_test": [r for r in test if r["style"] == "google"],
       # val pairs (τ of the soft pivot only): twitter pictures of 300 training concepts vs their spoken first caption
       "cmcr4_val": [r for r in train if r["style"] == "twitter"][:300]}
for name, rs in out.items():
    (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    print(name, len(rs))
EOF
  [[ -f $SP/y_train/speech.jsonl ]] || "$PA" data speech --manifest $D/cmcr4_y_train.jsonl --out $SP/y_train \
    --captions-per-item 4
  [[ -f $SP/test/speech.jsonl ]] || "$PA" data speech --manifest $D/cmcr4_test.jsonl --out $SP/test
  [[ -f $SP/val/speech.jsonl ]] || "$PA" data speech --manifest $D/cmcr4_val.jsonl --out $SP/val \
    --voices en-gb-x-gbclan,en-us-nyc
  # the large audio memory (memory-size scaling): the training captions again, 5 × 5,462 clips of other draws of
  # speed and pitch (sets 1, 2: Y's 8 voices; 3, 4: 8 other voices and variants; 5: 8 more), none in val's voices
  local v2=en-gb-x-gbcwmd,en-gb-x-rp,en-us+f1,en-gb+m3,en-gb-scotland+f4,en-029+f2,en-us+m6,en-gb+f5
  local v3=en-us+f5,en-gb+m1,en-gb-x-rp+m2,en-029+m4,en-gb-scotland+f1,en-gb-x-gbcwmd+f3,en-us+m7,en-gb+f1
  local k voices=("" "" "" "$v2" "$v2" "$v3")
  for k in 1 2 3 4 5; do
    [[ -f $SP/memory$k/speech.jsonl ]] || "$PA" data speech --manifest $D/cmcr4_y_train.jsonl --out $SP/memory$k \
      --captions-per-item 4 --seed $k ${voices[$k]:+--voices ${voices[$k]}}
  done
  "$PY" -c "
import json
out = open('$SP/memory_extra.jsonl', 'w')
for k in range(1, 6):
    for line in open(f'$SP/memory{k}/speech.jsonl'):
        if line.strip():
            r = json.loads(line); r['audio'] = f'memory{k}/' + r['audio']; out.write(json.dumps(r) + '\\n')"
}

emb() {  # emb RUN PREFIX ARGS...: polyalign embed, unless PREFIX.npy exists
  [[ -f $2.npy ]] || "$PA" embed "$1" "${@:3}" --out "$2"
}

spaces() {  # spaces SEED: Y trained, embeddings of both spaces, connect.yaml
  local s=$1 d=$OUT/seed-$s e=$OUT/seed-$s/emb x=$XRUNS/seed-$1
  mkdir -p "$e"
  [[ -f $OUT/y-seed$s/metrics.json ]] || "$PA" train configs/cmcr/emoji4-y-clap-scratch.yaml train.seed=$s \
    --out $OUT/y-seed$s
  [[ -f $d/connect.yaml ]] && return 0
  emb "$x" "$e/text_x" --modality text --manifest $D/concept_train.jsonl
  emb $OUT/y-seed$s "$e/text_y" --modality text --manifest $D/concept_train.jsonl
  emb "$x" "$e/memory_image_x" --modality image --manifest $D/concept_train.jsonl
  emb $OUT/y-seed$s "$e/memory_audio_y" --modality audio --manifest $SP/y_train/speech.jsonl --id-field audio
  for split in test val; do
    emb "$x" "$e/${split}_image_x" --modality image --manifest $D/cmcr4_$split.jsonl --id-field concept_id
    emb $OUT/y-seed$s "$e/${split}_audio_y" --modality audio --manifest $SP/$split/speech.jsonl --id-field concept_id
  done
  cat > "$d/connect.yaml" <<EOF
# emoji4, independent spaces, seed $s: X = image–text ($x), Y = audio–text ($OUT/y-seed$s); audio → image via text
inputs: {b_x: emb/text_x.npy, b_y: emb/text_y.npy, memory_a: emb/memory_image_x.npy, memory_c: emb/memory_audio_y.npy}
eval: {a_test: emb/test_image_x.npy, c_test: emb/test_audio_y.npy, a_val: emb/val_image_x.npy, c_val: emb/val_audio_y.npy}
method: {projector: mlp}
train: {batch_size: 512, epochs: 50, log_every: 200, threads: 1, seed: $s}
EOF
}

rows() {  # rows SEED: OUT/connect/<row>/seed-SEED (the layout of experiments/cmcr_report.py)
  local s=$1 row extra out
  for row in ${ROWS:-full no_memories nearest_pairs noise_dim random_pairs no_noise no_intra anchor_x}; do
    row_overrides "$row"
    out=$OUT/connect/$row/seed-$s
    mkdir -p "$(dirname "$out")"
    [[ -f $out/metrics.json ]] || "$PA" connect "$OUT/seed-$s/connect.yaml" "${extra[@]}" --out "$out" > "$out.log"
  done
}

pool() {  # pool SEED: Y's embedding of the extra clips; the pool of all 32,772 clips and X's pictures of them
  local s=$1 e=$OUT/seed-$1/emb
  emb $OUT/y-seed$s "$e/memory_extra_audio_y" --modality audio --manifest $SP/memory_extra.jsonl --id-field audio
  [[ -f $e/pair_image_x.npy ]] || emb "$XRUNS/seed-$s" "$e/pair_image_x" --modality image \
    --manifest $D/cmcr4_pairs.jsonl --id-field clip
  [[ -f $e/memory_audio_y.pool.npy ]] || "$PY" experiments/cmcr4_pool.py "$e" $SP
}

memory_sizes() {  # memory_sizes SEED: the full row with both memories cut to M rows (the same rows for every seed);
  # above Y's 5,462 training clips the audio comes from the pool and the image memory stays whole (5,521 pictures)
  local s=$1 e=$OUT/seed-$1/emb m out audio
  for m in ${SIZES:-500 1000 3000 10000 30000}; do
    audio=memory_audio_y
    (( m > 5462 )) && audio=memory_audio_y.pool
    [[ -f $e/$audio.m$m.npy ]] || "$PY" experiments/cmcr4_subsample.py "$e" "$m" memory_image_x $audio
    out=$OUT/connect/memory_$m/seed-$s
    mkdir -p "$(dirname "$out")"
    [[ -f $out/metrics.json ]] || "$PA" connect "$OUT/seed-$s/connect.yaml" \
      inputs.memory_a="$(realpath "$e/memory_image_x.m$m.npy")" \
      inputs.memory_c="$(realpath "$e/$audio.m$m.npy")" --out "$out" > "$out.log"
  done
}

paired() {  # paired SEED: the real-pairs baseline, projectors trained on N real (picture, spoken caption) pairs
  local s=$1 e=$OUT/seed-$1/emb n out
  [[ -f $D/cmcr4_pairs.jsonl ]] || "$PY" -c "
import json, sys
rows = [json.loads(l) for l in open('$SP/y_train/speech.jsonl') if l.strip()]
open('$D/cmcr4_pairs.jsonl', 'w').write(''.join(json.dumps({'image': r['image'], 'captions': [r['caption']],
    'clip': r['audio']}) + '\n' for r in rows))"
  emb "$XRUNS/seed-$s" "$e/pair_image_x" --modality image --manifest $D/cmcr4_pairs.jsonl --id-field clip
  local px py
  for n in ${PAIRS:-100 1000 5462 10000}; do
    px=pair_image_x py=memory_audio_y
    (( n > 5462 )) && px=pair_image_x.pool py=memory_audio_y.pool  # pairs from the pool (more clips per picture)
    [[ -f $e/$px.p$n.npy ]] || "$PY" experiments/cmcr4_subsample.py "$e" "$n" $px $py --tag p
    out=$OUT/connect/paired_$n/seed-$s
    mkdir -p "$(dirname "$out")"
    [[ -f $out/metrics.json ]] || "$PA" connect "$OUT/seed-$s/connect.yaml" method.memories=false \
      inputs.b_x="$(realpath "$e/$px.p$n.npy")" inputs.b_y="$(realpath "$e/$py.p$n.npy")" \
      train.batch_size=$(( n < 512 ? n : 512 )) --out "$out" > "$out.log"
  done
}

if [[ ${1:-} == data ]]; then
  data
  exit 0
fi
for s in ${1:-0 1 2}; do
  spaces "$s"
  rows "$s"
  pool "$s"
  memory_sizes "$s"
  paired "$s"
done
