"""Training curves from ``log.jsonl`` as a PNG."""
from __future__ import annotations

import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(log_path: Path, out_path: Path) -> None:
    """Loss terms (left) and learning rate (right) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    if not rows:
        return
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    keys = sorted({k for r in rows for k in r if k.endswith("loss")})
    terms = [k for k in keys if k not in ("loss", "val_loss")]
    for key in [k for k in keys if len(terms) > 1 or k not in terms]:  # one term: it is the total
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
    ax_lr.plot(*zip(*[(r["step"], r["lr"]) for r in rows if "lr" in r]))
    ax_lr.set_xlabel("step"), ax_lr.set_ylabel("learning rate"), ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
