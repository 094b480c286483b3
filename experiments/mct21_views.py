"""Issue 21, item 4: is the image–image task still solvable by matching colours? For a recipe's training views
(the loader's own samples), the top-1 accuracy of finding each view's positive among the other 2N − 1 views of N
items by a colour histogram alone (4 × 4 × 4 RGB bins, L1 distance); the §2 shapes reversal came from this
shortcut (both views shared the scene's exact colours). Also writes a PNG of the first 8 view pairs.

    python experiments/mct21_views.py CONFIG [k=v ...] [--n 256] [--png views.png]
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch


def colour_shortcut_top1(v1: np.ndarray, v2: np.ndarray, bins: int = 4) -> float:
    """v1, v2: (N, 3, H, W) uint8 views; accuracy of the nearest colour histogram (L1) being the positive."""
    x = np.concatenate([v1, v2])  # (2N, 3, H, W)
    q = (x.astype(np.int64) * bins // 256)  # (2N, 3, H, W) in [0, bins)
    code = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]  # (2N, H, W)
    hist = np.stack([np.bincount(c.ravel(), minlength=bins ** 3) for c in code]).astype(np.float64)
    hist /= hist.sum(1, keepdims=True)
    d = np.abs(hist[:, None, :] - hist[None, :, :]).sum(-1)  # (2N, 2N)
    np.fill_diagonal(d, np.inf)
    n = len(v1)
    positive = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    return float((d.argmin(1) == positive).mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", default=[])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--png", default="")
    a = p.parse_args()
    from polyalign.app.runs import prepare_views
    from polyalign.config import load_config
    from polyalign.data.build import build_datasets

    cfg = load_config(a.config, [*a.overrides, "loss.weights.image_image=1"])
    ds = build_datasets(cfg.data, cfg.train.seed, show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        prepare_views(cfg, ds, Path(tmp))
    train = ds["train"]
    idx = np.random.default_rng(0).choice(len(train), a.n, replace=False)
    samples = [train[(0, int(i))] for i in idx]
    first = "image_view1" if "image_view1" in samples[0] else "image"
    v1 = torch.stack([s[first] for s in samples]).numpy()
    v2 = torch.stack([s["image_view2"] for s in samples]).numpy()
    raw = torch.stack([train.image(int(i)) for i in idx]).numpy()
    print(f"{a.config} {' '.join(a.overrides)}: views {first}/image_view2, colour-histogram top-1 of the positive "
          f"among {2 * a.n - 1}: {colour_shortcut_top1(v1, v2):.3f} (two identical copies: "
          f"{colour_shortcut_top1(raw, raw):.3f}); mean |view1 - view2| per pixel {np.abs(v1.astype(int) - v2).mean():.1f}")
    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(2, 8, figsize=(12, 3.2))
        for k in range(8):
            for r, v in enumerate((v1, v2)):
                ax[r, k].imshow(v[k].transpose(1, 2, 0))
                ax[r, k].axis("off")
        fig.tight_layout()
        fig.savefig(a.png, dpi=80)


if __name__ == "__main__":
    main()
