"""What ``polyalign index`` embeds: the rows of a manifest, the images of a folder, or a split of the run's own data.

A source is a list of :class:`Row` (id, captions, where its picture is) read without decoding anything, and a
``load(row)`` that decodes one row's item for the tower (a bad image: ``BadRow``, a counted skip)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polyalign.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass
class Row:
    """One item to index: its id, captions, picture (a file path, or None) and the manifest's other fields."""

    id: str
    captions: list[str]
    path: str | None = None
    fields: dict = field(default_factory=dict)
    index: int = 0  # position in the source (the dataset's item index for a split)

    def meta(self) -> dict:
        return {"id": self.id, "caption": self.captions[0] if self.captions else "", "captions": self.captions,
                "path": self.path, "fields": self.fields}


class Source:
    """Rows of one source and how to decode an item of the ``modality`` tower."""

    def __init__(self, kind: str, rows: list[Row], describe: str, loader, skipped: dict | None = None):
        self.kind, self.rows, self.describe, self._loader = kind, rows, describe, loader
        self.skipped = skipped or {}  # reason → count, for rows rejected before decoding

    def load(self, row: Row):
        return self._loader(row)


def manifest_source(path: str | Path, image_size: int, id_field: str = "") -> Source:
    """An image–text manifest's rows (JSONL/CSV, as training reads them); ids: ``id_field`` or the row number."""
    from polyalign.data.manifest import BadRow, image_path, load_image, read_rows, string_list

    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    rows, skipped, seen = [], {}, set()
    for number, row in read_rows(path):
        if isinstance(row, BadRow) or not isinstance(row.get("image"), str) or not row["image"].strip():
            reason = row.reason if isinstance(row, BadRow) else "bad row"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        position = len(rows) + sum(skipped.values())  # the row's number among the non-blank rows, from 0
        rid = str(row.get(id_field, "")).strip() if id_field else str(position)
        if not rid:
            raise DataError(f"{path}:{number}: the row has no {id_field!r} field (or it is empty): every row needs "
                            f"an id there, or leave out --id-field to number the rows")
        if rid in seen:
            raise DataError(f"{path}:{number}: the id {rid!r} (field {id_field!r}) repeats an earlier row's")
        seen.add(rid)
        try:
            image = str(image_path(path.parent, row["image"].strip(), []).absolute())
        except BadRow as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            continue
        caps = string_list([row.get("caption") or ""]) + string_list(row.get("captions") or [])
        fields = {k: v for k, v in row.items() if k not in ("image", "caption", "captions") and
                  isinstance(v, (str, int, float, bool, list))}
        rows.append(Row(rid, caps, image, fields, len(rows)))

    def load(row: Row) -> np.ndarray:
        try:
            return load_image(Path(row.path), image_size)
        except BadRow:
            raise
        except OSError as e:
            raise BadRow("unreadable file", str(e)) from None

    return Source("manifest", rows, str(path), load, skipped)


def folder_source(folder: str | Path, image_size: int) -> Source:
    """Every image file under ``folder`` (sorted); id: its path relative to the folder, caption: its file name."""
    from polyalign.data.manifest import load_image

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    rows = [Row(p.relative_to(folder).as_posix(), [p.stem.replace("_", " ").replace("-", " ")],
                str(p.absolute()), {}, i) for i, p in enumerate(files)]
    return Source("folder", rows, str(folder), lambda row: load_image(Path(row.path), image_size))


def split_source(cfg, split: str, modality: str) -> Source:
    """A split of the run's own data config (``data.*``); ids: the item indices. Pictures are written as thumbnails
    by the index (the items have no files)."""
    from polyalign.data.build import build_datasets

    sets = build_datasets(cfg.data, cfg.train.seed, show_progress=False)
    if split not in sets:
        raise ConfigError(f"the run's data has no {split!r} split (it has {', '.join(sets)})")
    ds = sets[split]
    rows = [Row(str(i), [c for c in ds.captions(i) if c.strip()], None, {}, i) for i in range(len(ds))]

    def load(row: Row):
        if modality == "image":
            return ds.image(row.index).permute(1, 2, 0).numpy()  # (S, S, 3) uint8
        return getattr(ds, {"audio": "waveform", "points": "points"}[modality])(row.index)

    return Source("split", rows, f"{cfg.data.name} {split}", load)
