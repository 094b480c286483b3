"""Shapes scenes edited and re-rendered from their parameters, for the ITM probes (``eval.itm_probes``) and the
per-class pointing game (``eval.pointing``).

A scene is the data set's parameter arrays of one item with a leading axis of 1 (``scene_params``); the edits
return changed copies (an object's colour or shape, two colours swapped, an object erased) and ``render`` draws
them with the data set's own renderer (``shapes._render_block``), so an unchanged scene renders to the data set's
image exactly. Salience, the "most salient object", is an object's painted pixels (``painted_area``).
"""
from __future__ import annotations

import re

import numpy as np
import torch

from polyalign.data.shapes import (COLOURS, POSITIONS, SHAPES, SIZES, ShapesDataset, _render_block, _sprite,
                                   _sprite_sides)
from polyalign.data.shapes_captions import _join

SLOT_KEYS = ("shape", "colour", "size", "variant", "cell", "centre", "tint")  # per-object scene parameters
COLOUR_NAMES, SIZE_NAMES, RGB = list(COLOURS), list(SIZES), np.array(list(COLOURS.values()))


def probe_scenes(ds: ShapesDataset, items: list[int]) -> list[int]:
    """The items with two or more objects, none drawn in a colour that wraps around (see ``wraps``)."""
    return [i for i in items if ds.scenes["count"][i] >= 2 and not any(
        wraps(ds.scenes["colour"][i, k], ds.scenes["tint"][i, k]) for k in range(ds.scenes["count"][i]))]


def wraps(colour: int, tint: np.ndarray) -> bool:
    """Whether ``_render_block`` draws this colour with this tint wrongly: a channel at 256 or more wraps around in
    the uint8 image (orange's red 245 with a tint of 11 or 12 is drawn as red 0: the object looks dark green)."""
    return bool((RGB[colour] + tint >= 256).any())


def scene_params(ds: ShapesDataset, i: int) -> dict[str, np.ndarray]:
    return {k: v[i:i + 1].copy() for k, v in ds.scenes.items()}


def changed(p: dict, slot: int, **values) -> dict:
    """A copy of the scene with object ``slot``'s parameters (``colour=``, ``shape=`` indices) replaced."""
    q = {k: v.copy() for k, v in p.items()}
    for key, value in values.items():
        q[key][0, slot] = value
    return q


def swapped_colours(p: dict, a: int, b: int) -> dict:
    """A copy of the scene with objects ``a`` and ``b`` in each other's colour (tints stay with the objects)."""
    return changed(changed(p, a, colour=p["colour"][0, b]), b, colour=p["colour"][0, a])


def erased(p: dict, slot: int) -> dict:
    """The scene without object ``slot``: the others move up (order kept), the count drops by one."""
    order = [k for k in range(p["shape"].shape[1]) if k != slot] + [slot]
    q = {k: (v[:, order].copy() if k in SLOT_KEYS else v.copy()) for k, v in p.items()}
    q["count"] = q["count"] - 1
    return q


def render(ds: ShapesDataset, scenes: list[dict]) -> torch.Tensor:
    """uint8 images (n, 3, H, W) of scene parameter sets, drawn by the data set's own renderer."""
    img = np.empty((len(scenes), ds.image_size, ds.image_size, 3), np.uint8)
    for s in range(0, len(scenes), 1024):  # bounded float working memory, as ShapesDataset._render
        part = scenes[s:s + 1024]
        _render_block({k: np.concatenate([p[k] for p in part]) for k in part[0]}, ds.seed, img[s:s + len(part)])
    return torch.from_numpy(img).permute(0, 3, 1, 2)


def objects_of(p: dict) -> list[dict]:
    """The present objects of a scene as names, with their slot."""
    return [{"slot": k, "colour": COLOUR_NAMES[p["colour"][0, k]], "shape": SHAPES[p["shape"][0, k]],
             "size": SIZE_NAMES[p["size"][0, k]], "position": POSITIONS[p["cell"][0, k]]}
            for k in range(int(p["count"][0]))]


def painted_area(p: dict, slot: int, image_size: int) -> float:
    """Pixels the object paints: its sprite's anti-aliased coverage, summed (the salience of the module docstring)."""
    side = _sprite_sides(image_size)[p["size"][0, slot], p["variant"][0, slot]]
    return float(_sprite(SHAPES[p["shape"][0, slot]], int(side)).sum())


def salient_slots(p: dict, named: list[int], image_size: int) -> tuple[int, int]:
    """(most, least) salient object of a scene whose caption names the slots ``named`` in that order: the largest
    coverage, ties to the first named; the smallest, ties to the last named (two or more objects: never the same)."""
    area = {k: painted_area(p, k, image_size) for k in named}
    return max(named, key=area.__getitem__), min(reversed(named), key=area.__getitem__)


def listing(objs: list[dict]) -> str:
    """"a red circle and an orange square": colour and shape of each object, in the given order."""
    return re.sub(r"\ba (?=[aeiou])", "an ", _join([f"a {o['colour']} {o['shape']}" for o in objs]))


def with_values(objs: list[dict], slot: int, **values) -> list[dict]:
    return [o | values if o["slot"] == slot else o for o in objs]


def fits(tokenizer, caption: str) -> bool:
    """The caption is not truncated by the tokenizer's context length."""
    return not tokenizer.tok.encode(caption).overflowing
