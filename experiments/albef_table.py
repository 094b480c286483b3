"""The soft-mask ablation tables of docs/results.md §4: one Markdown row per ablation row, means over seeds.

    python experiments/albef_table.py runs/albef            # shapes rows: runs/albef/{base,softmask,focal,aug,all3}
    python experiments/albef_table.py runs/albef emoji-     # emoji rows:  runs/albef/emoji-{base,...}

Reads ROOT/<PREFIX><row>/seed-<s>/metrics.json (and inspect-gradcam/report.json for the pointing game, when
`polyalign inspect gradcam` was run). Cells: t2i / i2t R@1 / 5 / 10 as means, rsum and zero-shot as mean ± sample
std over the seeds found.
"""
import json
import statistics
import sys
from pathlib import Path

ROWS = {"base": "ALBEF baseline", "softmask": "+ soft mask", "focal": "+ focal ITC (γ = 2)",
        "aug": "+ augmentation", "all3": "all three"}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def recalls(metrics: list[dict], prefix: str) -> str:
    return " / ".join(f"{statistics.mean(m[f'{prefix}_R@{k}'] for m in metrics):.3f}" for k in (1, 5, 10))


def pointing(seed_dir: Path) -> float | None:
    report = seed_dir / "inspect-gradcam" / "report.json"
    return json.loads(report.read_text()).get("pointing", {}).get("accuracy") if report.exists() else None


def main(root: Path, prefix: str = "") -> None:
    zeroshot: list[str] = []
    for row, name in ROWS.items():
        seeds = sorted(d for d in (root / f"{prefix}{row}").glob("seed-*") if (d / "metrics.json").exists())
        if not seeds:
            continue
        metrics = [json.loads((d / "metrics.json").read_text()) for d in seeds]
        zeroshot = [k for k in metrics[0] if k.startswith("zeroshot/")]
        cells = [name, str(len(seeds)), recalls(metrics, "retrieval/t2i"), recalls(metrics, "retrieval/i2t"),
                 mean_std([m["retrieval/rsum"] for m in metrics]), recalls(metrics, "retrieval_itm/t2i"),
                 recalls(metrics, "retrieval_itm/i2t"), mean_std([m["retrieval_itm/rsum"] for m in metrics])]
        cells += [mean_std([m[k] for m in metrics]) for k in zeroshot]
        games = [p for p in map(pointing, seeds) if p is not None]
        if games:
            cells.append(mean_std(games) + (f" ({len(games)} seeds)" if len(games) != len(seeds) else ""))
        print("| " + " | ".join(cells) + " |")
    print("columns: row | seeds | t2i ITC | i2t ITC | rsum ITC | t2i ITM | i2t ITM | rsum ITM | "
          + " | ".join(zeroshot) + " | pointing game (when inspected)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
