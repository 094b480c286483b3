"""ALBEF's RandAugment (salesforce/ALBEF ``dataset/randaugment.py``: N ops drawn per image with replacement, each
applied with probability 0.5 at a magnitude of 10), in torch on float (3, H, W) images in [0, 1], driven by a numpy
``Generator`` like the rest of ``data/augment.py``. The ops are ALBEF's list without hue changes: Identity,
AutoContrast, Equalize, Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY, Rotate. Magnitudes follow
ALBEF's level → argument maps: enhance factor level/10 · 1.8 + 0.1; shear level/10 · 0.3; translate level/10 · 10 px
of a 256-px image (scaled to the image size); rotate level/10 · 30°; geometric ops fill with gray 128 as ALBEF does.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

FILL = 128 / 255
OPS = ("identity", "autocontrast", "equalize", "brightness", "sharpness", "shear_x", "shear_y", "translate_x",
       "translate_y", "rotate")


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    flat = (hi - lo) < 1e-6  # a flat channel stays as it is
    return torch.where(flat, x, (x - lo) / (hi - lo).clamp_min(1e-6))


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalisation on the 256 levels (as PIL's ImageOps.equalize)."""
    levels = (x * 255).round().long().clamp(0, 255)
    out = []
    for c in levels:
        hist = torch.bincount(c.flatten(), minlength=256)
        nonzero = hist[hist > 0]
        step = (hist.sum() - nonzero[-1]) // 255 if len(nonzero) else 0
        if step == 0:
            out.append(c.float() / 255)
            continue
        lut = ((torch.cumsum(hist, 0) - hist + step // 2) // step).clamp(0, 255)
        out.append(lut[c].float() / 255)
    return torch.stack(out)


def _sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with PIL's SMOOTH-filtered image (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13; the border kept)."""
    k = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    smooth = F.conv2d(x[:, None], k[None, None], padding=1)[:, 0]
    smooth[:, [0, -1], :], smooth[:, :, [0, -1]] = x[:, [0, -1], :], x[:, :, [0, -1]]
    return (smooth + factor * (x - smooth)).clamp(0, 1)


def _affine(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Output pixel p samples input pixel ``matrix @ p`` (normalised coordinates); outside the image: gray 128."""
    grid = F.affine_grid(matrix[None], [1, *x.shape], align_corners=False)
    ones = torch.ones(1, 1, *x.shape[1:])
    warped = F.grid_sample(torch.cat([x[None], ones], 1), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)[0]
    inside = warped[3:]
    return warped[:3] + (1 - inside) * FILL


def _op(x: torch.Tensor, name: str, level: int, rng: np.random.Generator) -> torch.Tensor:
    factor = level / 10 * 1.8 + 0.1
    sign = 1.0 if rng.random() < 0.5 else -1.0  # geometric ops: either direction, as ALBEF
    if name == "identity":
        return x
    if name == "autocontrast":
        return _autocontrast(x)
    if name == "equalize":
        return _equalize(x)
    if name == "brightness":
        return (x * factor).clamp(0, 1)
    if name == "sharpness":
        return _sharpness(x, factor)
    h, w = x.shape[1:]
    if name in ("shear_x", "shear_y"):
        s = sign * level / 10 * 0.3
        m = [[1.0, s * h / w, 0.0], [0.0, 1.0, 0.0]] if name == "shear_x" else [[1.0, 0.0, 0.0], [s * w / h, 1.0, 0.0]]
        return _affine(x, torch.tensor(m))
    if name in ("translate_x", "translate_y"):
        t = sign * level / 10 * 10 / 256 * 2  # 10 px of 256 at level 10, in normalised units (the side spans 2)
        m = [[1.0, 0.0, t], [0.0, 1.0, 0.0]] if name == "translate_x" else [[1.0, 0.0, 0.0], [0.0, 1.0, t]]
        return _affine(x, torch.tensor(m))
    if name == "rotate":
        a = math.radians(sign * level / 10 * 30)
        c, s = math.cos(a), math.sin(a)
        return _affine(x, torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]]))
    raise ValueError(f"unknown RandAugment op {name!r}")


def randaugment(x: torch.Tensor, rng: np.random.Generator, n: int, level: int) -> torch.Tensor:
    """``n`` ops drawn with replacement, each applied with probability 0.5 (ALBEF's RandomAugment)."""
    for k in rng.integers(0, len(OPS), n):
        if rng.random() < 0.5:
            x = _op(x, OPS[int(k)], level, rng)
    return x
