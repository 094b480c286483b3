"""Issue 22: the tables and the active-fraction plot of experiments/fdt22.sh's runs (markdown on stdout).

    python experiments/fdt22_report.py [OUT] [--plot docs/img/fdt22-active.png]

Per task: each row's metrics (mean ± std over the seeds); the paired differences (by seed; 95% t-interval over the
seeds, `*` where it excludes 0) that separate the codebook from the pooling — FDT − CLIP max-pooled (the codebook),
CLIP max − CLIP mean (the pooling), FDT − CLIP mean, FDT + CLIP − CLIP mean, C = 16,384 at T = 1,000 − calibrated —;
then the operating point of every FDT row: the fraction of the codebook active per image and per caption at the
first logged step, its range over training, and T_fdt.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from polyalign.app.sweep import paired_diff
from report_lib import fmt_diff, fmt_stat, log_rows, seeds_of, table, values

ROWS = [("clip-mean", "CLIP, mean pooling"), ("clip-max", "CLIP, max pooling (no codebook)"),
        ("fdt", "FDT (T calibrated, 10 % active)"), ("fdt-clip", "FDT + CLIP"),
        ("fdt-c16k", "FDT, C = 16,384, T = 1,000")]
DIFFS = [("fdt", "clip-max", "FDT − CLIP max (the codebook)"), ("clip-max", "clip-mean", "CLIP max − CLIP mean (pooling)"),
         ("fdt", "clip-mean", "FDT − CLIP mean"), ("fdt-clip", "clip-mean", "FDT + CLIP − CLIP mean"),
         ("fdt-c16k", "fdt", "C 16,384 / T 1,000 − calibrated")]
TASKS = {
    "clutter": {"title": "granularity task: shapes_clutter (20,000 training scenes, 2,000 test; a hit = any scene "
                         "that contains the named object)",
                "metrics": ["containment/t2i_mAP", "containment/zeroshot_mAP", "containment/t2i_R@1",
                            "retrieval_any/t2i_R@1", "probe/count_acc"]},
    "emoji": {"title": "four-style emoji, held-out style (train google, fluent, emojione; test twitter)",
              "metrics": ["retrieval/t2i_R@1", "retrieval/i2t_R@1", "retrieval_any/t2i_R@10",
                          "zeroshot/subcategory_acc", "probe/subcategory_acc"]},
}
SHORT = {"containment/t2i_mAP": "contains: t2i mAP", "containment/zeroshot_mAP": "contains: zero-shot mAP",
         "containment/t2i_R@1": "contains: t2i R@1", "retrieval_any/t2i_R@1": "t2i R@1 (any)",
         "retrieval_any/t2i_R@10": "t2i R@10 (any)", "probe/count_acc": "probe count",
         "retrieval/t2i_R@1": "t2i R@1", "retrieval/i2t_R@1": "i2t R@1", "zeroshot/subcategory_acc": "zero-shot subcat.",
         "probe/subcategory_acc": "probe subcat."}


def active(run: Path) -> dict | None:
    """The FDT operating point of a run from its log: active fractions (first logged step, min, max) and T_fdt."""
    rows = [r for r in log_rows(run) if "fdt_image_active_frac" in r]
    if not rows:
        return None
    img, txt = [r["fdt_image_active_frac"] for r in rows], [r["fdt_text_active_frac"] for r in rows]
    return {"image": (img[0], min(img), max(img)), "text": (txt[0], min(txt), max(txt)), "t": rows[0].get("fdt_t"),
            "steps": [r["step"] for r in rows], "image_curve": img, "text_curve": txt}


def report(out: Path, task: str) -> str:
    spec, root = TASKS[task], out / task
    runs = {row: seeds_of(root / row) for row, _ in ROWS}
    if not any(runs.values()):
        return f"## {task}: no finished runs under {root}\n"
    lines = [f"## {spec['title']}\n", "Mean ± std over the seeds.\n"]
    head = ["row", "seeds"] + [SHORT[m] for m in spec["metrics"]] + ["train min (mean)"]
    body = []
    for row, label in ROWS:
        if not runs[row]:
            continue
        walls = [float(p.with_suffix(".wall").read_text()) for p in runs[row].values() if p.with_suffix(".wall").is_file()]
        body.append([label, str(len(runs[row]))] + [fmt_stat(values(runs[row], m)) for m in spec["metrics"]]
                    + [f"{statistics.fmean(walls) / 60:.1f}" if walls else "–"])
    lines.append(table(head, body))
    lines.append("\nPaired differences (by seed), mean [95% t-interval over the seeds], * excludes 0.\n")
    body = []
    for a, b, label in DIFFS:
        if runs[a] and runs[b]:
            body.append([label] + [fmt_diff(paired_diff(values(runs[b], m), values(runs[a], m)))
                                   for m in spec["metrics"]])
    lines.append(table(["difference"] + [SHORT[m] for m in spec["metrics"]], body))
    lines.append("\nOperating point of the FDT rows: fraction of the codebook active (first logged step; min–max over "
                 "training), mean over the seeds; T_fdt at step 0.\n")
    body = []
    for row, label in ROWS:
        points = [a for p in runs[row].values() if (a := active(p))]
        if not points:
            continue
        mean = lambda key, i: statistics.fmean(a[key][i] for a in points)
        inside = all(0.01 <= a[k][1] and a[k][2] <= 0.20 for a in points for k in ("image", "text"))
        body.append([label, f"{mean('image', 0):.1%} ({mean('image', 1):.1%}–{mean('image', 2):.1%})",
                     f"{mean('text', 0):.1%} ({mean('text', 1):.1%}–{mean('text', 2):.1%})",
                     f"{statistics.fmean(a['t'] for a in points):.3g}", "yes" if inside else "no"])
    lines.append(table(["row", "active per image", "active per caption", "T_fdt", "within 1–20 % throughout"], body))
    return "\n".join(lines)


def plot(out: Path, path: Path) -> None:
    """Active fraction against step for every FDT row and seed, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 3.8), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        ax.axhspan(0.01, 0.20, color="tab:green", alpha=0.08)
        for k, (row, label) in enumerate(ROWS):
            for i, run in enumerate(seeds_of(out / task / row).values()):
                if a := active(run):
                    kw = {"color": f"C{k}", "alpha": 0.8}
                    ax.plot(a["steps"], a["image_curve"], label=f"{label}: images" if i == 0 else None, **kw)
                    ax.plot(a["steps"], a["text_curve"], linestyle="--",
                            label=f"{label}: captions" if i == 0 else None, **kw)
        ax.set_yscale("log"), ax.set_title(task), ax.set_xlabel("step"), ax.set_ylabel("fraction of codebook active")
        ax.grid(alpha=0.3), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="runs/fdt22", type=Path)
    ap.add_argument("--plot", type=Path, help="write the active-fraction plot here")
    a = ap.parse_args()
    print("\n".join(report(a.out, task) for task in TASKS))
    if a.plot:
        plot(a.out, a.plot)


if __name__ == "__main__":
    main()
