#!/usr/bin/env bash
# C-MCR experiments of docs/cmcr.md, end to end from built data:
#   polyalign data emoji --out data/emoji --styles google,twitter      # once (the emoji part needs it)
#   bash experiments/cmcr.sh [emoji|emoji-shared|emoji-style|shapes|3d]  # default: emoji, shapes, 3d
# Each part trains its two contrastive spaces, exports their embeddings with `polyalign embed`, and runs
# `polyalign connect` for the full method, the ablations and baselines ($ROWS), the anchor_x mode and the paired
# upper bound. Emoji parts: one seed of each space, projector seeds $SEEDS. Shapes and 3d: for each s of $SPACE_SEEDS,
# X and Y trained with train.seed=s and connected with projector seed s (POINTCLIP=1 adds 3d's point–text sweep). No (A, C) pair is used by any row except
# "paired". Rows: full; nearest_pairs (no semantic consistency: each pseudo pair is the nearest memory row);
# random_pairs (the harmful ablation: a random memory row); no_noise; noise_dim (σ² · 512 / d per space); no_intra;
# no_memories (B pairs only, the native InfoNCE); anchor_x (X fixed, Y mapped into X; inspired by Ex-MCR, not its
# released recipe). The pivot and soft pivot baselines are in every run's metrics.json.
# Wall times go to $OUT/wall_times.tsv; tables: python experiments/cmcr_report.py $OUT/<part>/connect retrieval|classify
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/cmcr_rows.sh
PA=${POLYALIGN:-polyalign}
PY=${PYTHON:-python}
OUT=${OUT:-runs/cmcr}
SEEDS=${SEEDS:-"0 1 2"}              # projector seeds of the emoji parts (one seed of each space)
SPACE_SEEDS=${SPACE_SEEDS:-"0 1 2"}  # shapes, 3d: seeds of both spaces (projector seed = space seed)
ROWS=${ROWS:-"full nearest_pairs random_pairs no_noise noise_dim no_intra no_memories anchor_x"}
mkdir -p "$OUT"

timed() {  # timed NAME CMD...: run, append "NAME<TAB>seconds" to the wall-time log
  local name=$1 t0
  shift
  t0=$(date +%s)
  "$@"
  printf '%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" >> "$OUT/wall_times.tsv"
}

train_once() {  # train_once NAME CONFIG DIR [overrides]: train unless DIR already holds the finished run
  [[ -f "$3/metrics.json" ]] || timed "train $1" "$PA" train "$2" "${@:4}" --out "$3"
}

connect_once() {  # connect_once OUT_DIR CONFIG [overrides]: connect unless OUT_DIR already holds the finished run
  local out=$1
  shift
  mkdir -p "$(dirname "$out")"
  [[ -f "$out/metrics.json" ]] || timed "connect $out" "$PA" connect "$@" --out "$out" > "$out.log"
}

connect_rows() {  # connect_rows PART_DIR CONFIG [overrides shared by every row]
  local dir=$1 cfg=$2
  shift 2
  for seed in $SEEDS; do
    for row in $ROWS; do
      row_overrides "$row"
      connect_once "$dir/connect/$row/seed-$seed" "$cfg" "$@" "${extra[@]}" train.seed="$seed"
    done
  done
}

paired_rows() {  # the paired upper bound: the native InfoNCE on real (picture, sound) pairs, one run per seed
  local d=$1 e=$2 seed
  for seed in $SEEDS; do
    connect_once "$d/connect/paired/seed-$seed" "$d/connect.yaml" inputs.b_x="$e/pair_image_x.npy" \
      inputs.b_y="$e/memory_audio_y.npy" inputs.memory_a="$e/pair_image_x.npy" \
      inputs.memory_c="$e/memory_audio_y.npy" train.seed="$seed"
  done
}

audio_connect_yaml() {  # audio_connect_yaml DIR NAME BATCH EPOCHS: DIR/connect.yaml for audio → image through text
  cat > "$1/connect.yaml" <<EOF
# $2: X = image–text (A = image, B = text), Y = audio–text (C = audio); audio → image through text
inputs: {b_x: emb/text_x.npy, b_y: emb/text_y.npy, memory_a: emb/memory_image_x.npy, memory_c: emb/memory_audio_y.npy}
eval: {a_test: emb/test_image_x.npy, c_test: emb/test_audio_y.npy}
method: {projector: mlp}
train: {batch_size: $3, epochs: $4, log_every: 200, threads: 1}
EOF
}

emoji() {
  local d=$OUT/emoji e=$OUT/emoji/emb sp=data/emoji-speech
  mkdir -p "$e"
  # data: two disjoint halves of the training concepts, spoken captions of half Y, spoken names of the test concepts
  "$PY" experiments/cmcr_emoji_data.py split data/emoji
  [[ -f $sp/cmcr_y_train/speech.jsonl ]] || timed "speech y_train" "$PA" data speech \
    --manifest data/emoji/cmcr_y_train.jsonl --out $sp/cmcr_y_train --captions-per-item 5
  [[ -f $sp/cmcr_test/speech.jsonl ]] || timed "speech test" "$PA" data speech \
    --manifest data/emoji/cmcr_test.jsonl --out $sp/cmcr_test
  "$PY" experiments/cmcr_emoji_data.py pairs $sp/cmcr_y_train data/emoji
  # the two spaces: X image–text on half X, Y audio–text on half Y
  train_once "emoji X (CLIP/LiT)" configs/cmcr/emoji-x-clip.yaml "$d/x"
  train_once "emoji Y (CLAP)" configs/cmcr/emoji-y-clap.yaml "$d/y"
  # embeddings: shared modality = text (every training caption of both halves, in both spaces), memories =
  # half X's images (in X) and half Y's clips (in Y), test = pictures vs spoken names of the held-out concepts;
  # pair_image_x (paired upper bound only): for every spoken caption of half Y, its picture
  emoji_spaces "$d" emoji data/emoji/concept_train.jsonl data/emoji/cmcr_x_train.jsonl $sp/cmcr_y_train/speech.jsonl \
    data/emoji/cmcr_test.jsonl $sp/cmcr_test/speech.jsonl data/emoji/cmcr_y_pairs.jsonl
  connect_rows "$d" "$d/connect.yaml"
  paired_rows "$d" "$e"  # upper bound on 6,018 real (picture, spoken caption) pairs
  "$PY" experiments/cmcr_report.py "$d/connect" retrieval | tee "$d/table.md"
}

emoji_spaces() {  # emoji_spaces DIR NAME TEXTS PICTURES CLIPS TEST_PICTURES TEST_CLIPS [PAIRS]: DIR/emb + DIR/connect.yaml
  # from the spaces DIR/x (image–text) and DIR/y (audio–text), unless DIR/connect.yaml exists. TEXTS: manifest whose
  # captions are the shared modality; PICTURES / CLIPS: the memories; TEST_*: pictures and spoken names paired by
  # concept_id; PAIRS (paired upper bound only): one picture row per clip of CLIPS.
  local d=$1 e=$1/emb
  [[ -f "$d/connect.yaml" ]] && return 0
  mkdir -p "$e"
  "$PA" embed "$d/x" --modality text --manifest "$3" --out "$e/text_x"
  "$PA" embed "$d/y" --modality text --manifest "$3" --out "$e/text_y"
  "$PA" embed "$d/x" --modality image --manifest "$4" --out "$e/memory_image_x"
  "$PA" embed "$d/y" --modality audio --manifest "$5" --id-field audio --out "$e/memory_audio_y"
  "$PA" embed "$d/x" --modality image --manifest "$6" --id-field concept_id --out "$e/test_image_x"
  "$PA" embed "$d/y" --modality audio --manifest "$7" --id-field concept_id --out "$e/test_audio_y"
  [[ -z "${8:-}" ]] || "$PA" embed "$d/x" --modality image --manifest "$8" --id-field clip --out "$e/pair_image_x"
  audio_connect_yaml "$d" "$2" 512 50
}

emoji_shared() {  # the shared-concepts design: both spaces know every training concept, from disjoint samples
  local d=$OUT/emoji-shared sp=data/emoji-speech seed
  "$PY" experiments/cmcr_emoji_data.py split data/emoji   # for cmcr_test.jsonl (the same test as the emoji part)
  [[ -f $sp/train/speech.jsonl ]] || timed "speech train (all concepts)" "$PA" data speech \
    --manifest data/emoji/concept_train.jsonl --out $sp/train --captions-per-item 5
  [[ -f $sp/cmcr_test/speech.jsonl ]] || timed "speech test" "$PA" data speech \
    --manifest data/emoji/cmcr_test.jsonl --out $sp/cmcr_test
  "$PY" experiments/cmcr_emoji_data.py pairs $sp/train data/emoji cmcr_shared_pairs
  # X: pictures + captions of every training concept (the LiT recipe of the concept split);
  # Y: spoken captions of every training concept. No sample is in both; no (clip, picture) pair is used.
  train_once "emoji-shared X (LiT)" configs/emoji-concept-lit.yaml "$d/x"
  train_once "emoji-shared Y (CLAP)" configs/cmcr/emoji-shared-y-clap.yaml "$d/y"
  emoji_spaces "$d" "emoji, shared concepts" data/emoji/concept_train.jsonl data/emoji/concept_train.jsonl \
    $sp/train/speech.jsonl data/emoji/cmcr_test.jsonl $sp/cmcr_test/speech.jsonl data/emoji/cmcr_shared_pairs.jsonl
  connect_rows "$d" "$d/connect.yaml"
  paired_rows "$d" "$d/emb"  # upper bound on the real (picture, spoken caption) pairs of every training concept
  "$PY" experiments/cmcr_report.py "$d/connect" retrieval | tee "$d/table.md"
  # the spaces' own seeds: X and Y retrained with train.seed=1, 2, each pair connected once (projector seed = the same)
  for seed in 1 2; do
    train_once "emoji-shared X seed $seed" configs/emoji-concept-lit.yaml "$d/x-seed$seed" train.seed=$seed
    train_once "emoji-shared Y seed $seed" configs/cmcr/emoji-shared-y-clap.yaml "$d/y-seed$seed" train.seed=$seed
    mkdir -p "$d/spaces-seed$seed"  # spaces-seedS/x and /y: links to the seed's runs
    ln -sfn "../x-seed$seed" "$d/spaces-seed$seed/x" && ln -sfn "../y-seed$seed" "$d/spaces-seed$seed/y"
    emoji_spaces "$d/spaces-seed$seed" "emoji, shared concepts, spaces of seed $seed" data/emoji/concept_train.jsonl \
      data/emoji/concept_train.jsonl $sp/train/speech.jsonl data/emoji/cmcr_test.jsonl $sp/cmcr_test/speech.jsonl
    connect_once "$d/spaces-seed$seed/connect/full/seed-$seed" "$d/spaces-seed$seed/connect.yaml" train.seed=$seed
  done
}

emoji_style() {  # seen concepts, unseen samples (the emoji style split): the paper's situation at test time too
  local d=$OUT/emoji-style sp=data/emoji-speech
  # Y hears the captions of every concept (google rows of the style split; 8 voices); the test speaks each concept's
  # first caption in two voices Y never heard; X sees google pictures; the test pictures are the twitter ones
  [[ -f $sp/style_train/speech.jsonl ]] || timed "speech style_train" "$PA" data speech \
    --manifest data/emoji/style_train.jsonl --out $sp/style_train --captions-per-item 5
  [[ -f $sp/style_test_heldout_voices/speech.jsonl ]] || timed "speech style_test" "$PA" data speech \
    --manifest data/emoji/style_test.jsonl --out $sp/style_test_heldout_voices --voices en-gb-x-gbclan,en-us-nyc
  "$PY" experiments/cmcr_emoji_data.py pairs $sp/style_train data/emoji cmcr_style_pairs
  train_once "emoji-style X (LiT)" configs/emoji-style-lit.yaml "$d/x"
  train_once "emoji-style Y (CLAP)" configs/cmcr/emoji-style-y-clap.yaml "$d/y"
  emoji_spaces "$d" "emoji, style split" data/emoji/style_train.jsonl data/emoji/style_train.jsonl \
    $sp/style_train/speech.jsonl data/emoji/style_test.jsonl $sp/style_test_heldout_voices/speech.jsonl \
    data/emoji/cmcr_style_pairs.jsonl
  connect_rows "$d" "$d/connect.yaml"
  paired_rows "$d" "$d/emb"
  "$PY" experiments/cmcr_report.py "$d/connect" retrieval | tee "$d/table.md"
}

seed_rows() {  # seed_rows PART_DIR SEED: every row of $ROWS for the spaces of SEED (projector seed = SEED)
  local d=$1 s=$2 row
  for row in $ROWS; do
    row_overrides "$row"
    connect_once "$d/connect/$row/seed-$s" "$d/seed-$s/connect.yaml" "${extra[@]}" train.seed="$s"
  done
}

shapes() {  # for each seed s of $SPACE_SEEDS: X and Y trained with train.seed=s, connected with projector seed s
  local d=$OUT/shapes s
  for s in $SPACE_SEEDS; do
    shapes_spaces "$s"
    seed_rows "$d" "$s"
    # the paired upper bound: the native InfoNCE on 10,000 real (picture, sound) pairs of Y's training scenes
    local e && e=$(realpath "$d/seed-$s/emb")
    connect_once "$d/connect/paired/seed-$s" "$d/seed-$s/connect.yaml" inputs.b_x="$e/pair_image_x.npy" \
      inputs.b_y="$e/memory_audio_y.npy" inputs.memory_a="$e/pair_image_x.npy" inputs.memory_c="$e/memory_audio_y.npy" \
      train.seed="$s"
  done
  "$PY" experiments/cmcr_report.py "$d/connect" retrieval | tee "$d/table.md"
}

shapes_spaces() {  # shapes_spaces SEED: the two spaces of SEED, their embeddings, seed-SEED/connect.yaml
  local s=$1 d=$OUT/shapes x=$OUT/shapes/x-seed$1 y=$OUT/shapes/y-seed$1 e=$OUT/shapes/seed-$1/emb
  train_once "shapes X (CLIP) seed $s" configs/cmcr/shapes-x-clip.yaml "$x" train.seed="$s"  # scenes of seed 0
  train_once "shapes Y (CLAP) seed $s" configs/cmcr/shapes-y-clap.yaml "$y" train.seed="$s"  # other scenes (seed 1)
  [[ -f $d/seed-$s/connect.yaml ]] && return 0
  mkdir -p "$e"
  # shared modality = text: the captions of X's training scenes, in both spaces (Y reads them with data.seed=0)
  "$PA" embed "$x" --modality text --split train --out "$e/text_x"
  "$PA" embed "$y" data.seed=0 --modality text --split train --out "$e/text_y"
  "$PA" embed "$x" --modality image --split train --out "$e/memory_image_x"
  "$PA" embed "$y" --modality audio --split train --out "$e/memory_audio_y"
  # test: pictures (X) and sounds (Y) of the same 1,000 test scenes (seed 0), paired by index; val (the soft
  # pivot's τ only): 1,000 scenes of content seed 2, which neither space saw
  "$PA" embed "$x" --modality image --split test --out "$e/test_image_x"
  "$PA" embed "$y" data.seed=0 --modality audio --split test --out "$e/test_audio_y"
  "$PA" embed "$x" data.seed=2 --modality image --split test --out "$e/val_image_x"
  "$PA" embed "$y" data.seed=2 --modality audio --split test --out "$e/val_audio_y"
  # paired upper bound only: pictures (X) of Y's training scenes (seed 1), row-aligned with memory_audio_y
  "$PA" embed "$x" data.seed=1 --modality image --split train --out "$e/pair_image_x"
  cat > "$d/seed-$s/connect.yaml" <<EOF
# shapes, spaces of seed $s: X = image–text ($x), Y = audio–text ($y); audio → image through text
inputs: {b_x: emb/text_x.npy, b_y: emb/text_y.npy, memory_a: emb/memory_image_x.npy, memory_c: emb/memory_audio_y.npy}
eval: {a_test: emb/test_image_x.npy, c_test: emb/test_audio_y.npy, a_val: emb/val_image_x.npy, c_val: emb/val_audio_y.npy}
method: {projector: mlp}
train: {batch_size: 1024, epochs: 15, log_every: 200, threads: 1}
EOF
}

three_d() {  # for each seed s of $SPACE_SEEDS: X and Y trained with train.seed=s, connected with projector seed s
  local d=$OUT/3d s
  for s in $SPACE_SEEDS; do
    three_d_spaces "$s"
    seed_rows "$d" "$s"
  done
  # upper bound with real (text, 3D) pairs: a point cloud–text model trained end to end, zero-shot from prompts
  [[ -z ${POINTCLIP:-} || -f "$d/pointclip/summary.json" ]] || timed "3D paired point–text sweep" "$PA" sweep \
    configs/shapes3d-pointclip.yaml data.seed=1 train.threads=1 --seeds "$(echo $SPACE_SEEDS | tr ' ' ,)" \
    --out "$d/pointclip"
  "$PY" experiments/cmcr_report.py "$d/connect" classify | tee "$d/table.md"
}

three_d_spaces() {  # three_d_spaces SEED: the two spaces of SEED, their embeddings, seed-SEED/connect.yaml
  local s=$1 d=$OUT/3d x=$OUT/3d/x-seed$1 y=$OUT/3d/y-seed$1 e=$OUT/3d/seed-$1/emb
  train_once "3D X (CLIP) seed $s" configs/cmcr/3d-x-clip.yaml "$x" train.seed="$s"  # renders + captions, seed 0
  train_once "3D Y (ULIP) seed $s" configs/cmcr/3d-y-ulip.yaml "$y" train.seed="$s"  # points + renders, seed 1
  [[ -f $d/seed-$s/connect.yaml ]] && return 0
  mkdir -p "$e"
  # shared modality = images: the renders of X's training objects, in both spaces (Y reads them with data.seed=0)
  "$PA" embed "$x" --modality image --split train --out "$e/image_x"
  "$PA" embed "$y" data.seed=0 --modality image --split train --out "$e/image_y"
  "$PA" embed "$x" --modality text --split train --out "$e/memory_text_x"
  "$PA" embed "$y" --modality points --split train --out "$e/memory_points_y"
  # test: zero-shot classes from X's text prompts; Y's held-out point clouds; val (the soft pivot's τ only): the
  # point clouds of 1,000 objects of content seed 2
  "$PA" embed "$x" --modality text --classes shape --split test --out "$e/classes_x"
  "$PA" embed "$y" --modality points --split test --label-field shape --out "$e/test_points_y"
  "$PA" embed "$y" data.seed=2 --modality points --split test --label-field shape --out "$e/val_points_y"
  cat > "$d/seed-$s/connect.yaml" <<EOF
# 3D, spaces of seed $s: X = image–text ($x; A = text, B = image), Y = points–image ($y; C = points)
inputs: {b_x: emb/image_x.npy, b_y: emb/image_y.npy, memory_a: emb/memory_text_x.npy, memory_c: emb/memory_points_y.npy}
eval: {classes: emb/classes_x.npy, classes_space: x, items: emb/test_points_y.npy, labels: emb/test_points_y.labels.txt,
       items_val: emb/val_points_y.npy, labels_val: emb/val_points_y.labels.txt}
method: {projector: linear}
train: {batch_size: 1000, epochs: 50, log_every: 100, threads: 1}
EOF
}

for part in "${@:-emoji shapes 3d}"; do
  for p in $part; do
    case $p in
      emoji) emoji ;;
      emoji-shared) emoji_shared ;;
      emoji-style) emoji_style ;;
      shapes) shapes ;;
      3d) three_d ;;
      *) echo "unknown part $p (emoji | emoji-shared | emoji-style | shapes | 3d)" >&2; exit 2 ;;
    esac
  done
done
