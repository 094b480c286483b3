"""Training curves from ``log.jsonl`` as a PNG."""
from __future__ import annotations

import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(log_path: Path, out_path: Path) -> None:
    """Loss terms (left) and learning rate (right) against step; with an FDT head, a third panel: the fraction of
    codebook entries active per image and per caption (log scale, the 1–20 % band shaded) and T_fdt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    if not rows:
        return
    fdt = any("fdt_image_active_frac" in r for r in rows)
    fig, axes = plt.subplots(1, 3 if fdt else 2, figsize=(15 if fdt else 10, 3.5))
    ax, ax_lr = axes[:2]
    keys = sorted({k for r in rows for k in r if k.endswith("loss")})
    terms = [k for k in keys if k not in ("loss", "val_loss")]
    for key in [k for k in keys if len(terms) > 1 or k not in terms]:  # one term: it is the total
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
    ax_lr.plot(*zip(*[(r["step"], r["lr"]) for r in rows if "lr" in r]))
    ax_lr.set_xlabel("step"), ax_lr.set_ylabel("learning rate"), ax_lr.grid(alpha=0.3)
    if fdt:
        _plot_fdt(axes[2], rows)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def _plot_fdt(ax, rows: list[dict]) -> None:
    """Active fraction of the codebook (image, caption) against step, and T_fdt on a second axis."""
    ax.axhspan(0.01, 0.20, color="tab:green", alpha=0.08, label="1–20 % of C")
    for key, name in (("fdt_image_active_frac", "images"), ("fdt_text_active_frac", "captions")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=f"active, {name}")
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_ylabel("fraction of codebook active"), ax.grid(alpha=0.3)
    pts = [(r["step"], r["fdt_t"]) for r in rows if "fdt_t" in r]
    if pts:
        twin = ax.twinx()
        twin.plot(*zip(*pts), color="gray", linestyle="--", label="T_fdt")
        twin.set_ylabel("T_fdt"), twin.set_yscale("log")
        twin.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
