"""Users' own image–text data, listed in a JSONL or CSV manifest.

Each row names an ``image`` (a local file: relative to the manifest's folder or absolute, ``~`` expanded, ``file://``
URLs and Windows ``\\`` separators accepted; see ``image_path``), a ``caption`` or ``captions``
(a JSON list, or ``|``-separated in CSV), and optionally ``tags`` (list, or ``|``-separated) and class labels: one
string per label field (``label`` by default; ``label_fields=("category", "subcategory")`` reads those columns).
Every row is checked and its image decoded, resized and centre-cropped once at construction; bad rows are
skipped and counted (lines that are not UTF-8 too), and too many of them is an error.
"""
from __future__ import annotations

import codecs
import csv
import json
import re
import warnings
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from tqdm import tqdm

from polyalign.data.base import ImageTextDataset, SkipReport
from polyalign.errors import DataError

PROGRESS_MIN_ROWS = 500  # show a progress bar only when loading takes a noticeable time


class BadRow(Exception):
    """A manifest row that cannot be used: ``reason`` is what the skip report counts, ``detail`` (optional) is shown
    with the row in the report's examples."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


NOT_UTF8 = "not UTF-8 text"
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")  # a scheme of 2+ letters: "C:\" and "C:/" are drive paths
WINDOWS_DRIVE = re.compile(r"[A-Za-z]:[\\/]")
LOCAL = "images must be local files, named relative to the manifest's folder or absolute"


def read_rows(path: Path) -> list[tuple[int, dict | BadRow]]:
    """(line number, row) for every non-blank row; in place of the row a BadRow where the line is not UTF-8 text
    or not a JSON object. The line number is where the row ends (a quoted CSV field may span lines)."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"manifest {path} must end in .jsonl, .json or .csv")
    with path.open("rb") as f:
        if f.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            raise DataError(f"manifest {path} is UTF-16 text: save it as UTF-8")
    if suffix == ".csv":
        return _csv_rows(path)
    rows = []  # bytes that are not UTF-8 decode to lone surrogates (surrogateescape) and are found per line
    for number, line in enumerate(path.read_text(encoding="utf-8-sig", errors="surrogateescape").splitlines(), 1):
        if not line.strip():
            continue
        if bad := _bad_bytes(line):
            rows.append((number, BadRow(NOT_UTF8, bad)))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        rows.append((number, row if isinstance(row, dict) else BadRow("bad row")))
    return rows


def _csv_rows(path: Path) -> list[tuple[int, dict | BadRow]]:
    """read_rows of a CSV manifest (header row first)."""
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader, rows = csv.DictReader(f), []
        try:
            for row in reader:
                fields = ((key, text) for key, value in row.items()  # cells past the header: a list under None
                          for text in (value if isinstance(value, list) else [value]) if text)
                bad = next((b for key, text in fields if (b := _bad_bytes(text, f"in column {key!r}"))), "")
                rows.append((reader.line_num, BadRow(NOT_UTF8, bad) if bad else row))
        except csv.Error as e:  # e.g. a field over csv.field_size_limit()
            raise DataError(f"{path}:{reader.line_num}: not readable as CSV ({e})") from e
    return rows


def _bad_bytes(text: str, where: str = "") -> str:
    """'' when ``text`` (decoded with surrogateescape) was UTF-8, else its first other byte and where it is."""
    try:
        text.encode("utf-8")
        return ""
    except UnicodeEncodeError as e:  # surrogateescape turned byte b into the code point U+DC00 + b
        where = where or f"at character {e.start + 1}"
        return f"byte 0x{ord(text[e.start]) - 0xDC00:02x} {where}: save the manifest as UTF-8"


def string_list(value) -> list[str]:
    """A list of non-empty stripped strings from a list, or from a '|'-separated string."""
    if isinstance(value, str):
        value = value.split("|")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRow("bad row")
    return [v.strip() for v in value if v.strip()]


def image_path(root: Path, name: str, notes: list[str]) -> Path:
    """The file a row's ``image`` names: relative to ``root`` or absolute, ``~`` the home folder, ``file://`` URLs
    read as paths, Windows ``\\`` separators as ``/`` (then noted in ``notes``); else BadRow saying what works."""
    if name.startswith("file://"):
        url = urlparse(name)
        if url.netloc not in ("", "localhost"):
            raise BadRow("URL image", f"{name} is on another host; {LOCAL}")
        name = url2pathname(url.path)
    elif URL.match(name):
        raise BadRow("URL image", f"{name}: {LOCAL}; download them first")
    forward = name.replace("\\", "/")
    for candidate in dict.fromkeys([name, forward]):  # as written, then with '/' separators
        if (path := _existing(root, candidate)) is not None:
            if candidate != name:
                notes.append(f"{name} → {candidate}")
            return path
    if WINDOWS_DRIVE.match(name):
        raise BadRow("missing image", f"{name} is a Windows drive path, not found here; {LOCAL}")
    if forward != name:
        raise BadRow("missing image", f"tried {forward} too: '\\' is read as '/'")
    if name.startswith("~"):
        raise BadRow("missing image", f"no file {_home(name) or name} ('~' is the home folder)")
    raise BadRow("missing image")


def _existing(root: Path, name: str) -> Path | None:
    """``root / name``, else ``name`` with ``~`` expanded: the first that is a file."""
    paths = [root / name] + ([_home(name)] if name.startswith("~") else [])
    return next((p for p in paths if p is not None and p.is_file()), None)


def _home(name: str) -> Path | None:
    """``name`` with ``~``/``~user`` expanded, or None where the home folder is unknown."""
    try:
        return Path(name).expanduser()
    except RuntimeError:
        return None


def load_image(path: Path, image_size: int) -> np.ndarray:
    """Decode fully, rescale 16-bit grey to 8 bits, flatten transparency onto white, resize the shorter side and
    centre-crop: (S, S, 3) uint8."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale, still >= image_size
            im.load()
            return fit_image(im, image_size)
    except Image.DecompressionBombError as e:
        raise BadRow("image too large", too_large(e)) from e
    except (OSError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise BadRow("corrupt image") from e


def fit_image(im: Image.Image, image_size: int) -> np.ndarray:
    """A decoded image as training sees it: EXIF-rotated, 8-bit, transparency on white, shorter side resized and
    centre-cropped to (S, S, 3) uint8."""
    im = to_8_bit(ImageOps.exif_transpose(im))
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    im = ImageOps.fit(im.convert("RGB"), (image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def to_8_bit(im: Image.Image) -> Image.Image:
    """16-bit grey (modes I;16*, and I as PIL gives 16-bit PNGs) → L (LA with a tRNS colour) by its high byte, as PIL
    reduces 16-bit colour; other modes unchanged (``convert`` would clip 16-bit values to white)."""
    if not (im.mode == "I" or im.mode.startswith("I;16")):
        return im
    grey = np.asarray(im).astype(np.int64).clip(0, 65535)  # (H, W); I is 32-bit signed
    out = Image.fromarray((grey >> 8).astype(np.uint8), "L")
    if (key := im.info.get("transparency")) is not None:  # one grey value marks transparent pixels
        out.putalpha(Image.fromarray(np.where(grey == key, 0, 255).astype(np.uint8), "L"))
    return out


def too_large(e: Image.DecompressionBombError) -> str:
    """The size of an image PIL refuses to decode, and its limit."""
    sizes = [int(n) for n in re.findall(r"\d+", str(e))]  # "Image size (N pixels) exceeds limit of M pixels ..."
    size, limit = sizes[:2] if len(sizes) >= 2 else (0, 2 * (Image.MAX_IMAGE_PIXELS or 0))
    return (f"{size:,} pixels, over PIL's limit of {limit:,} (2 × PIL.Image.MAX_IMAGE_PIXELS, its guard against "
            f"decompression bombs): shrink the image")


def parse_row(row: dict | BadRow, root: Path, image_size: int, label_fields: tuple[str, ...],
               notes: list[str]) -> tuple[np.ndarray, list[str], dict[str, str], list[str]]:
    """(image, captions, {field: class name}, tags) of one manifest row, or BadRow with the reason."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row.get("image"), str) or not row["image"].strip():
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
    return load_image(image_path(root, row["image"].strip(), notes), image_size), caps, labels, tags


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
        images, self._captions, labels, self._tags, self._concepts, self._styles = [], [], [], [], [], []
        notes: list[str] = []  # image paths found only with '/' for '\\'
        old_truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            for number, row in tqdm(rows, desc=f"loading {path.name}", unit="row",
                                    disable=not show_progress or len(rows) < PROGRESS_MIN_ROWS):
                try:
                    image, caps, label, tags = parse_row(row, path.parent, image_size, label_fields, notes)
                except BadRow as e:
                    self.skip_report.skip(e.reason, f"{path.name}:{number}", e.detail)
                    continue
                images.append(image)
                self._captions.append(caps)
                labels.append(label)
                self._tags.append(tags)
                concept = row.get("concept_id")  # items of one concept (e.g. its styles) are each a right answer
                self._concepts.append(None if concept in (None, "") else str(concept))
                self._styles.append(None if row.get("style") in (None, "") else str(row.get("style")))
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old_truncated
        if notes:
            warnings.warn(f"{path}: read {len(notes)} image path(s) with Windows '\\' separators as '/', "
                          f"e.g. {notes[0]}", stacklevel=2)
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

    def concept_id(self, i: int):
        """The row's ``concept_id`` (None when it has none): retrieval_any counts every item of a concept as right."""
        return self._concepts[i]

    def style(self, i: int):
        """The row's ``style`` (e.g. the emoji set that drew it; None when it has none)."""
        return self._styles[i]
