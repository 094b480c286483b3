"""Cluttered shapes scenes (``data.name=shapes_clutter``): a task where patch and word granularity should matter.

Each scene holds 3–6 small objects (``data.clutter_objects``) on the shapes background, placed in distinct cells of a
4 × 4 grid, so they never overlap by more than a pixel or so. Every object is a (colour, shape) pair of the shapes
data (6 colours × 8 shapes = 48 classes) and the pairs of a scene are distinct. With probability
``data.clutter_share`` an object is a *distractor* of an earlier one: it shares that object's colour or its shape,
never both (a green circle beside a green star); otherwise it brings a colour and a shape new to the scene. The
second kind makes the hard negatives of retrieval: a scene with a green circle and a red star has "green" and "star"
but no green star, so a query that names one object is not answered by colour alone or shape alone, nor by knowing
which colours and which shapes a scene has without which go together (at share 0.5 that unbound "bag of
attributes" scores t2i mAP 0.36 on the test split, colour alone 0.16, shape alone 0.21, chance 0.09, perfect
binding 1.0; share 1 raises the bag to 0.66, share 0 lowers it to 0.21: ``python experiments/clutter_examples.py
--baselines``).

Each caption names ONE object of its scene ("a green star", "there is a green star", "a green star and other
shapes", ...), one caption per object, so the training pairs are object-level and a caption is right for every
scene that contains its object (multi-positive). ``eval.containment`` scores exactly that: text → image retrieval
mAP over the queries "a {colour} {shape}" and the multi-label zero-shot mAP of "contains ⟨colour shape⟩".

The determinism contract is the shapes one: scenes are drawn in blocks of ``BLOCK`` from ``(seed, split, block)``,
so item ``i`` is the same whatever ``size``; images are rendered by ``shapes._render_block`` and kept (and cached on
disk, keyed by ``VERSION``) as uint8.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from polyalign.data.base import ImageTextDataset, SkipReport, cached_array, stable_hash
from polyalign.data.shapes import BLOCK, COLOURS, SHAPES, SPLITS, _render_block, object_tags
from polyalign.errors import DataError

VERSION = "clutter-v1"  # bump whenever rendering or scene sampling changes: it keys the on-disk cache
GRID = 4  # objects sit in distinct cells of a GRID × GRID grid (at most 16 objects)
MAX_OBJECTS = 8  # room to spare in the grid, and enough distinct (colour, shape) pairs for the sharing rule
# Sprite side / image side, 3 variants, all "small". A grid cell is 1/4 of the side and a centre moves at most
# JITTER from its cell's centre, so sprites of <= 0.20 leave >= 0.01 between cells: no heavy overlap, ever. At the
# default 64 px that makes 10–13 px sprites, the smallest at which the 8 shapes stay clearly distinguishable (a
# star's points, a ring's hole); at 48 px (8–10 px) stars, hearts and crosses lose their detail
# (``python experiments/clutter_examples.py --image-size 48``).
FRACTIONS = (0.16, 0.18, 0.20)
JITTER = 0.02
DEFAULT_IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 32
COUNT_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
TEMPLATES = ["a {}", "a small {}", "there is a {}", "a picture with a {}", "a {} and other shapes",
             "a {} among other shapes"]  # the caption grammar: one object, named by colour and shape


def with_article(text: str) -> str:
    """'a orange star' → 'an orange star' (the shapes captions' rule)."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _pick(rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
    """(n,) a uniformly drawn allowed column per row of the bool mask ``allowed`` (n, K) (each row has one)."""
    return np.where(allowed, rng.random(allowed.shape), -1.0).argmax(1)


def _objects(rng: np.random.Generator, n: int, slots: int, share: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, slots) colour and shape indices, the pairs of a scene distinct. Object 0 at random; object k, with
    probability ``share``, is a distractor of an earlier object: it takes that object's colour or (even odds) its
    shape, the other attribute drawn among those that keep the pairs distinct; otherwise it takes a colour and a
    shape that no earlier object has (any free pair once the 6 colours are used)."""
    n_col, n_sh = len(COLOURS), len(SHAPES)
    colour, shape = np.zeros((n, slots), np.int64), np.zeros((n, slots), np.int64)
    colour[:, 0], shape[:, 0] = rng.integers(0, n_col, n), rng.integers(0, n_sh, n)
    rows = np.arange(n)
    for k in range(1, slots):
        shares, parent, keep_colour = rng.random(n) < share, rng.integers(0, k, n), rng.random(n) < 0.5
        pc, ps = colour[rows, parent], shape[rows, parent]
        taken = np.zeros((n, n_col, n_sh), bool)  # the pairs already in the scene
        taken[rows[:, None], colour[:, :k], shape[:, :k]] = True
        free_shape, free_colour = ~taken[rows, pc, :], ~taken[rows, :, ps]  # (n, 8): >= 1 free (k <= 7); (n, 6)
        new_shape, new_colour = _pick(rng, free_shape), _pick(rng, free_colour)
        keep_colour |= ~free_colour.any(1)  # all 6 colours of the parent's shape taken (only past 6 objects)
        fresh = ~taken.any(2)[:, :, None] & ~taken.any(1)[:, None, :]  # (n, 6, 8): colour and shape both unused
        fresh = np.where(fresh.any((1, 2))[:, None, None], fresh, ~taken).reshape(n, -1)
        pair = _pick(rng, fresh)
        colour[:, k] = np.where(shares, np.where(keep_colour, pc, new_colour), pair // n_sh)
        shape[:, k] = np.where(shares, np.where(keep_colour, new_shape, ps), pair % n_sh)
    return colour, shape


def _sample_block(rng: np.random.Generator, n: int, lo: int, hi: int, share: float) -> dict[str, np.ndarray]:
    """Scene parameters of n scenes of lo..hi objects (independent of the image size); slots >= count are padding."""
    count = rng.integers(lo, hi + 1, n)
    colour, shape = _objects(rng, n, hi, share)
    cell = np.argsort(rng.random((n, GRID * GRID)), 1)[:, :hi]  # distinct cells
    centres = (np.arange(GRID) + 0.5) / GRID
    mid = centres[np.stack([cell // GRID, cell % GRID], -1)] + rng.uniform(-JITTER, JITTER, (n, hi, 2))
    return {
        "count": count, "shape": shape, "colour": colour, "size": np.zeros((n, hi), np.int64),
        "variant": rng.integers(0, len(FRACTIONS), (n, hi)), "cell": cell, "mid": mid,
        # tinted colours stay <= 255: shapes-v1 lets orange (245) + tint wrap around in uint8 (red → 0)
        "tint": np.minimum(rng.integers(-12, 13, (n, hi, 3)), 255 - np.array(list(COLOURS.values()))[colour]),
        "bg_level": rng.uniform(70, 220, n), "bg_tone": rng.integers(0, 3, n),
        "bg_slope": rng.uniform(-35, 35, (n, 2)), "noise": rng.integers(0, 16, n), "noise_amp": rng.uniform(0, 7, n),
    }


def sprite_sides(image_size: int) -> np.ndarray:
    """(1, variants) sprite side in pixels (one size, "small")."""
    return np.array([[max(4, round(f * image_size)) for f in FRACTIONS]])


class ShapesClutterDataset(ImageTextDataset):
    """Procedural scenes of 3–6 small coloured shapes among distractors, one caption per object (module docstring)."""

    prompt_templates: dict[str, list[str]] = {}  # no single-label field to prompt for (the count is a probe target)
    containment_templates = ["a {}", "there is a {}", "a picture with a {}"]  # eval.containment's zero-shot prompts

    def __init__(self, split: str, size: int, image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0,
                 cache_dir: str | Path | None = None, objects: tuple[int, int] = (3, 6), share: float = 0.5):
        if split not in SPLITS:
            raise DataError(f"unknown shapes_clutter split {split!r}; valid splits: {', '.join(SPLITS)}")
        if size < 1 or image_size < MIN_IMAGE_SIZE:
            raise DataError(f"shapes_clutter needs size >= 1 and image_size >= {MIN_IMAGE_SIZE}, got {size} and "
                            f"{image_size}")
        lo, hi = (int(x) for x in objects)
        if not 1 <= lo <= hi <= MAX_OBJECTS:
            raise DataError(f"shapes_clutter objects per scene must satisfy 1 <= min <= max <= {MAX_OBJECTS}, got "
                            f"{list(objects)}")
        if not 0 <= share <= 1:
            raise DataError(f"shapes_clutter share must be a probability in [0, 1], got {share}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.object_range, self.share = (lo, hi), float(share)
        self.captions_per_item = hi  # at most: one caption per object
        self.label_names = {"count": COUNT_WORDS[lo - 1:hi]}
        self.skip_report = SkipReport(total=size)
        blocks = [_sample_block(np.random.default_rng([seed & 0xFFFFFFFF, stable_hash(f"clutter:{split}"), b]),
                                BLOCK, lo, hi, self.share) for b in range(-(-size // BLOCK))]
        self.scenes = {k: np.concatenate([blk[k] for blk in blocks])[:size] for k in blocks[0]}
        self.images = self._load_or_render(cache_dir)

    def _load_or_render(self, cache_dir: str | Path | None) -> np.ndarray:
        """Rendered images, from the cache file when there is one."""
        lo, hi = self.object_range
        name = (f"{VERSION}-{self.split}-n{self.size}-px{self.image_size}-obj{lo}to{hi}-share{self.share:g}-"
                f"seed{self.seed}.npy")
        return cached_array(Path(cache_dir) / name if cache_dir else None, self._render)

    def _render(self) -> np.ndarray:
        """Render all scenes, a block at a time to bound the float working memory."""
        out = np.empty((self.size, self.image_size, self.image_size, 3), np.uint8)
        sides = sprite_sides(self.image_size)
        for start in range(0, self.size, BLOCK):
            block = {k: v[start:start + BLOCK] for k, v in self.scenes.items()}
            block["centre"] = block.pop("mid")  # (not "centre" in self.scenes: gradcam reads that as shapes' sizes)
            _render_block(block, self.seed, out[start:start + BLOCK], sides)
        return out

    def __len__(self) -> int:
        return self.size

    def image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1)

    def objects(self, i: int) -> list[dict]:
        """The scene's objects: colour, shape, size ("small") and grid cell (row-major in the 4 × 4 grid)."""
        sc, colours = self.scenes, list(COLOURS)
        return [{"shape": SHAPES[sc["shape"][i, k]], "colour": colours[sc["colour"][i, k]], "size": "small",
                 "cell": int(sc["cell"][i, k])} for k in range(sc["count"][i])]

    def boxes(self, i: int) -> list[tuple[float, float, float, float]]:
        """Each object's sprite box (top, left, bottom, right) in pixels, in ``objects`` order."""
        sc, h = self.scenes, self.image_size
        sides = sprite_sides(h)[0]
        out = []
        for k in range(sc["count"][i]):
            s = sides[sc["variant"][i, k]]
            top, left = np.clip(np.round(sc["mid"][i, k] * h - s / 2), 0, h - s)
            out.append((float(top), float(left), float(top + s), float(left + s)))
        return out

    def labels(self, i: int) -> dict[str, int]:
        return {"count": int(self.scenes["count"][i]) - self.object_range[0]}

    def tags(self, i: int) -> list[str]:
        return object_tags(self.objects(i))

    def captions(self, i: int) -> list[str]:
        """One caption per object, each naming that object by colour and shape, in a shuffled order."""
        rng = random.Random(f"{VERSION}:{self.seed}:{self.split}:{i}")
        objs = self.objects(i)
        rng.shuffle(objs)
        return [with_article(rng.choice(TEMPLATES).format(f"{o['colour']} {o['shape']}")) for o in objs]
