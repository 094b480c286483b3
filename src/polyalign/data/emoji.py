"""An image–text dataset of emoji, built from the npm packages ``emoji-datasource-<style>`` and ``emojibase-data``.

    polyalign data emoji --out DIR [--styles google,twitter] [--source PATH ...] [--cache DIR]

``emoji-datasource-<style>`` gives the concepts (``emoji.json``: name, short names, category, subcategory, image
file, ``has_img_<style>``) and 64 px PNGs under ``img/<style>/64/``; ``emojibase-data`` (``en/data.json``) adds a
label, tags and emoticons, matched by hexcode (upper-case, ``FE0F`` variation selectors removed). Skin-tone
variations are not used. Packages come from ``--source`` (tarballs from ``npm pack`` or extracted package folders)
or, for the ones not given, from ``npm pack`` into the cache folder (an existing tarball there is reused).

Written to DIR:
  - ``images/<style>/<concept_id>.png``: 64 px RGB, transparency composited onto white.
  - ``all.jsonl``: one row per (concept, style): ``image``, ``captions``, ``label`` (= subcategory), ``category``,
    ``subcategory``, ``tags`` (emojibase), ``emoticons``, ``style``, ``concept_id`` (the ``unified`` hexcode in
    lower case, identical across styles).
  - Style split (only with two or more styles): ``style_train.jsonl`` holds every style but the last one given,
    ``style_test.jsonl`` the last (held-out) style; both over all concepts.
  - Concept split: ``concept_test.jsonl`` holds the concepts with ``stable_hash(concept_id) % 10 < 2`` (about 20%),
    ``concept_train.jsonl`` the rest; both over all given styles, so no concept is in both.
  - ``info.json`` and ``README.txt``: package versions, counts per split, skipped entries and each style's licence.

Only openly licensed styles (google: Apache-2.0, twitter: CC-BY-4.0) are allowed unless ``allow_unlicensed``.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from polyalign.data.base import SkipReport, stable_hash
from polyalign.errors import DataError

EMOJIBASE = "emojibase-data"
IMAGE_SIZE = 64
TEST_BUCKETS = 2  # concept split: stable_hash(concept_id) % 10 < TEST_BUCKETS -> test
LICENCES = {
    "google": "Apache-2.0 (Noto Emoji, https://github.com/googlefonts/noto-emoji)",
    "twitter": "CC-BY-4.0 (Twemoji graphics, https://github.com/twitter/twemoji)",
    "apple": "not openly licensed (Apple)",
    "facebook": "not openly licensed (Facebook)",
}
OPEN_STYLES = ("google", "twitter")
NO_IMAGE, CORRUPT = "no image for this style", "corrupt PNG"
_WANTED = re.compile(r"package\.json|emoji\.json|en/data\.json|img/[a-z]+/64/[^/]+\.png")


def datasource_package(style: str) -> str:
    """The npm package holding one style's images."""
    return f"emoji-datasource-{style}"


def normalise_hexcode(hexcode: str) -> str:
    """Upper-case, without FE0F variation selectors: the key that matches emoji-datasource to emojibase."""
    return "-".join(p for p in hexcode.upper().split("-") if p != "FE0F")


@dataclass
class Package:
    """The files this builder reads from one npm package: a tarball (read once, streaming) or a folder."""

    name: str
    version: str
    source: Path
    files: dict[str, bytes] = field(default_factory=dict)  # tarball members, path without the top folder
    root: Path | None = None  # extracted folder

    def read(self, rel: str) -> bytes | None:
        if self.root is None:
            return self.files.get(rel)
        path = self.root / rel
        return path.read_bytes() if path.is_file() else None

    def json(self, rel: str):
        data = self.read(rel)
        if data is None:
            raise DataError(f"{self.source}: {self.name} has no {rel}")
        return json.loads(data)


def load_package(path: str | Path) -> Package:
    """A Package from a ``.tgz`` made by ``npm pack`` or from an extracted package folder."""
    path = Path(path)
    if path.is_dir():
        root = path / "package" if (path / "package" / "package.json").is_file() else path
        files, meta_path = {}, root / "package.json"
        meta = json.loads(meta_path.read_bytes()) if meta_path.is_file() else None
    elif path.is_file():
        root, files = None, {}
        try:
            with tarfile.open(path, "r|*") as tf:
                for member in tf:
                    rel = member.name.split("/", 1)[-1]
                    if member.isfile() and _WANTED.fullmatch(rel):
                        files[rel] = tf.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"--source {path}: not a readable tarball ({e})") from e
        meta = json.loads(files["package.json"]) if "package.json" in files else None
    else:
        raise DataError(f"--source {path}: no such file or folder")
    if not isinstance(meta, dict) or "name" not in meta:
        raise DataError(f"--source {path}: not an npm package (no package.json with a name)")
    return Package(meta["name"], str(meta.get("version", "?")), path, files, root)


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.name))


def npm_pack(name: str, cache_dir: Path) -> Path:
    """The newest ``name-<version>.tgz`` in cache_dir, downloaded with ``npm pack`` when there is none."""
    def cached() -> list[Path]:
        return sorted(cache_dir.glob(f"{name}-[0-9]*.tgz"), key=_version_key)

    if not cached():
        npm = shutil.which("npm")
        if npm is None:
            raise DataError(f"npm not found: install Node.js, or on a machine with npm run `npm pack {name}` and pass "
                            f"the tarball (or the extracted folder) with --source PATH")
        cache_dir.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([npm, "pack", name, "--pack-destination", str(cache_dir)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not cached():
            last = (done.stderr.strip().splitlines() or ["no tarball written"])[-1]
            raise DataError(f"`npm pack {name}` failed: {last}")
    return cached()[-1]


def obtain_packages(names: list[str], sources: list[str | Path], cache_dir: str | Path) -> dict[str, Package]:
    """The named packages: from ``sources`` first, the rest through ``npm pack`` into cache_dir."""
    packages = {}
    for src in sources:
        package = load_package(src)
        packages.setdefault(package.name, package)
    for name in names:
        if name not in packages:
            packages[name] = load_package(npm_pack(name, Path(cache_dir)))
    return packages


def _dedupe(texts) -> list[str]:
    seen, out = set(), []
    for t in texts:
        t = " ".join(t.split())
        if t and t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    return out


def captions_for(entry: dict, base: dict | None) -> list[str]:
    """Captions of one concept: its name, "an emoji of <name>", the emojibase label, name + tags, short names."""
    name = (entry.get("name") or (base or {}).get("label") or entry.get("short_name") or "").lower()
    label = ((base or {}).get("label") or "").lower()
    tags = (base or {}).get("tags") or []
    short = [s.replace("_", " ").replace("-", " ") for s in entry.get("short_names") or []]
    words = set(re.findall(r"\w+", f"{name} {label}"))
    extra = [t for t in tags if t not in words][:4]
    return _dedupe([name, f"an emoji of {label or name}", label,
                    f"{label or name} ({', '.join(extra)})" if extra else "", *short])


def composite_png(data: bytes, size: int = IMAGE_SIZE) -> Image.Image:
    """Decode a PNG fully and flatten it onto white: an RGB image of size × size (ValueError if unreadable)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgba = im.convert("RGBA")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(CORRUPT) from e
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.Resampling.LANCZOS)
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")


def _style_rows(style: str, package: Package, emojibase: dict[str, dict], out: Path, report: SkipReport,
                show_progress: bool) -> list[dict]:
    """Write one style's images and return its manifest rows; unusable entries are counted in report."""
    entries = package.json("emoji.json")
    report.total = len(entries)
    (out / "images" / style).mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in tqdm(entries, desc=f"emoji {style}", unit="img", disable=not show_progress or None):
        cid = entry["unified"].lower()
        data = package.read(f"img/{style}/64/{entry.get('image', '')}") if entry.get(f"has_img_{style}") else None
        if data is None:
            report.skip(NO_IMAGE, f"{style}/{cid}")
            continue
        try:
            image = composite_png(data)
        except ValueError:
            report.skip(CORRUPT, f"{style}/{cid}")
            continue
        rel = f"images/{style}/{cid}.png"
        image.save(out / rel, compress_level=1)
        base = emojibase.get(normalise_hexcode(entry["unified"]))
        emoticons = (base or {}).get("emoticon") or []
        row = {"image": rel, "captions": captions_for(entry, base), "label": entry.get("subcategory"),
               "category": entry.get("category"), "subcategory": entry.get("subcategory"),
               "tags": (base or {}).get("tags") or [], "emoticons": [emoticons] if isinstance(emoticons, str)
               else emoticons, "style": style, "concept_id": cid}
        rows.append({k: v for k, v in row.items() if v is not None})
    return rows


def split_rows(rows: list[dict], styles: list[str]) -> dict[str, list[dict]]:
    """The manifests to write: all, the style split (two or more styles) and the concept split."""
    def is_test(row):
        return stable_hash(row["concept_id"]) % 10 < TEST_BUCKETS

    splits = {"all": rows,
              "concept_train": [r for r in rows if not is_test(r)],
              "concept_test": [r for r in rows if is_test(r)]}
    if len(styles) > 1:
        splits["style_train"] = [r for r in rows if r["style"] != styles[-1]]
        splits["style_test"] = [r for r in rows if r["style"] == styles[-1]]
    return splits


def check_styles(styles: list[str], allow_unlicensed: bool) -> None:
    """DataError for an empty, repeated, malformed or (without allow_unlicensed) not openly licensed style."""
    if not styles or len(set(styles)) != len(styles):
        raise DataError(f"--styles must name distinct styles, got {','.join(styles) or 'none'}")
    for style in styles:
        if not re.fullmatch(r"[a-z]+", style):
            raise DataError(f"bad style {style!r}: expected a name such as google or twitter")
        if style not in OPEN_STYLES and not allow_unlicensed:
            raise DataError(f"style {style!r} is {LICENCES.get(style, 'of unknown licence')}; only "
                            f"{', '.join(OPEN_STYLES)} are allowed by default (pass --allow-unlicensed to use it)")


def build_emoji_dataset(out: str | Path, styles=OPEN_STYLES, sources=(), cache_dir: str | Path = "cache/npm",
                        allow_unlicensed: bool = False, show_progress: bool = True) -> dict:
    """Build the dataset in ``out`` (see the module docstring); returns what ``info.json`` holds."""
    t0, styles, out = time.time(), list(styles), Path(out)
    check_styles(styles, allow_unlicensed)
    names = [datasource_package(s) for s in styles] + [EMOJIBASE]
    packages = obtain_packages(names, list(sources), cache_dir)
    emojibase = {normalise_hexcode(e["hexcode"]): e for e in packages[EMOJIBASE].json("en/data.json")}
    rows, reports = [], {}
    for style in styles:
        reports[style] = SkipReport()
        rows += _style_rows(style, packages[datasource_package(style)], emojibase, out, reports[style], show_progress)
    if not rows:
        raise DataError(f"no usable emoji images for styles {','.join(styles)}")
    splits = split_rows(rows, styles)
    for name, split in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split),
                                           encoding="utf-8")
    per_style = [{r["concept_id"] for r in rows if r["style"] == s} for s in styles]
    info = {
        "styles": styles,
        "packages": {n: packages[n].version for n in names},
        "licences": {s: LICENCES.get(s, "unknown") for s in styles},
        "concepts": len(set().union(*per_style)),
        "concepts_in_all_styles": len(set.intersection(*per_style)),
        "rows": {name: len(split) for name, split in splits.items()},
        "concepts_per_split": {name: len({r["concept_id"] for r in split}) for name, split in splits.items()},
        "skipped": {s: {"total": r.total, "skipped": r.skipped, "examples": r.examples} for s, r in reports.items()},
        "elapsed_s": round(time.time() - t0, 2),
    }
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.txt").write_text(readme_text(info))
    return info


def readme_text(info: dict) -> str:
    """The human-readable summary written next to the manifests."""
    lines = ["Emoji image-text dataset built by `polyalign data emoji` (see polyalign/data/emoji.py).", "",
             "Packages: " + ", ".join(f"{n}@{v}" for n, v in info["packages"].items()), "", "Licences of the images:"]
    lines += [f"  {s}: {lic}" for s, lic in info["licences"].items()]
    lines += ["", f"Concepts: {info['concepts']} ({info['concepts_in_all_styles']} with an image in every style)", "",
              "Manifests (rows, concepts):"]
    lines += [f"  {n}.jsonl: {k} rows, {info['concepts_per_split'][n]} concepts" for n, k in info["rows"].items()]
    lines += ["", "style_train/style_test: all styles but the last / the last style; concept_train/concept_test: "
              "concepts split 80/20 by stable_hash(concept_id) % 10 < 2, over all styles.", "", "Skipped entries:"]
    lines += [f"  {s}: {sum(r['skipped'].values())} of {r['total']} {r['skipped'] or ''}"
              for s, r in info["skipped"].items()]
    return "\n".join(lines) + "\n"
