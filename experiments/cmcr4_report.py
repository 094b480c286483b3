"""The independent-spaces C-MCR table and memory-size plot (docs/cmcr.md §0) from experiments/cmcr4.sh's runs.

    python experiments/cmcr4_report.py runs/cmcr4/connect [--plot docs/img/cmcr4-memory.png]

Per row: mean ± std over the seeds of the spaces (each seed = X tuned seed s, Y trained seed s, projectors seed s);
then each row's paired difference to the soft pivot and to the shared-only connection (no memories), seed by seed,
with a 95% t-interval over the seeds (the pivots and chance come from each seed's full run: they use no projector).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from scipy import stats

ROWS = ["full", "no_memories", "nearest_pairs", "random_pairs", "no_noise", "noise_dim", "no_intra", "anchor_x"]
NAMES = {"full": "C-MCR (full, memories 5.5k)", "no_memories": "shared modality only (no memories)",
         "nearest_pairs": "− consistency (nearest memory row)", "random_pairs": "random memory pseudo pairs",
         "no_noise": "− noise", "noise_dim": "noise σ²·512/d", "no_intra": "− intra alignment",
         "anchor_x": "anchor_x (X fixed)", "memory_500": "C-MCR, memories 500", "memory_1000": "C-MCR, memories 1k",
         "memory_3000": "C-MCR, memories 3k", "paired_100": "real pairs: 100 (picture, clip)",
         "paired_1000": "real pairs: 1k", "paired_5462": "real pairs: 5.5k"}
PAIRED = ["paired_100", "paired_1000", "paired_5462"]
KEYS = ["c2a_R@1", "c2a_R@10", "c2a_MdR", "a2c_R@1", "a2c_R@10", "a2c_MdR"]
SIZES = {"memory_500": 500, "memory_1000": 1000, "memory_3000": 3000}


def load(root: Path) -> dict[str, dict[int, dict]]:
    """{row: {seed: metrics}}, pivots and chance as rows of their own (from the full runs)."""
    out: dict[str, dict[int, dict]] = {}
    for d in sorted(root.glob("*/seed-*/metrics.json")):
        row, seed = d.parent.parent.name, int(d.parent.name.split("-")[1])
        m = json.loads(d.read_text())
        out.setdefault(row, {})[seed] = {k: m.get(f"connected/{k}") for k in KEYS}
        if row == "full":
            for base in ("pivot", "soft_pivot", "chance"):
                out.setdefault(base, {})[seed] = {k: m.get(f"{base}/{k}") for k in KEYS}
    return out


def mean_std(values: list[float], digits: int) -> str:
    if not values or any(v is None for v in values):
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def paired(a: dict[int, dict], b: dict[int, dict], key: str, digits: int) -> str:
    """mean of (a − b) over the seeds both have, [95% t-interval]."""
    seeds = sorted(set(a) & set(b))
    d = [a[s][key] - b[s][key] for s in seeds if a[s].get(key) is not None and b[s].get(key) is not None]
    if len(d) < 2:
        return f"{d[0]:+.{digits}f}" if d else "–"
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
    mark = " *" if abs(statistics.mean(d)) > half else ""
    return f"{statistics.mean(d):+.{digits}f} [{statistics.mean(d) - half:+.{digits}f}, {statistics.mean(d) + half:+.{digits}f}]{mark}"


def table(runs: dict) -> str:
    rows = ["chance", "pivot", "soft_pivot"] + [r for r in ROWS + list(SIZES) + PAIRED if r in runs]
    names = {"chance": "chance", "pivot": "hard pivot (nearest text)", "soft_pivot": "soft pivot (τ on val)", **NAMES}
    lines = ["| row | seeds | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for r in rows:
        cells = [mean_std([m[k] for m in runs[r].values()], 1 if k.endswith("MdR") else 3) for k in KEYS]
        lines.append(f"| {names[r]} | {len(runs[r])} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences over the seeds (row − baseline), mean [95% t-interval]; * = the interval "
              "excludes 0. MdR: lower is better.", "",
              "| row | vs | c2a_R@1 | c2a_R@10 | c2a_MdR | a2c_R@10 | a2c_MdR |", "|---|---|---|---|---|---|---|"]
    for r in [r for r in ROWS + list(SIZES) + PAIRED if r in runs and r != "no_memories"] + ["no_memories"]:
        for base in ("soft_pivot", "no_memories"):
            if base == r or r not in runs:
                continue
            cells = [paired(runs[r], runs[base], k, 1 if k.endswith("MdR") else 3)
                     for k in ("c2a_R@1", "c2a_R@10", "c2a_MdR", "a2c_R@10", "a2c_MdR")]
            lines.append(f"| {names[r]} | {names[base]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict, path: Path, full_size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [(SIZES[r], r) for r in SIZES if r in runs] + [(full_size, "full")]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "c2a_R@10", "audio → image R@10 (higher is better)"),
                           (axes[1], "c2a_MdR", "audio → image median rank (lower is better)")):
        xs = [s for s, _ in sizes]
        ys = [[runs[r][s][key] for s in runs[r]] for _, r in sizes]
        ax.errorbar(xs, [statistics.mean(y) for y in ys], yerr=[statistics.stdev(y) if len(y) > 1 else 0 for y in ys],
                    marker="o", label="C-MCR (memories of this size)", capsize=3)
        for base, style in (("no_memories", "--"), ("soft_pivot", ":"), ("pivot", "-.")):
            if base in runs:
                v = statistics.mean(m[key] for m in runs[base].values())
                ax.axhline(v, linestyle=style, color={"no_memories": "C1", "soft_pivot": "C2", "pivot": "C3"}[base],
                           label={"no_memories": "shared only (no memories)", "soft_pivot": "soft pivot",
                                  "pivot": "hard pivot"}[base])
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x / 1000:g}k" if x >= 1000 else str(x) for x in xs])
        ax.minorticks_off()
        ax.margins(y=0.15)
        ax.set_xlabel("memory items per space")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"C-MCR on independent emoji spaces, 356 unseen concepts, mean ± std over {len(runs['full'])} seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--plot", default="")
    ap.add_argument("--full-size", type=int, default=5462, help="memory items of the full runs (the smaller memory)")
    args = ap.parse_args()
    runs = load(Path(args.root))
    print(table(runs))
    if args.plot:
        plot(runs, Path(args.plot), args.full_size)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
