"""Pictures of evaluation results, saved as PNG (matplotlib's Agg canvas, no pyplot state)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_retrieval_examples(path, queries: list[str], images: list[list[torch.Tensor]], correct: list[list[bool]]) -> None:
    """One row per query: its text, then its retrieved images (uint8 (3, H, W)) framed green if correct, red if not."""
    n_cols = 1 + max((len(row) for row in images), default=0)
    fig = Figure(figsize=(2 * n_cols, 2 * len(queries)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(queries), n_cols, squeeze=False)
    for ax_row, query, row_images, row_correct in zip(axes, queries, images, correct):
        ax_row[0].text(0.5, 0.5, textwrap.fill(query, 24), ha="center", va="center", fontsize=9, wrap=True)
        ax_row[0].axis("off")
        for ax in ax_row[1:]:
            ax.axis("off")
        for rank, (ax, image, ok) in enumerate(zip(ax_row[1:], row_images, row_correct), start=1):
            ax.axis("on")
            ax.imshow(image.permute(1, 2, 0).cpu().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"#{rank}", fontsize=8)
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if ok else "tab:red")
                spine.set_linewidth(4)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
