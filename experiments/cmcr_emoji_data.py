"""Manifests for the emoji C-MCR experiment (docs/cmcr.md), from the built emoji data and spoken captions.

    python experiments/cmcr_emoji_data.py split DATA_DIR     # DATA_DIR = data/emoji
    python experiments/cmcr_emoji_data.py pairs SPEECH_DIR DATA_DIR [NAME]   # after `polyalign data speech`

split: the training concepts of the concept split go into two disjoint halves by a salted hash of the concept id:
  cmcr_x_train.jsonl  half X (both styles): the image–text space (CLIP) trains on these images + captions
  cmcr_y_train.jsonl  half Y (both styles): the audio–text space (CLAP) trains on their spoken captions
  cmcr_test.jsonl     the held-out test concepts, google style: pictures vs spoken names (one per concept)
pairs: DATA_DIR/NAME.jsonl (default cmcr_y_pairs), one image row per spoken clip of SPEECH_DIR (the picture the
  clip's caption describes), with the clip's path in ``clip``: with the speech manifest's ``audio`` it pairs every
  clip with its picture (only the paired upper bound uses these pairs).
"""
import json
import sys
from pathlib import Path

from polyalign.data.base import stable_hash


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{path}: {len(rows)} rows, {len({r['concept_id'] for r in rows})} concepts")


def split(data: Path) -> None:
    train = _rows(data / "concept_train.jsonl")
    half = lambda r: stable_hash(f"cmcr:{r['concept_id']}") % 2  # noqa: E731
    _write(data / "cmcr_x_train.jsonl", [r for r in train if half(r) == 0])
    _write(data / "cmcr_y_train.jsonl", [r for r in train if half(r) == 1])
    _write(data / "cmcr_test.jsonl", [r for r in _rows(data / "concept_test.jsonl") if r["style"] == "google"])


def pairs(speech: Path, data: Path, name: Path = Path("cmcr_y_pairs")) -> None:
    _write(data / f"{name}.jsonl", [{"image": r["image"], "captions": [r["caption"]], "concept_id": r["concept_id"],
                                          "clip": r["audio"]} for r in _rows(speech / "speech.jsonl")])


if __name__ == "__main__":
    {"split": split, "pairs": pairs}[sys.argv[1]](*map(Path, sys.argv[2:]))
