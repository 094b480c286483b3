"""View augmentation for intra-modal objectives, on uint8 image tensors.

The SimCLR / MoCo-v2 recipe — random resized crop, horizontal flip, colour jitter, grayscale, Gaussian blur —
from "A Simple Framework for Contrastive Learning of Visual Representations" (Chen et al., arXiv 2002.05709) and
"Improved Baselines with Momentum Contrastive Learning" (Chen et al., arXiv 2003.04297), written in torch and
driven by a numpy ``Generator`` so that a view is a deterministic function of (image, generator state) and
torch's global RNG is never touched.

Colour ops (grayscale, jitter) are off by default: our captions name colours, and a view whose colour changed
would no longer match its caption. Hue is shifted through RGB ↔ HSV (computed in torch, as torchvision does).
"""
from __future__ import annotations

import contextlib

import math

import numpy as np
import torch
import torch.nn.functional as F

from polyalign.config.schema import AugmentConfig
from polyalign.data.randaugment import randaugment

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def _crop_box(h: int, w: int, rng: np.random.Generator, scale, ratio) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop, as torchvision's ``RandomResizedCrop`` samples it."""
    area, log_ratio = h * w, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    if w / h < ratio[0]:  # fall back to the largest centred crop within the ratio range
        cw, ch = w, round(w / ratio[0])
    elif w / h > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) → (1, H, W) BT.601 luma."""
    return (LUMA[0] * x[0] + LUMA[1] * x[1] + LUMA[2] * x[2]).unsqueeze(0)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(0)
    maxc, minc = x.max(0).values, x.min(0).values
    flat, chroma = maxc == minc, maxc - minc
    ones = torch.ones_like(maxc)
    s = chroma / torch.where(flat, ones, maxc)
    c = torch.where(flat, ones, chroma)
    rc, gc, bc = (maxc - r) / c, (maxc - g) / c, (maxc - b) / c
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    return (h / 6.0 + 1.0) % 1.0, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    i = torch.floor(h * 6.0)
    f, i = h * 6.0 - i, i.long() % 6
    p, q, t = (v * (1 - s)).clamp(0, 1), (v * (1 - s * f)).clamp(0, 1), (v * (1 - s * (1 - f))).clamp(0, 1)
    sector = (i.unsqueeze(0) == torch.arange(6).view(6, 1, 1)).to(v.dtype)  # (6, H, W) one-hot
    table = torch.stack([torch.stack(c) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))])
    return (table * sector).sum(1)  # (3, 6, H, W) → (3, H, W)


def _jitter(x: torch.Tensor, rng: np.random.Generator, s: float) -> torch.Tensor:
    """Brightness, contrast, saturation (factors in [1 - 0.8 s, 1 + 0.8 s]) and hue (±0.2 s) in random order."""
    factors = [rng.uniform(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s) for _ in range(3)] + [rng.uniform(-0.2 * s, 0.2 * s)]
    for op in rng.permutation(4):
        f = factors[op]
        if op == 0:
            x = (x * f).clamp(0, 1)
        elif op == 1:
            x = (f * x + (1 - f) * _gray(x).mean()).clamp(0, 1)
        elif op == 2:
            x = (f * x + (1 - f) * _gray(x)).clamp(0, 1)
        else:
            h, sat, v = _rgb_to_hsv(x)
            x = _hsv_to_rgb((h + f) % 1.0, sat, v)
    return x


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (3, H, W), kernel ≈ size / 10 (odd, ≥ 3), reflect padding."""
    k = max(3, round(min(x.shape[-2:]) / 10) | 1)
    d = torch.arange(k, dtype=x.dtype) - k // 2
    g = torch.exp(-(d**2) / (2 * sigma**2))
    g = (g / g.sum()).expand(3, 1, 1, k)
    x = F.conv2d(F.pad(x[None], (k // 2, k // 2, 0, 0), mode="reflect"), g, groups=3)
    x = F.conv2d(F.pad(x, (0, 0, k // 2, k // 2), mode="reflect"), g.transpose(-1, -2), groups=3)
    return x[0]


def _cutout(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Fill one random rectangle (2–15 % of the area, aspect 1/2–2) with the image's mean colour."""
    _, h, w = x.shape
    area, aspect = h * w * rng.uniform(0.02, 0.15), math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    ch, cw = min(h, max(1, round(math.sqrt(area / aspect)))), min(w, max(1, round(math.sqrt(area * aspect))))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    x = x.clone()
    x[:, top:top + ch, left:left + cw] = x.mean(dim=(1, 2), keepdim=True)
    return x


@contextlib.contextmanager
def one_thread():
    """Run per-sample tensor ops on one torch thread: on tiny images, intra-op threads cost more than they save
    (measured: ~0.4 ms/image on one thread, up to 80 ms on two threads of a busy 2-core machine)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def augment_image(image: torch.Tensor, rng: np.random.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """One random view of a uint8 (3, H, W) image, same size and dtype; ``image`` itself when disabled."""
    if not cfg.enabled:
        return image
    with one_thread():  # the same result on any number of threads, much faster on one
        return _augment(image, rng, cfg)


def _augment(image: torch.Tensor, rng: np.random.Generator, cfg: AugmentConfig) -> torch.Tensor:
    _, h, w = image.shape
    top, left, ch, cw = _crop_box(h, w, rng, cfg.crop_scale, cfg.crop_ratio)
    x = image[:, top:top + ch, left:left + cw].float() / 255.0  # (3, ch, cw) in [0, 1]
    if (ch, cw) != (h, w):
        x = F.interpolate(x[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
    if rng.random() < cfg.flip:
        x = x.flip(-1)
    if cfg.randaugment:  # drawn only when on: older recipes keep their random streams
        x = randaugment(x, rng, cfg.randaugment, cfg.randaugment_magnitude)
    if cfg.color_jitter > 0 and rng.random() < cfg.color_jitter_p:
        x = _jitter(x, rng, cfg.color_jitter)
    if rng.random() < cfg.grayscale:
        x = _gray(x).expand(3, -1, -1)
    if rng.random() < cfg.blur:
        x = _blur(x, rng.uniform(0.1, 1.0) * min(h, w) / 48)
    if cfg.noise > 0 and rng.random() < cfg.noise:  # drawn only when on: older recipes keep their random streams
        x = (x + torch.from_numpy(rng.normal(0.0, rng.uniform(0.02, 0.08), x.shape).astype(np.float32))).clamp(0, 1)
    if cfg.cutout > 0 and rng.random() < cfg.cutout:
        x = _cutout(x, rng)
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)

