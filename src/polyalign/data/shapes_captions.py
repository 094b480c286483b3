"""The caption grammar of the shapes scenes: synonyms, place phrases, spatial relations and the caption makers of
one- and multi-object scenes (each draws its words from a ``random.Random``, so a scene's captions are fixed)."""
from __future__ import annotations

import random

COUNTS = ["one", "two", "three"]
SYNONYMS = {
    "circle": ["disk"], "square": ["box"], "diamond": ["rhombus"], "cross": ["plus sign"], "star": [],
    "triangle": [], "heart": [], "ring": ["hoop"], "red": ["crimson", "scarlet"], "green": ["emerald"],
    "blue": ["cobalt"], "yellow": ["golden"], "purple": ["violet"], "orange": ["tangerine"],
    "small": ["little", "tiny"], "large": ["big"],
}
PLACES = {  # alternatives to "at the {position}"
    "top left": "in the top left corner", "top right": "in the top right corner", "top": "near the top",
    "bottom left": "in the bottom left corner", "bottom right": "in the bottom right corner",
    "bottom": "near the bottom", "left": "on the left", "right": "on the right", "centre": "in the middle",
}



def _name(rng: random.Random, word: str) -> str:
    """The word itself, or now and then one of its synonyms."""
    alts = SYNONYMS.get(word, [])
    return rng.choice(alts) if alts and rng.random() < 0.3 else word


def _place(rng: random.Random, position: str) -> str:
    """A phrase placing an object at a grid position."""
    return f"at the {position}" if rng.random() < 0.6 else PLACES[position]


def _relation(rng: random.Random, a: int, b: int) -> str:
    """A spatial relation that holds from grid cell a to grid cell b (distinct cells)."""
    options = []
    if a % 3 != b % 3:
        options += ["to the left of", "left of"] if a % 3 < b % 3 else ["to the right of", "right of"]
    if a // 3 != b // 3:
        options += ["above", "over"] if a // 3 < b // 3 else ["below", "under"]
    return rng.choice(options)


def _join(parts: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def single_captions(rng: random.Random, o: dict[str, str]) -> list:
    """Caption makers for a one-object scene: full, colour+shape, shape only, colour only, one more attribute."""
    sh, co, si, po = o["shape"], o["colour"], o["size"], o["position"]
    full = lambda: rng.choice(["a {}", "there is a {}", "a picture of a {}"]).format(
        f"{_name(rng, si)} {_name(rng, co)} {_name(rng, sh)} {_place(rng, po)}")
    pair = lambda: rng.choice(["a {} {}", "a picture of a {} {}", "there is a {} {}"]).format(co, sh)
    shape = lambda: rng.choice(["a {}", "a picture of a {}", "there is a {}", "a photo of a {}"]).format(_name(rng, sh))
    colour = lambda: rng.choice(["something {}", "a shape coloured {}", "the colour is {}", "a {} object",
                                 "a {} shape"]).format(_name(rng, co))
    other = lambda: rng.choice([
        f"a {_name(rng, si)} object", f"a {_name(rng, si)} {_name(rng, sh)}", f"an object at the {po}",
        f"a {_name(rng, sh)} {_place(rng, po)}", "a single object", "the number of objects is one",
    ])
    return [full, pair, shape, colour, other]


def multi_captions(rng: random.Random, objs: list[dict[str, str]]) -> list:
    """Caption makers for a 2–3 object scene: relation, list, bare relation, one object, count."""
    def desc(o, size=False, place=False):
        words = ([_name(rng, o["size"])] if size else []) + [_name(rng, o["colour"]), _name(rng, o["shape"])]
        return "a " + " ".join(words) + (f" {_place(rng, o['position'])}" if place else "")

    def pair():
        a, b = rng.sample(objs, 2)
        return a, b, _relation(rng, a["cell"], b["cell"])

    def relation():
        a, b, rel = pair()
        return f"{desc(a, size=rng.random() < 0.5)} {rel} {desc(b, size=rng.random() < 0.5)}"

    def bare_relation():
        a, b, rel = pair()
        return f"a {_name(rng, a['shape'])} {rel} a {_name(rng, b['shape'])}"

    def listing():
        place = rng.random() < 0.4
        parts = _join([desc(o, size=rng.random() < 0.3, place=place) for o in rng.sample(objs, len(objs))])
        return rng.choice(["{}", "there is {}", "a picture of {}"]).format(parts)

    def one():
        o = rng.choice(objs)
        return rng.choice([f"a {o['colour']} {o['shape']}", f"a {_name(rng, o['shape'])}", f"something {o['colour']}",
                           f"a shape coloured {o['colour']}", f"a {_name(rng, o['shape'])} {_place(rng, o['position'])}"])

    def count():
        n = COUNTS[len(objs) - 1]
        return rng.choice([f"{n} objects", f"{n} shapes", f"the number of objects is {n}",
                           f"{n} shapes: " + _join([f"a {o['shape']}" for o in objs])])
    return [relation, listing, bare_relation, one, count]
