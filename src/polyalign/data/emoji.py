"""An image–text benchmark of emoji in up to four artists' styles, built from npm packages.

    polyalign data emoji --out DIR [--styles google,twitter,fluent,emojione] [--size 64] [--source PATH ...]
                         [--cache DIR] [--allow-unlicensed]

Concepts come from ``emoji-datasource-<style>`` (``emoji.json``: name, short names, category, subcategory; one
concept per ``unified`` code point sequence, skin-tone variations not used); ``emojibase-data`` (``en/data.json``)
adds a label, tags and emoticons, matched by hexcode (upper-case, ``FE0F`` variation selectors removed). Styles:

  - ``google``, ``twitter`` (also ``apple``, ``facebook``, not openly licensed): the 64 px PNGs under
    ``img/<style>/64/`` of ``emoji-datasource-<style>``, resized to ``--size`` when it is not 64;
  - ``fluent``: Microsoft Fluent Emoji (flat) from ``@iconify-json/fluent-emoji-flat``; ``emojione``: EmojiOne 2.x
    from ``@iconify-json/emojione``. Their SVG icons (iconify ``icons.json``, aliases followed with their flips)
    are rasterised with cairosvg at ``--size``. Which icon shows which concept: polyalign/data/emoji_names.py
    (code points from ``chars.json`` first - fluent has them, emojione's is empty - then slugs of the label,
    name and short names). Fluent has no country flags (about 83% of concepts map); EmojiOne 2.x predates most
    gendered and newer emoji (about 72% map).
    SVG-only builds read the concepts from ``emoji-datasource-google``'s ``emoji.json``.

Packages come from ``--source`` (tarballs from ``npm pack`` or extracted package folders) or, for the ones not
given, from ``npm pack`` into the cache folder (an existing tarball there is reused). A concept a style has no
picture for, a corrupt PNG, an SVG cairosvg cannot draw and a picture with nothing drawn are skips counted by
reason per style (info.json, README.txt and the command's output), never an error.

Written to DIR:
  - ``images/<style>/<concept_id>.png``: ``--size`` px RGB, transparency composited onto white.
  - ``all.jsonl``: one row per (concept, style): ``image``, ``captions``, ``label`` (= subcategory), ``category``,
    ``subcategory``, ``tags`` (emojibase), ``emoticons``, ``style``, ``concept_id`` (the ``unified`` hexcode in
    lower case, identical across styles) and ``concept_group`` (below).
  - Concept split, grouped: ``concept_train.jsonl`` / ``concept_test.jsonl``, over all given styles. Concepts
    that differ only by person, gender, skin tone or direction ("man artist", "woman artist", "artist"; "person
    running: facing right"; "family: man, woman, boy"; "left arrow", "up arrow") share a ``concept_group``, all
    flags are the one group ``flags``, and whole groups go to test when ``stable_hash("group:" + group) % 10 < 2``
    (about 19% of concepts; ``flags`` is on the train side), so no test concept has a variant in training. The
    rule: polyalign/data/emoji_groups.py. info.json's ``concept_split`` counts the groups that span both sides
    under the old one-concept-at-a-time hash split and under this one (0).
  - Leave-one-style-out (two or more styles): for each style S, ``loso_<S>_train.jsonl`` holds every other style
    and ``loso_<S>_test.jsonl`` style S, both over all concepts. ``style_train.jsonl`` / ``style_test.jsonl`` are
    the same files for the last style given (kept for existing configs).
  - ``info.json`` and ``README.txt``: package versions, image size, rows per style and split, skips per style by
    reason, how the SVG styles' icons were matched, the concept-split figures and each style's licence.

Only openly licensed styles (google: Apache-2.0, twitter: CC-BY-4.0, fluent: MIT, emojione: CC-BY-4.0) are
allowed unless ``allow_unlicensed``.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from polyalign.data.base import SkipReport
from polyalign.data.emoji_groups import concept_group, leak_report, split_rows
from polyalign.data.emoji_names import icon_index, normalise_hexcode
from polyalign.data.emoji_packages import Package, load_package, npm_pack, obtain_packages  # noqa: F401
from polyalign.data.emoji_render import (BLANK, CORRUPT, CORRUPT_SVG, IMAGE_SIZE, composite_png,  # noqa: F401
                                         iconify_svg, render_svg)
from polyalign.errors import DataError

EMOJIBASE = "emojibase-data"
NO_IMAGE = "no image for this style"


@dataclass(frozen=True)
class Style:
    package: str
    kind: str  # "png": emoji-datasource-<style>; "iconify": an @iconify-json SVG set
    licence: str
    open: bool


STYLES = {
    "google": Style("emoji-datasource-google", "png",
                    "Apache-2.0 (Noto Emoji, https://github.com/googlefonts/noto-emoji)", True),
    "twitter": Style("emoji-datasource-twitter", "png",
                     "CC-BY-4.0 (Twemoji graphics, https://github.com/twitter/twemoji)", True),
    "fluent": Style("@iconify-json/fluent-emoji-flat", "iconify",
                    "MIT (Microsoft Fluent Emoji, flat, https://github.com/microsoft/fluentui-emoji)", True),
    "emojione": Style("@iconify-json/emojione", "iconify",
                      "CC-BY-4.0 (EmojiOne 2.x by Ranked, https://github.com/EmojiTwo/emojitwo)", True),
    "apple": Style("emoji-datasource-apple", "png", "not openly licensed (Apple)", False),
    "facebook": Style("emoji-datasource-facebook", "png", "not openly licensed (Facebook)", False),
}
LICENCES = {name: s.licence for name, s in STYLES.items()}
OPEN_STYLES = tuple(name for name, s in STYLES.items() if s.open)
DEFAULT_STYLES = ("google", "twitter")
CONCEPT_PACKAGE = STYLES["google"].package  # where SVG-only builds read the concepts


def datasource_package(style: str) -> str:
    """The npm package holding one emoji-datasource style's images."""
    return f"emoji-datasource-{style}"


def style_of(name: str) -> Style:
    """A known style, or an emoji-datasource PNG style of unknown licence."""
    return STYLES.get(name) or Style(datasource_package(name), "png", "unknown licence", False)


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


def _png_pictures(style: str, package: Package, size: int):
    """entry -> RGB image (None: the style has no picture; ValueError: unusable) for an emoji-datasource style."""
    def picture(entry):
        data = package.read(f"img/{style}/64/{entry.get('image', '')}") if entry.get(f"has_img_{style}") else None
        return None if data is None else composite_png(data, size)
    return picture


def _iconify_pictures(package: Package, entries: list[dict], emojibase: dict, size: int):
    """entry -> RGB image for an iconify SVG style, and how its icons were matched to the concepts."""
    icon_set, chars = package.json("icons.json"), package.json("chars.json", {})
    if not isinstance(icon_set, dict) or not isinstance(icon_set.get("icons"), dict) or not isinstance(chars, dict):
        raise DataError(f"{package.source}: {package.name} is not an iconify icon set (icons.json, chars.json)")
    labels = {e["unified"].lower(): (emojibase.get(normalise_hexcode(e["unified"])) or {}).get("label") or ""
              for e in entries}
    index, how = icon_index(icon_set, chars, entries, labels)

    def picture(entry):
        name = index.get(entry["unified"].lower())
        if name is None:
            return None
        svg = iconify_svg(icon_set, name)
        if svg is None:
            raise ValueError(CORRUPT_SVG, f"icon {name}: no body, a broken alias or a bad size")
        return render_svg(svg, size)
    return picture, how


def _style_rows(style: str, entries: list[dict], picture, emojibase: dict[str, dict], out: Path,
                report: SkipReport, show_progress: bool) -> list[dict]:
    """Write one style's images and return its manifest rows; unusable entries are counted in report."""
    report.total = len(entries)
    (out / "images" / style).mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in tqdm(entries, desc=f"emoji {style}", unit="img", disable=not show_progress or None):
        cid = entry["unified"].lower()
        try:
            image = picture(entry)
        except ValueError as e:
            report.skip(str(e.args[0]), f"{style}/{cid}", *[str(a) for a in e.args[1:2]])
            continue
        if image is None:
            report.skip(NO_IMAGE, f"{style}/{cid}")
            continue
        rel = f"images/{style}/{cid}.png"
        image.save(out / rel, compress_level=1)
        base = emojibase.get(normalise_hexcode(entry["unified"]))
        emoticons = (base or {}).get("emoticon") or []
        row = {"image": rel, "captions": captions_for(entry, base), "label": entry.get("subcategory"),
               "category": entry.get("category"), "subcategory": entry.get("subcategory"),
               "tags": (base or {}).get("tags") or [], "emoticons": [emoticons] if isinstance(emoticons, str)
               else emoticons, "style": style, "concept_id": cid,
               "concept_group": concept_group((base or {}).get("label") or entry.get("name") or cid,
                                              entry.get("category"))}
        rows.append({k: v for k, v in row.items() if v is not None})
    return rows


def check_styles(styles: list[str], allow_unlicensed: bool) -> None:
    """DataError for an empty, repeated, malformed or (without allow_unlicensed) not openly licensed style."""
    if not styles or len(set(styles)) != len(styles):
        raise DataError(f"--styles must name distinct styles, got {','.join(styles) or 'none'}")
    for style in styles:
        if not re.fullmatch(r"[a-z]+", style):
            raise DataError(f"bad style {style!r}: expected a name such as google, twitter, fluent or emojione")
        if not style_of(style).open and not allow_unlicensed:
            raise DataError(f"style {style!r}: {style_of(style).licence}; only {', '.join(OPEN_STYLES)} are "
                            f"allowed by default (pass --allow-unlicensed to use it)")


def build_emoji_dataset(out: str | Path, styles=DEFAULT_STYLES, sources=(), cache_dir: str | Path = "cache/npm",
                        allow_unlicensed: bool = False, show_progress: bool = True, size: int = IMAGE_SIZE,
                        concepts=None) -> dict:
    """Build the dataset in ``out`` (see the module docstring); returns what ``info.json`` holds. ``concepts``:
    only these concept ids (lower-case ``unified`` codes; for quick builds and tests), default all."""
    t0, styles, out = time.time(), list(styles), Path(out)
    check_styles(styles, allow_unlicensed)
    if not isinstance(size, int) or not 8 <= size <= 1024:
        raise DataError(f"--size must be an integer from 8 to 1024, got {size!r}")
    png_styles = [s for s in styles if style_of(s).kind == "png"]
    concept_package = style_of(png_styles[0]).package if png_styles else CONCEPT_PACKAGE
    names = list(dict.fromkeys([style_of(s).package for s in styles] + [concept_package, EMOJIBASE]))
    packages = obtain_packages(names, list(sources), cache_dir)
    emojibase = {normalise_hexcode(e["hexcode"]): e for e in packages[EMOJIBASE].json("en/data.json")}
    wanted = None if concepts is None else {c.lower() for c in concepts}

    def entries_of(package: Package) -> list[dict]:
        entries = package.json("emoji.json")
        return entries if wanted is None else [e for e in entries if e["unified"].lower() in wanted]

    rows, reports, matches, per_style = [], {}, {}, {}
    for style in styles:
        package = packages[style_of(style).package]
        if style_of(style).kind == "png":
            entries, picture = entries_of(package), _png_pictures(style, package, size)
        else:
            entries = entries_of(packages[concept_package])
            picture, matches[style] = _iconify_pictures(package, entries, emojibase, size)
        reports[style] = SkipReport()
        per_style[style] = _style_rows(style, entries, picture, emojibase, out, reports[style], show_progress)
        rows += per_style[style]
    if not rows:
        raise DataError(f"no usable emoji images for styles {','.join(styles)}")
    splits = split_rows(rows, styles)
    for name, split in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split),
                                           encoding="utf-8")
    ids = [{r["concept_id"] for r in per_style[s]} for s in styles]
    info = {
        "styles": styles,
        "image_size": size,
        "packages": {n: packages[n].version for n in names},
        "licences": {s: style_of(s).licence for s in styles},
        "concepts": len(set().union(*ids)),
        "concepts_in_all_styles": len(set.intersection(*ids)),
        "concept_groups": len({r["concept_group"] for r in rows}),
        "rows_per_style": {s: len(per_style[s]) for s in styles},
        "rows": {name: len(split) for name, split in splits.items()},
        "concepts_per_split": {name: len({r["concept_id"] for r in split}) for name, split in splits.items()},
        "concept_split": leak_report(rows),
        "icon_matches": matches,
        "skipped": {s: {"total": r.total, "skipped": r.skipped, "examples": r.examples} for s, r in reports.items()},
        "elapsed_s": round(time.time() - t0, 2),
    }
    (out / "info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    (out / "README.txt").write_text(readme_text(info), encoding="utf-8")
    return info


def readme_text(info: dict) -> str:
    """The human-readable summary written next to the manifests."""
    lines = ["Emoji image-text dataset built by `polyalign data emoji` (see polyalign/data/emoji.py).", "",
             "Packages: " + ", ".join(f"{n}@{v}" for n, v in info["packages"].items()), "",
             f"Images: {info['image_size']} px RGB on white. Licences of the images:"]
    lines += [f"  {s}: {lic}" for s, lic in info["licences"].items()]
    lines += ["", f"Concepts: {info['concepts']} ({info['concepts_in_all_styles']} with an image in every style), "
              f"in {info['concept_groups']} concept groups", "", "Rows per style:"]
    for s, n in info["rows_per_style"].items():
        how = ", ".join(f"{k} {m}" for k, m in info["icon_matches"].get(s, {}).items())
        lines.append(f"  {s}: {n}" + (f" (icons matched by {how})" if how else ""))
    lines += ["", "Manifests (rows, concepts):"]
    lines += [f"  {n}.jsonl: {k} rows, {info['concepts_per_split'][n]} concepts" for n, k in info["rows"].items()]
    before, after = info["concept_split"]["ungrouped_hash_split"], info["concept_split"]["grouped_split"]
    lines += ["", "concept_train/concept_test: whole concept groups (person, gender, skin-tone and direction "
              "variants; all flags) split by stable_hash('group:' + group) % 10 < 2, over all styles. Groups on "
              f"both sides: {after['groups_on_both_sides']} (the ungrouped split had "
              f"{before['groups_on_both_sides']}, with {before['test_concepts_with_a_variant_in_train']} of "
              f"{before['test_concepts']} test concepts a variant of a training concept).",
              "loso_<S>_train/test: all styles but S / style S; style_train/style_test: the same for the last style.",
              "", "Skipped entries:"]
    lines += [f"  {s}: {sum(r['skipped'].values())} of {r['total']} {r['skipped'] or ''}"
              for s, r in info["skipped"].items()]
    return "\n".join(lines) + "\n"
