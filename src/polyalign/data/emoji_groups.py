"""Concept groups for the emoji concept split: concepts that differ only by person, gender, skin tone or direction
share a group, all flags are one group, and the split puts whole groups on one side.

The rule works on a concept's name (the emojibase label, else the emoji-datasource name), lower case:

  - every flag (emoji-datasource category ``Flags``: countries, subdivisions, and the plain flags) -> ``flags``;
  - skin-tone words (``light skin tone`` ... ``dark skin tone``) -> ``skin tone``;
  - a few gendered nouns are mapped to one word (``PAIRS``: mermaid/merman/merperson, prince/princess/person with
    crown, Santa/Mrs./Mx Claus, old man/old woman/older person);
  - person words (man, woman, person, men, women, people, boy, girl, adult, child, children, male, female, with
    ``'s``) are removed, together with the ``and``/``,`` that join them ("woman and man holding hands");
  - direction words (left, right, up, down, leftwards, ..., up-right, left-facing, facing, horizontally,
    vertically) are removed;
  - what is left, without punctuation, is the group id; nothing left -> ``person``.

So "man artist", "woman artist" and "artist" are group ``artist``; "man running: facing right" is ``running``;
"couple with heart: woman, man" is ``couple with heart``; "family: man, woman, boy" is ``family``. A group goes to
the test side when ``stable_hash("group:" + id) % 10 < 2``, so no group is on both sides and a group's side does
not depend on the other concepts.
"""
from __future__ import annotations

import re

from polyalign.data.base import stable_hash

TEST_BUCKETS = 2  # concept split: stable_hash("group:" + group) % 10 < TEST_BUCKETS -> test
FLAGS = "flags"
PEOPLE = {"man", "woman", "person", "men", "women", "people", "boy", "girl", "adult", "child", "children",
          "male", "female"}
DIRECTIONS = {"left", "right", "up", "down", "upwards", "downwards", "leftwards", "rightwards", "left-facing",
              "right-facing", "facing", "up-right", "up-left", "down-right", "down-left", "up-down", "left-right",
              "horizontally", "vertically"}
PAIRS = [(r"\b(mermaid|merman|merperson)\b", "merperson"), (r"\b(prince|princess|person with crown)\b", "royalty"),
         (r"\b(santa claus|mrs\. claus|mx claus)\b", "claus"), (r"\b(old man|old woman|older person)\b", "older")]
_TONE = re.compile(r"\b(light|medium-light|medium|medium-dark|dark) skin tone\b")
_PERSON = "\x00"


def concept_group(name: str, category: str | None = None) -> str:
    """The group id of one concept (see the module docstring)."""
    if category == "Flags":
        return FLAGS
    text = _TONE.sub("skin tone", " ".join(name.lower().replace("\u2019", "'").split()))
    for pattern, word in PAIRS:
        text = re.sub(pattern, word, text)
    tokens = []
    for raw in text.split():
        word = raw.strip(":,!.()")
        if word.endswith("'s"):
            word = word[:-2]
        if word in PEOPLE:
            tokens.append(_PERSON)
        elif word not in DIRECTIONS and word:
            tokens.append(word)
    kept, k = [], 0
    while k < len(tokens):  # drop person words and the "and" between two of them
        if tokens[k] == "and" and kept[-1:] == [_PERSON] and tokens[k + 1:k + 2] == [_PERSON]:
            k += 1
            continue
        kept.append(tokens[k])
        k += 1
    words = [re.sub(r"[^\w'&+*#-]", "", w) for w in kept if w != _PERSON]
    return " ".join(w for w in words if w) or "person"


def is_test_group(group: str) -> bool:
    return stable_hash("group:" + group) % 10 < TEST_BUCKETS


def is_test_concept_ungrouped(concept_id: str) -> bool:
    """The concept split before groups (one concept at a time): kept to measure how much it leaked."""
    return stable_hash(concept_id) % 10 < TEST_BUCKETS


def spanning_groups(rows: list[dict], is_test) -> list[str]:
    """Groups with concepts on both sides of a split given by ``is_test(row)``."""
    sides: dict[str, set[bool]] = {}
    for r in rows:
        sides.setdefault(r["concept_group"], set()).add(bool(is_test(r)))
    return sorted(g for g, s in sides.items() if len(s) == 2)


def leak_report(rows: list[dict]) -> dict:
    """How many groups span both sides (and test concepts whose group has a training concept) under the old
    ungrouped split and under the grouped one (the latter is 0 by construction)."""
    def count(is_test):
        span = set(spanning_groups(rows, is_test))
        test = {r["concept_id"] for r in rows if is_test(r)}
        leaked = {r["concept_id"] for r in rows if r["concept_id"] in test and r["concept_group"] in span}
        return {"groups_on_both_sides": len(span), "test_concepts_with_a_variant_in_train": len(leaked),
                "test_concepts": len(test)}

    return {"ungrouped_hash_split": count(lambda r: is_test_concept_ungrouped(r["concept_id"])),
            "grouped_split": count(lambda r: is_test_group(r["concept_group"]))}


def split_rows(rows: list[dict], styles: list[str]) -> dict[str, list[dict]]:
    """The manifests to write: all, the grouped concept split, leave-one-style-out and the style split (the last
    two with two or more styles)."""
    splits = {"all": rows,
              "concept_train": [r for r in rows if not is_test_group(r["concept_group"])],
              "concept_test": [r for r in rows if is_test_group(r["concept_group"])]}
    if len(styles) > 1:
        for style in styles:
            splits[f"loso_{style}_train"] = [r for r in rows if r["style"] != style]
            splits[f"loso_{style}_test"] = [r for r in rows if r["style"] == style]
        splits["style_train"] = splits[f"loso_{styles[-1]}_train"]
        splits["style_test"] = splits[f"loso_{styles[-1]}_test"]
    return splits
