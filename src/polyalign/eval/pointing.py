"""The pointing game on shapes scenes (ALBEF's Grad-CAM check, arXiv 2107.07651; the maps behind the soft masks of
arXiv 2304.00719): does a caption word's Grad-CAM map peak inside the box of the object the word names?

``scene_boxes`` and ``point_hit`` score ``polyalign inspect gradcam`` (``app.inspect_gradcam``);
``pointing_by_class`` scores one caption per object, "a small red circle at the top left", per word class
(colour, shape, size, position), for ``eval.itm_probes``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from polyalign.data.shapes import SIZES, ShapesDataset
from polyalign.eval.shape_scenes import fits, objects_of, scene_params
from polyalign.models.heads.gradcam import itm_gradcam

WORD_CLASSES = ("colour", "shape", "size", "position")


def scene_boxes(ds, i: int) -> list[dict] | None:
    """Shapes scenes: each object's colour, shape and box (top, left, bottom, right) in pixels; None for other data."""
    scenes = getattr(ds, "scenes", None)
    if scenes is None or "centre" not in scenes:
        return None
    side_px, sides = ds.image_size, np.array(list(SIZES.values()))
    out = []
    for k, obj in enumerate(ds.objects(i)):
        cy, cx = scenes["centre"][i, k]
        half = sides[scenes["size"][i, k], scenes["variant"][i, k]] / 2
        out.append({"colour": obj["colour"], "shape": obj["shape"],
                    "box": [(cy - half) * side_px, (cx - half) * side_px, (cy + half) * side_px, (cx + half) * side_px]})
    return out


def point_hit(cam: torch.Tensor, box, size: int) -> tuple[bool, float]:
    """Is the peak of one token's map ``cam`` (N,), upsampled to (size, size), inside ``box`` (top, left, bottom,
    right) in pixels; and the fraction of the image the box covers (the chance of a uniformly placed peak)."""
    y, x = divmod(int(upsample_map(cam, (size, size)).argmax()), size)
    top, left, bottom, right = box
    area = max(0.0, min(bottom, size) - max(top, 0)) * max(0.0, min(right, size) - max(left, 0)) / size ** 2
    return bool(top <= y + 0.5 <= bottom and left <= x + 0.5 <= right), area


def upsample_map(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One token's map over N = g·g patches (N,) → (H, W), bilinear, min-max normalised to [0, 1] (the pictures'
    maps: ``app.gradcam_plot`` draws these)."""
    grid = math.isqrt(cam.shape[0])
    if grid * grid != cam.shape[0]:
        raise ValueError(f"{cam.shape[0]} image tokens do not form a square grid")
    up = F.interpolate(cam.float().view(1, 1, grid, grid), size=size, mode="bilinear", align_corners=False)[0, 0]
    lo, hi = up.min(), up.max()
    return (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)


def object_caption(o: dict) -> tuple[str, list[str | None]]:
    """"a small red circle at the top left" and the word class of each of its whitespace words (None: no class)."""
    words = [o["size"], o["colour"], o["shape"], "at", "the", *o["position"].split()]
    classes = ["size", "colour", "shape", None, None] + ["position"] * len(o["position"].split())
    return " ".join(["a", *words]), [None, *classes]  # (sizes start with a consonant)


def pointing_by_class(model, ds: ShapesDataset, tokenizer, items: list[int], device, batch_size: int = 64
                      ) -> dict[str, float]:
    """``itm_probe/pointing_<class>`` (peak of the word's Grad-CAM map inside its object's box), ``…_chance``
    (mean box fraction) and ``…_n`` for colour, shape, size and position words (module docstring)."""
    jobs = []  # (item, object, caption, word classes)
    for i in items:
        objs = objects_of(scene_params(ds, i))
        for o in objs:
            caption, classes = object_caption(o)
            if fits(tokenizer, caption):
                jobs.append((i, o, caption, classes, objs))
    trials: dict[str, list[tuple[bool, float]]] = {c: [] for c in WORD_CLASSES}
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s:s + batch_size]
        images = torch.stack([ds.image(i) for i, *_ in chunk]).float().div(255).to(device)
        ids, mask = tokenizer([c for _, _, c, _, _ in chunk])
        maps = itm_gradcam(model, images, ids.to(device), mask.to(device)).float().cpu()  # (B, L, N)
        for b, (i, o, caption, classes, objs) in enumerate(chunk):
            word_of = tokenizer.tok.encode(caption).word_ids  # token position → whitespace word (None: special)
            box = scene_boxes(ds, i)[o["slot"]]["box"]
            for cls in WORD_CLASSES:
                if cls in ("colour", "size") and sum(x[cls] == o[cls] for x in objs) != 1:
                    continue  # another object shares the word: no single right box
                positions = [t for t, w in enumerate(word_of) if w is not None and classes[w] == cls]
                if positions:
                    trials[cls].append(point_hit(maps[b, positions].sum(0), box, ds.image_size))
    out = {}
    for cls, rows in trials.items():
        if rows:
            out[f"itm_probe/pointing_{cls}"] = float(np.mean([h for h, _ in rows]))
            out[f"itm_probe/pointing_{cls}_chance"] = float(np.mean([a for _, a in rows]))
            out[f"itm_probe/pointing_{cls}_n"] = float(len(rows))
    return out
