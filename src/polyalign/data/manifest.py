"""Users' own image–text data, listed in a JSONL or CSV manifest.

Each row names an ``image`` (relative to the manifest's folder, or absolute), a ``caption`` or ``captions``
(a JSON list, or ``|``-separated in CSV), and optionally ``tags`` (list, or ``|``-separated) and class labels: one
string per label field (``label`` by default; ``label_fields=("category", "subcategory")`` reads those columns).
Every row is checked and its image decoded, resized and centre-cropped once at construction; bad rows are
skipped and counted, and too many of them is an error.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from tqdm import tqdm

from polyalign.data.base import ImageTextDataset, SkipReport
from polyalign.errors import DataError

PROGRESS_MIN_ROWS = 500  # show a progress bar only when loading takes a noticeable time


class BadRow(Exception):
    """A manifest row that cannot be used; the message is the reason counted in the skip report."""


def read_rows(path: Path) -> list[tuple[int, dict | None]]:
    """(line number, row) for every non-blank row; the row is None where the line is not a JSON object."""
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            rows.append((number, row if isinstance(row, dict) else None))
        return rows
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            return [(reader.line_num, row) for row in reader]
    raise DataError(f"manifest {path} must end in .jsonl, .json or .csv")


def string_list(value) -> list[str]:
    """A list of non-empty stripped strings from a list, or from a '|'-separated string."""
    if isinstance(value, str):
        value = value.split("|")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRow("bad row")
    return [v.strip() for v in value if v.strip()]


def load_image(path: Path, image_size: int) -> np.ndarray:
    """Decode fully, flatten transparency onto white, resize the shorter side and centre-crop: (S, S, 3) uint8."""
    if not path.is_file():
        raise BadRow("missing image")
    try:
        with Image.open(path) as im:
            im.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale, still >= image_size
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
            im = ImageOps.fit(im.convert("RGB"), (image_size, image_size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise BadRow("corrupt image") from e


def _parse_row(row: dict | None, root: Path, image_size: int,
               label_fields: tuple[str, ...]) -> tuple[np.ndarray, list[str], dict[str, str], list[str]]:
    """(image, captions, {field: class name}, tags) of one manifest row, or BadRow with the reason."""
    if row is None or not isinstance(row.get("image"), str) or not row["image"].strip():
        raise BadRow("bad row")
    caps = string_list([row.get("caption") or ""]) + string_list(row.get("captions") or [])
    tags = string_list(row.get("tags") or [])
    labels = {}
    for name in label_fields:
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            raise BadRow("bad row")
        if (value or "").strip():
            labels[name] = value.strip()
    if not caps:
        raise BadRow("empty caption")
    return load_image(root / row["image"].strip(), image_size), caps, labels, tags


class ManifestDataset(ImageTextDataset):
    """Images and captions listed in a JSONL/CSV manifest, validated and held in memory as uint8."""

    DEFAULT_TEMPLATES = ["a {}", "a picture of a {}"]

    def __init__(self, path: str | Path, image_size: int = 48, seed: int = 0, max_bad_fraction: float = 0.01,
                 label_names: dict[str, list[str]] | None = None, show_progress: bool = True,
                 label_fields: tuple[str, ...] | list[str] = ("label",)):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"manifest not found: {path}")
        self.path, self.image_size, self.seed = path, image_size, seed
        label_fields = tuple(label_fields)
        self.prompt_templates = {name: self.DEFAULT_TEMPLATES for name in label_fields}
        rows = read_rows(path)
        self.skip_report = SkipReport(total=len(rows))
        images, self._captions, labels, self._tags = [], [], [], []
        old_truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            for number, row in tqdm(rows, desc=f"loading {path.name}", unit="row",
                                    disable=not show_progress or len(rows) < PROGRESS_MIN_ROWS):
                try:
                    image, caps, label, tags = _parse_row(row, path.parent, image_size, label_fields)
                except BadRow as e:
                    self.skip_report.skip(str(e), f"{path.name}:{number}")
                    continue
                images.append(image)
                self._captions.append(caps)
                labels.append(label)
                self._tags.append(tags)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old_truncated
        self._check_bad_rows(max_bad_fraction)
        self.images = np.stack(images)
        if label_names is None:
            found = {name: sorted({lab[name] for lab in labels if name in lab}) for name in label_fields}
            label_names = {name: classes for name, classes in found.items() if classes}
        self.label_names = label_names
        index = {name: {c: k for k, c in enumerate(classes)} for name, classes in label_names.items()}
        # a class unknown to a reused vocabulary (a test-only class) is left out of that item's labels
        self._labels = [{name: index[name][c] for name, c in lab.items() if c in index.get(name, {})}
                        for lab in labels]

    def _check_bad_rows(self, max_bad_fraction: float) -> None:
        """Raise DataError when too many rows were skipped, or none is left."""
        report, name = self.skip_report, self.path
        fraction = report.n_skipped / max(report.total, 1)
        if fraction > max_bad_fraction:
            raise DataError(
                f"{name}: {report.n_skipped} of {report.total} rows are bad ({fraction:.1%}), more than the allowed "
                f"{max_bad_fraction:.1%}. First bad rows: {'; '.join(report.examples)}. Fix them, or allow more "
                f"with data.max_bad_fraction=<fraction> (e.g. data.max_bad_fraction={min(1.0, fraction * 1.5):.3g})."
            )
        if report.total == report.n_skipped:
            raise DataError(f"{name}: no usable rows")

    def __len__(self) -> int:
        return len(self._captions)

    def image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1)

    def captions(self, i: int) -> list[str]:
        return self._captions[i]

    def labels(self, i: int) -> dict[str, int]:
        return self._labels[i]

    def tags(self, i: int) -> list[str]:
        return self._tags[i]
