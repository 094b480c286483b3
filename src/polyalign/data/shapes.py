"""Procedural "shapes" scenes: 1–3 coloured shapes on a plain background, with captions from a small grammar.

The toolkit's built-in data set (nothing to download). Scenes are drawn in blocks of ``BLOCK`` from
``(seed, split, block)``, so item ``i`` is the same whatever ``size`` and ``image_size``; images are rendered once,
vectorised with numpy (anti-aliased sprites pasted with fancy indexing), and kept in memory as uint8.
"""
from __future__ import annotations

import functools
import random
import re
from pathlib import Path

import numpy as np
import torch

from polyalign.data.base import ImageTextDataset, SkipReport, cached_array, stable_hash
from polyalign.data.shapes_captions import COUNTS, multi_captions, single_captions
from polyalign.errors import DataError

VERSION = "shapes-v1"  # bump whenever rendering or scene sampling changes: it keys the on-disk cache
BLOCK = 1024
SPLITS = ("train", "val", "test")
SHAPES = ["circle", "square", "triangle", "star", "diamond", "cross", "heart", "ring"]
COLOURS = {
    "red": (215, 35, 35), "green": (35, 160, 55), "blue": (35, 75, 215),
    "yellow": (240, 205, 30), "purple": (135, 50, 175), "orange": (245, 130, 20),
}
SIZES = {"small": (0.22, 0.24, 0.26), "large": (0.34, 0.37, 0.40)}  # sprite side / image side, 3 variants each
POSITIONS = ["top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"]
CELL_CENTRES = (0.18, 0.5, 0.82)  # of the image side, for grid rows and columns

def _polygon(u: np.ndarray, v: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Even–odd point-in-polygon test of the points (u, v) against the vertices ``pts`` (K, 2)."""
    inside = np.zeros(u.shape, bool)
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
        crosses = (y0 > v) != (y1 > v)
        x_at = x0 + (v - y0) * (x1 - x0) / np.where(y1 == y0, 1, y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _regular(k: int, radius: float, start: float) -> np.ndarray:
    """The vertices of a regular k-gon (image coordinates, v pointing down)."""
    a = start + 2 * np.pi * np.arange(k) / k
    return radius * np.stack([np.cos(a), np.sin(a)], 1)


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of the shape in normalised coordinates u, v ∈ [-1, 1] (v pointing down)."""
    if shape == "circle":
        return u**2 + v**2 <= 0.92**2
    if shape == "square":
        return (abs(u) <= 0.8) & (abs(v) <= 0.8)
    if shape == "diamond":
        return abs(u) + abs(v) <= 0.98
    if shape == "cross":
        return ((abs(u) <= 0.3) & (abs(v) <= 0.95)) | ((abs(v) <= 0.3) & (abs(u) <= 0.95))
    if shape == "triangle":
        return _polygon(u, v, np.array([[0, -0.95], [0.98, 0.8], [-0.98, 0.8]]))
    if shape == "ring":
        return (u**2 + v**2 <= 0.95**2) & (u**2 + v**2 >= 0.5**2)
    if shape == "star":
        outer, inner = _regular(5, 1.0, -np.pi / 2), _regular(5, 0.42, -np.pi / 2 + np.pi / 5)
        return _polygon(u, v + 0.08, np.stack([outer, inner], 1).reshape(10, 2))
    lobes = ((abs(u) - 0.45) ** 2 + (v + 0.35) ** 2 <= 0.5**2)  # heart: two disks over a triangle
    return lobes | _polygon(u, v, np.array([[-0.92, -0.12], [0.92, -0.12], [0, 0.95]]))


@functools.lru_cache(maxsize=None)
def _sprite(shape: str, side: int, supersample: int = 8) -> np.ndarray:
    """Anti-aliased coverage (side, side) float32 of one shape, by supersampling."""
    n = side * supersample
    u, v = np.meshgrid((np.arange(n) + 0.5) / n * 2 - 1, (np.arange(n) + 0.5) / n * 2 - 1)
    cover = _inside(shape, u, v).astype(np.float32)
    return cover.reshape(side, supersample, side, supersample).mean((1, 3))


def _sprite_sides(image_size: int) -> np.ndarray:
    """Sprite side in pixels per (size, variant)."""
    return np.array([[max(4, round(f * image_size)) for f in fr] for fr in SIZES.values()])


def _layout(rng: np.random.Generator, side: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct grid cells (n, 3) and object centres (n, 3, 2) as fractions of the image side; present objects
    (of sides ``side``, also fractions) hardly overlap and stay inside the image."""
    n = len(count)
    cell, centre = np.empty((n, 3), int), np.empty((n, 3, 2))
    present = np.arange(3) < count[:, None]
    redo = np.arange(n)
    while len(redo):  # redraw the scenes whose objects overlap too much
        cell[redo] = np.argsort(rng.random((len(redo), 9)), 1)[:, :3]
        jitter = rng.uniform(-0.05, 0.05, (len(redo), 3, 2))
        s = side[redo][..., None]
        mid = np.clip(np.array(CELL_CENTRES)[np.stack([cell[redo] // 3, cell[redo] % 3], -1)] + jitter, s / 2, 1 - s / 2)
        centre[redo] = mid
        gap = abs(mid[:, :, None] - mid[:, None, :]).max(-1)  # (m, 3, 3) Chebyshev distance of centres
        both = present[redo][:, :, None] & present[redo][:, None, :] & ~np.eye(3, dtype=bool)
        redo = redo[((gap < 0.95 * (s[:, :, None, 0] + s[:, None, :, 0]) / 2) & both).any((1, 2))]
    return cell, centre


def _sample_block(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Scene parameters of n scenes (independent of the image size); objects beyond a scene's count are padding."""
    count = rng.integers(1, 4, n)
    shape = np.argsort(rng.random((n, len(SHAPES))), 1)[:, :3]  # distinct shapes within a scene
    colour = rng.integers(0, len(COLOURS), (n, 3))
    size = rng.integers(0, 2, (n, 3))
    variant = rng.integers(0, 3, (n, 3))
    cell, centre = _layout(rng, np.array(list(SIZES.values()))[size, variant], count)
    return {
        "count": count, "shape": shape, "colour": colour, "size": size, "variant": variant, "cell": cell,
        "centre": centre, "tint": rng.integers(-12, 13, (n, 3, 3)),
        "bg_level": rng.uniform(70, 220, n), "bg_tone": rng.integers(0, 3, n),
        "bg_slope": rng.uniform(-35, 35, (n, 2)), "noise": rng.integers(0, 16, n), "noise_amp": rng.uniform(0, 7, n),
    }


def _render_block(p: dict[str, np.ndarray], seed: int, img: np.ndarray, sides: np.ndarray | None = None) -> None:
    """Render scenes from their parameters into ``img``, a uint8 array (n, H, W, 3). ``sides`` (sizes, variants):
    sprite side in pixels (default: ``_sprite_sides``); a scene has ``p["shape"].shape[1]`` object slots."""
    h = img.shape[1]
    ramp = np.linspace(-0.5, 0.5, h, dtype=np.float32)
    slope = p["bg_slope"].astype(np.float32)
    bank = np.random.default_rng([seed & 0xFFFFFFFF, h, 7]).standard_normal((16, h, h), np.float32)
    lum = (p["bg_level"].astype(np.float32)[:, None, None] + slope[:, 0, None, None] * ramp[:, None]
           + slope[:, 1, None, None] * ramp[None, :] + p["noise_amp"].astype(np.float32)[:, None, None] * bank[p["noise"]])
    np.clip(lum, 12.5, 242.5, out=lum)  # room for the tone below; +0.5 makes astype round
    tone = np.array([[0, 0, 0], [10, 5, -12], [-6, 0, 8]], np.float32)[p["bg_tone"]]  # gray, beige, cool gray
    for c in range(3):  # channel by channel: numpy is slow at broadcasting over a last axis of 3
        img[..., c] = lum + tone[:, c, None, None]
    colours = np.array(list(COLOURS.values()), np.float32)
    sides = _sprite_sides(h) if sides is None else sides
    present = np.arange(p["shape"].shape[1]) < p["count"][:, None]
    flat = img.reshape(-1)
    for k, shape in enumerate(SHAPES):
        for z in range(sides.shape[0]):
            for var in range(sides.shape[1]):
                scene, slot = np.nonzero(present & (p["shape"] == k) & (p["size"] == z) & (p["variant"] == var))
                if not len(scene):
                    continue
                s = sides[z, var]
                alpha = _sprite(shape, s).reshape(-1)
                # a scene's n-th object of this sprite goes in pass n, so no pass writes one pixel twice (shapes
                # scenes have distinct shapes: one pass; shapes_clutter may repeat a shape in a scene)
                nth = np.arange(len(scene)) - np.searchsorted(scene, scene)
                for r in range(int(nth.max()) + 1):
                    one = nth == r
                    _paste(flat, h, s, alpha, scene[one], p["centre"][scene[one], slot[one]],
                           colours[p["colour"][scene[one], slot[one]]] + p["tint"][scene[one], slot[one]])


def _paste(flat: np.ndarray, h: int, s: int, alpha: np.ndarray, scene: np.ndarray, centre: np.ndarray,
           colour: np.ndarray) -> None:
    """Composite one sprite (coverage ``alpha`` (s*s,)) per scene (distinct) at ``centre`` (m, 2) with ``colour``
    (m, 3) into ``flat``, the images (n, h, h, 3) flattened."""
    y, x = np.clip(np.round(centre * h - s / 2), 0, h - s).astype(int).T
    pixel = ((scene * h + y) * h + x)[:, None] + (np.arange(s)[:, None] * h + np.arange(s)).reshape(-1)
    idx = 3 * pixel + np.arange(3)[:, None, None]  # (3, objects, s*s): long inner loops are fast
    out = flat[idx] * (1 - alpha)
    out += alpha * colour.astype(np.float32).T[:, :, None] + 0.5
    flat[idx] = out


def object_tags(objects: list[dict[str, str]]) -> list[str]:
    """A scene's tags: each object's colour, shape and "colour shape", first occurrence kept, in order."""
    return list(dict.fromkeys(t for o in objects for t in (o["colour"], o["shape"], f"{o['colour']} {o['shape']}")))


class ShapesDataset(ImageTextDataset):
    """Procedural scenes of 1–3 coloured shapes with grammar captions (train/val/test splits)."""

    captions_per_item = 5
    prompt_templates = {
        "shape": ["a {}", "a picture of a {}", "there is a {}"],
        "colour": ["something {}", "a shape coloured {}", "the colour is {}"],  # no article: "a orange"
        "size": ["a {} object", "a {} shape"],
        "position": ["an object at the {}", "a shape at the {}"],
        "count": ["the number of objects is {}"],
    }
    label_names = {"shape": SHAPES, "colour": list(COLOURS), "size": list(SIZES), "position": POSITIONS,
                   "count": COUNTS}

    def __init__(self, split: str, size: int, image_size: int = 48, seed: int = 0,
                 cache_dir: str | Path | None = None):
        if split not in SPLITS:
            raise DataError(f"unknown shapes split {split!r}; valid splits: {', '.join(SPLITS)}")
        if size < 1 or image_size < 16:
            raise DataError(f"shapes needs size >= 1 and image_size >= 16, got {size} and {image_size}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.skip_report = SkipReport(total=size)
        blocks = [_sample_block(np.random.default_rng([seed & 0xFFFFFFFF, stable_hash(split), b]), BLOCK)
                  for b in range(-(-size // BLOCK))]
        self.scenes = {k: np.concatenate([blk[k] for blk in blocks])[:size] for k in blocks[0]}
        self.images = self._load_or_render(cache_dir)

    def _load_or_render(self, cache_dir: str | Path | None) -> np.ndarray:
        """Rendered images, from the cache file when there is one."""
        name = f"{VERSION}-{self.split}-n{self.size}-px{self.image_size}-seed{self.seed}.npy"
        return cached_array(Path(cache_dir) / name if cache_dir else None, self._render)

    def _render(self) -> np.ndarray:
        """Render all scenes, a block at a time to bound the float working memory."""
        out = np.empty((self.size, self.image_size, self.image_size, 3), np.uint8)
        for start in range(0, self.size, BLOCK):
            block = {k: v[start:start + BLOCK] for k, v in self.scenes.items()}
            _render_block(block, self.seed, out[start:start + BLOCK])
        return out

    def __len__(self) -> int:
        return self.size

    def image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1)

    def objects(self, i: int) -> list[dict[str, str]]:
        """The scene's objects as names: shape, colour, size, position, and grid cell."""
        sc = self.scenes
        return [{"shape": SHAPES[sc["shape"][i, k]], "colour": self.label_names["colour"][sc["colour"][i, k]],
                 "size": self.label_names["size"][sc["size"][i, k]], "position": POSITIONS[sc["cell"][i, k]],
                 "cell": int(sc["cell"][i, k])} for k in range(sc["count"][i])]

    def labels(self, i: int) -> dict[str, int]:
        sc, count = self.scenes, int(self.scenes["count"][i])
        if count > 1:
            return {"count": count - 1}
        return {"shape": int(sc["shape"][i, 0]), "colour": int(sc["colour"][i, 0]), "size": int(sc["size"][i, 0]),
                "position": int(sc["cell"][i, 0]), "count": 0}

    def tags(self, i: int) -> list[str]:
        return object_tags(self.objects(i))

    def captions(self, i: int) -> list[str]:
        rng = random.Random(f"{VERSION}:{self.seed}:{self.split}:{i}")
        objs = self.objects(i)
        makers = single_captions(rng, objs[0]) if len(objs) == 1 else multi_captions(rng, objs)
        caps: list[str] = []
        while len(caps) < self.captions_per_item:  # each maker yields a different kind of caption
            cap = re.sub(r"\ba (?=[aeiou])", "an ", makers[len(caps) % len(makers)]())
            if cap not in caps:
                caps.append(cap)
        return caps
