"""Per-word Grad-CAM heat maps over an image (ALBEF's visualisation, arXiv 2107.07651; the maps that drive the soft
masks of arXiv 2304.00719), saved as PNG (matplotlib's Agg canvas, no pyplot state)."""
from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from polyalign.eval.pointing import upsample_map


def plot_word_gradcam(path, image: torch.Tensor, words: list[str], maps: torch.Tensor) -> None:
    """The image (uint8 or [0, 1] float, (3, H, W)), then one panel per word with its map (N,) of ``maps`` (len(words),
    N) overlaid (e.g. ``heads.gradcam.itm_gradcam(...)[0, positions]`` and the tokenizer's pieces at those positions)."""
    pixels = image.float() / 255 if image.dtype == torch.uint8 else image.float()
    pixels = pixels.permute(1, 2, 0).cpu().numpy()
    fig = Figure(figsize=(2 * (1 + len(words)), 2.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(words), squeeze=False)[0]
    axes[0].imshow(pixels)
    axes[0].set_title("image", fontsize=9)
    for ax, word, cam in zip(axes[1:], words, maps):
        ax.imshow(pixels)
        ax.imshow(upsample_map(cam.detach().cpu(), pixels.shape[:2]).numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(word, fontsize=9)
    for ax in axes:
        ax.axis("off")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
