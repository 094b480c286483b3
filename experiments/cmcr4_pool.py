"""The large audio memory of experiments/cmcr4.sh: Y's training clips + the extra spoken captions, and real pairs from it.

    python experiments/cmcr4_pool.py EMB_DIR SPEECH_DIR

Reads EMB_DIR/memory_audio_y (Y's training clips, ids = their audio paths in SPEECH_DIR/y_train),
EMB_DIR/memory_extra_audio_y (the clips of SPEECH_DIR/memory_extra.jsonl, ids relative to SPEECH_DIR) and
EMB_DIR/pair_image_x (X's embedding of each training clip's picture, ids = the clip). Writes
- memory_audio_y.pool.npy / .ids.txt: every clip, ids relative to SPEECH_DIR (training clips first);
- pair_image_x.pool.npy / .ids.txt: for every pool clip, X's embedding of its picture. Every picture of the extra
  clips is one of the training clips' pictures (the same google pictures, spoken by other voices and speeds), so
  its embedding is looked up, not recomputed.
The memory and pair cuts are made from these files by experiments/cmcr4_subsample.py.
"""
import json
import sys
from pathlib import Path

import numpy as np


def read(emb_dir: Path, name: str) -> tuple[np.ndarray, list[str]]:
    return np.load(emb_dir / f"{name}.npy"), (emb_dir / f"{name}.ids.txt").read_text().splitlines()


def save(emb_dir: Path, name: str, emb: np.ndarray, ids: list[str]) -> None:
    np.save(emb_dir / f"{name}.npy", emb.astype(np.float32))
    (emb_dir / f"{name}.ids.txt").write_text("".join(i + "\n" for i in ids))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    emb_dir, speech = Path(sys.argv[1]), Path(sys.argv[2])
    train_emb, train_ids = read(emb_dir, "memory_audio_y")
    extra_emb, extra_ids = read(emb_dir, "memory_extra_audio_y")
    pair_emb, pair_ids = read(emb_dir, "pair_image_x")
    picture = {f"y_train/{r['audio']}": r["image"] for r in rows(speech / "y_train" / "speech.jsonl")}
    picture.update({r["audio"]: r["image"] for r in rows(speech / "memory_extra.jsonl")})
    ids = [f"y_train/{i}" for i in train_ids] + extra_ids
    if len(set(ids)) != len(ids):
        sys.exit("cmcr4_pool: duplicate clip ids in the pool")
    by_picture = {picture[f"y_train/{i}"]: pair_emb[n] for n, i in enumerate(pair_ids)}
    missing = sorted({picture[i] for i in ids} - set(by_picture))
    if missing:
        sys.exit(f"cmcr4_pool: {len(missing)} pictures of extra clips are no training clip's, e.g. {missing[:3]}")
    save(emb_dir, "memory_audio_y.pool", np.concatenate([train_emb, extra_emb]), ids)
    save(emb_dir, "pair_image_x.pool", np.stack([by_picture[picture[i]] for i in ids]), ids)
    print(f"pool: {len(ids)} clips ({len(train_ids)} training + {len(extra_ids)} extra), "
          f"{len(by_picture)} distinct pictures")


if __name__ == "__main__":
    main()
