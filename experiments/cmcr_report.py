"""Tables (and the memory-size plot) of C-MCR connect runs, with paired 95% intervals over seeds and queries.

    python experiments/cmcr_report.py ROOT retrieval [--vs soft_pivot,no_memories] [--plot PNG] [--full-size N]
    python experiments/cmcr_report.py ROOT classify  [--vs soft_pivot,pivot] [--pairs ROW:BASELINE,...]

ROOT/<row>/seed-<s>/ holds one connect run (metrics.json, ranks.npz); seed s = the seed of both spaces and of the
projectors in the independent-spaces designs. The hard pivot, the soft pivot and chance come from each seed's
``full`` run (they use no projector). Table 1: mean ± sample std over the seeds. Table 2: each row minus each
baseline of ``--vs``, paired by seed and query: the observed difference of the seed-averaged figures and a 95%
percentile interval from a bootstrap that resamples the seeds and, within each drawn seed, the queries (the same
draw for both sides; ``polyalign.eval.bootstrap.paired_difference``); ``*`` = the interval excludes 0; ``**`` = the
t-interval over the seeds alone (the per-seed differences) excludes 0 too: drawing 3 seeds with replacement
understates their spread, so only ``**`` is read as a finding. Rows of
``memory_<N>`` (memories cut to N items) and ``paired_<N>`` (projectors on N real pairs) are ordered by N.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from polyalign.eval.bootstrap import paired_difference  # noqa: E402

ORDER = ["full", "no_memories", "nearest_pairs", "random_pairs", "no_noise", "noise_dim", "no_intra", "anchor_x",
         "paired"]
NAMES = {"chance": "chance", "pivot": "hard pivot (nearest shared item)", "soft_pivot": "soft pivot (τ on val)",
         "full": "C-MCR (full)", "no_memories": "shared modality only (no memories)",
         "nearest_pairs": "− consistency (nearest memory row)", "random_pairs": "random memory pseudo pairs",
         "no_noise": "− noise (σ² = 0)", "noise_dim": "noise σ² · 512/d", "no_intra": "− intra alignment (λ = 0)",
         "anchor_x": "anchor_x (X fixed, Y mapped into it)", "paired": "paired upper bound (real pairs)"}
KEYS = {"retrieval": ["c2a_R@1", "c2a_R@10", "c2a_MdR", "a2c_R@1", "a2c_R@10", "a2c_MdR"],
        "classify": ["classify_acc"]}
DIFF_KEYS = {"retrieval": ["c2a_R@1", "c2a_R@10", "c2a_MdR", "a2c_R@10", "a2c_MdR"], "classify": ["classify_acc"]}


def row_name(row: str) -> str:
    if m := re.fullmatch(r"memory_(\d+)", row):
        return f"C-MCR, memories {size_label(int(m[1]))}"
    if m := re.fullmatch(r"paired_(\d+)", row):
        return f"real pairs: {size_label(int(m[1]))}"
    return NAMES.get(row, row)


def size_label(n: int) -> str:
    return f"{n / 1000:.3g}k" if n >= 1000 else str(n)


def ordered(rows) -> list[str]:
    def key(r: str):
        m = re.fullmatch(r"(memory|paired)_(\d+)", r)
        if m:
            return (1 if m[1] == "memory" else 2, int(m[2]), r)
        return (0, ORDER.index(r) if r in ORDER else len(ORDER), r)

    return sorted(rows, key=key)


def load(root: Path) -> dict[str, dict[int, dict]]:
    """{row: {seed: {"metrics": {key: value}, "ranks": {key: array} | None}}}; pivots and chance from the full runs."""
    out: dict[str, dict[int, dict]] = {}
    for path in sorted(root.glob("*/seed-*/metrics.json")):
        row, seed = path.parent.parent.name, int(path.parent.name.split("-")[1])
        metrics = json.loads(path.read_text())
        ranks_path = path.with_name("ranks.npz")
        ranks = dict(np.load(ranks_path)) if ranks_path.exists() else None
        methods = ["connected"] + (["pivot", "soft_pivot", "chance"] if row == "full" else [])
        for method in methods:
            name = row if method == "connected" else method
            out.setdefault(name, {})[seed] = {
                "metrics": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(method + "/")},
                "ranks": None if ranks is None or method == "chance" else
                {k.split(".", 1)[1]: v for k, v in ranks.items() if k.startswith(method + ".")},
                "tau": metrics.get("soft_pivot/tau"),
                "seconds": metrics.get("train/seconds") if method == "connected" else None}
    return out


def mean_std(values: list, digits: int, exact: bool = False) -> str:
    """Mean ± sample std; one value alone, or the value of a figure that is the same by construction (``exact``)."""
    if not values or any(v is None for v in values):
        return "–"
    if len(values) == 1 or exact:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def statistic(key: str):
    """(per-query values name, figure of a (..., N) array): R@k and accuracy are means, MdR a median (1 = first)."""
    direction, what = key.split("_", 1)
    if key == "classify_acc":
        return "classify_hit", lambda v: v.mean(-1)
    if what == "MdR":  # the lower median, as connect's metrics (torch.median)
        return direction, lambda r: np.partition(r, (r.shape[-1] - 1) // 2, -1)[..., (r.shape[-1] - 1) // 2] + 1
    k = int(what.split("@")[1])
    return direction, lambda r: (r < k).mean(-1)


def difference(first: dict[int, dict], second: dict[int, dict], key: str, digits: int, resamples: int) -> str:
    seeds = sorted(set(first) & set(second))
    name, stat = statistic(key)
    try:
        a = np.stack([first[s]["ranks"][name] for s in seeds]).astype(float)
        b = np.stack([second[s]["ranks"][name] for s in seeds]).astype(float)
    except (TypeError, KeyError):
        return "–"  # a run without ranks.npz (made before per-query ranks were written)
    diff, low, high = paired_difference(a, b, stat, resamples)
    mark = " *" if low > 0 or high < 0 else ""
    per_seed = stat(a) - stat(b)  # the t-interval over the seeds alone: with 3 seeds the bootstrap's seed draws
    if mark and len(seeds) > 1 and per_seed.std(ddof=1) > 0:  # underestimate the seeds' spread, so say when both agree
        half = scipy_stats.t.ppf(0.975, len(seeds) - 1) * per_seed.std(ddof=1) / len(seeds) ** 0.5
        mark += "*" if abs(per_seed.mean()) > half else ""
    elif mark and len(seeds) > 1:
        mark += "*"  # the same difference in every seed
    return f"{diff:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]{mark}"


def tables(runs: dict, kind: str, vs: list[str], resamples: int, pairs: list[tuple[str, str]] = ()) -> str:
    keys = KEYS[kind]
    rows = [r for r in ("chance", "pivot", "soft_pivot") if r in runs] + ordered(
        r for r in runs if r not in ("chance", "pivot", "soft_pivot"))
    lines = ["| row | seeds | " + " | ".join(keys) + " | train s |", "|---|---|" + "---|" * (len(keys) + 1)]
    for r in rows:
        cells = [mean_std([m["metrics"].get(k) for m in runs[r].values()], 1 if k.endswith("MdR") else 3,
                          exact=r == "chance") for k in keys]
        seconds = [m["seconds"] for m in runs[r].values() if m["seconds"] is not None]
        cells.append(f"{statistics.mean(seconds):.0f}" if seconds else "–")
        lines.append(f"| {row_name(r)} | {len(runs[r])} | " + " | ".join(cells) + " |")
    if "soft_pivot" in runs:
        taus = [runs["soft_pivot"][s]["tau"] for s in sorted(runs["soft_pivot"])]
        lines += ["", "Soft pivot τ per seed (chosen on val): " + " / ".join(f"{t:g}" for t in taus)]
    dkeys = DIFF_KEYS[kind]
    lines += ["", f"Paired differences (row − baseline), seed-averaged, [95% bootstrap interval over seeds and "
              f"queries, {resamples} resamples]; * = the interval excludes 0; ** = the 95% t-interval over the seeds "
              "alone excludes 0 too; MdR: lower is better.", "",
              "| row | vs | " + " | ".join(dkeys) + " |", "|---|---|" + "---|" * len(dkeys)]
    pairs = list(pairs) or [(r, base) for base in vs for r in rows if r not in (base, "chance")]
    for r, base in pairs:
        if r not in runs or base not in runs:
            continue
        cells = [difference(runs[r], runs[base], k, 1 if k.endswith("MdR") else 3, resamples) for k in dkeys]
        lines.append(f"| {row_name(r)} | {row_name(base)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict, path: Path, full_size: int, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted([(int(r.split("_")[1]), r) for r in runs if re.fullmatch(r"memory_\d+", r)]
                   + [(full_size, "full")])
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for ax, key, label in ((axes[0], "c2a_R@10", "audio → image R@10 (higher is better)"),
                           (axes[1], "c2a_MdR", "audio → image median rank (lower is better)")):
        xs = [s for s, _ in sizes]
        ys = [[m["metrics"][key] for m in runs[r].values()] for _, r in sizes]
        ax.errorbar(xs, [statistics.mean(y) for y in ys], yerr=[statistics.stdev(y) if len(y) > 1 else 0 for y in ys],
                    marker="o", label="C-MCR (memories of this size)", capsize=3)
        for base, style, colour in (("no_memories", "--", "C1"), ("soft_pivot", ":", "C2"), ("pivot", "-.", "C3")):
            if base in runs:
                values = [m["metrics"][key] for m in runs[base].values()]
                mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0
                ax.axhline(mean, linestyle=style, color=colour, label=row_name(base))
                ax.axhspan(mean - std, mean + std, color=colour, alpha=0.08)
        ax.set_xscale("log")
        ax.set_xticks(xs, [size_label(x) for x in xs])
        ax.minorticks_off()
        ax.margins(y=0.15)
        ax.set_xlabel("memory items per space", fontsize=8)
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"C-MCR against memory size, mean ± std over {len(runs['full'])} seeds of both spaces", fontsize=9)
    if note:
        fig.text(0.5, 0.015, note, ha="center", fontsize=7.5)
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("kind", choices=sorted(KEYS))
    ap.add_argument("--vs", default="soft_pivot,no_memories", help="baseline rows of the differences table")
    ap.add_argument("--pairs", default="", help="ROW:BASELINE,... : only these differences (instead of --vs)")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--plot", type=Path, help="the memory-size plot (retrieval)")
    ap.add_argument("--full-size", type=int, default=5462, help="memory items of the full runs (for the plot)")
    ap.add_argument("--plot-note", default="", help="a note under the plot")
    args = ap.parse_args()
    if not args.root.is_dir():
        sys.exit(f"cmcr_report: {args.root} is not a directory of connect runs")
    runs = load(args.root)
    if not runs:
        sys.exit(f"cmcr_report: no ROW/seed-S/metrics.json under {args.root}")
    pairs = [tuple(p.split(":", 1)) for p in args.pairs.split(",") if p]
    if bad := [p for p in pairs if len(p) != 2 or p[0] not in runs or p[1] not in runs]:
        sys.exit(f"cmcr_report: --pairs {bad}: each ROW:BASELINE must name two rows of {sorted(runs)}")
    print(tables(runs, args.kind, [b for b in args.vs.split(",") if b], args.resamples, pairs))
    if args.plot:
        plot(runs, args.plot, args.full_size, args.plot_note)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
