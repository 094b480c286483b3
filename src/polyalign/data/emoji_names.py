"""Which icon of an iconify set (``@iconify-json/<set>``) shows which emoji concept.

First by code point: the set's ``chars.json`` (hex code points, lower case, ``-``-joined) -> icon name, matched with
the concept's ``unified`` code, then without ``FE0F`` variation selectors. Then, for the concepts left, by name:
icon names are slugs of CLDR names ("grinning-face", "flag-for-france"), so the concept's emojibase label, its
emoji-datasource name and its short names are slugged and looked up, in that order, each pass over all concepts
before the next (an exact label match beats a looser one), and no icon serves two concepts.
"""
from __future__ import annotations

import re
import unicodedata

# names that changed since EmojiOne 2.x named its icons (CLDR then -> emojibase now), applied before slugging
RENAMED = [("#", "pound"), ("*", "asterisk"), ("macao", "macau"), ("north macedonia", "macedonia"),
           ("eswatini", "swaziland"), ("türkiye", "turkey")]


def normalise_hexcode(hexcode: str) -> str:
    """Upper-case, without FE0F variation selectors: the key that matches emoji-datasource to emojibase."""
    return "-".join(p for p in hexcode.upper().split("-") if p != "FE0F")


def slug(text: str) -> str:
    """An iconify-style icon name: lower case ASCII words joined by ``-``; parentheses and dots dropped, ``&`` ->
    ``and``, and the renamings in RENAMED."""
    text = text.lower()
    for old, new in RENAMED:
        text = text.replace(old, new)
    text = re.sub(r"\([^)]*\)", "", text).replace(".", "").replace("&", " and ")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def name_candidates(entry: dict, label: str) -> list[list[str]]:
    """Icon names to try for one concept, by pass: [label slugs], [datasource name slug], [short-name slugs]."""
    label_slugs = [slug(label)] if label else []
    if label.lower().startswith("flag:"):  # emojibase "flag: France" is EmojiOne's "flag-for-france"
        label_slugs.insert(0, "flag-for-" + slug(label[5:]))
    elif entry.get("category") == "Flags" and label:  # "flag-for-rainbow-flag"
        label_slugs.append("flag-for-" + slug(label))
    return [label_slugs, [slug(entry.get("name") or "")], [slug(s) for s in entry.get("short_names") or []]]


def icon_index(icon_set: dict, chars: dict, entries: list[dict], labels: dict[str, str]) -> tuple[dict, dict]:
    """{concept_id: icon name} for the concepts (emoji-datasource entries) this set shows, and how each was found
    ({"code point": n, "label": n, "datasource name": n, "short name": n}). ``labels``: concept_id -> emojibase
    label (or "")."""
    aliases = icon_set.get("aliases") or {}
    names = set(icon_set.get("icons") or {}) | set(aliases)

    def picture(name: str) -> str:  # an alias without flips or turns shows its parent's picture
        seen = set()
        while name in aliases and name not in seen and not set(aliases[name]) & {"hFlip", "vFlip", "rotate"}:
            seen.add(name)
            name = aliases[name].get("parent", name)
        return name

    by_code = {str(k).lower(): v for k, v in chars.items()}
    by_norm = {normalise_hexcode(k): v for k, v in by_code.items()}
    found, used, how = {}, set(), {"code point": 0, "label": 0, "datasource name": 0, "short name": 0}
    for entry in entries:
        cid = entry["unified"].lower()
        icon = by_code.get(cid) or by_norm.get(normalise_hexcode(cid))
        if icon in names and picture(icon) not in used:
            found[cid], how["code point"] = icon, how["code point"] + 1
            used.add(picture(icon))
    candidates = {e["unified"].lower(): name_candidates(e, labels.get(e["unified"].lower(), "")) for e in entries}
    for k, kind in enumerate(("label", "datasource name", "short name")):
        for cid, passes in candidates.items():
            if cid in found:
                continue
            icon = next((c for c in passes[k] if c in names and picture(c) not in used), None)
            if icon is not None:
                found[cid], how[kind] = icon, how[kind] + 1
                used.add(picture(icon))
    return found, how
