"""Markdown tables of C-MCR connect runs: mean ± sample std over seeds of ROOT/<row>/seed-<s>/metrics.json.

    python experiments/cmcr_table.py ROOT retrieval   # audio → image (C → A) R@1/5/10 and median rank, plus A → C
    python experiments/cmcr_table.py ROOT classify    # zero-shot classification accuracy

Rows: chance, pivot and soft pivot (read from the full runs: they do not depend on the projectors), then every row
directory. Directories of runs made before the renames (no_consistency = random pseudo pairs, exmcr = anchor_x) are
labelled as such.
"""
import json
import statistics
import sys
from pathlib import Path

ORDER = ["full", "nearest_pairs", "random_pairs", "no_noise", "noise_dim", "no_intra", "no_memories", "anchor_x",
         "paired"]
NAMES = {"full": "C-MCR (full)", "nearest_pairs": "− semantic consistency (nearest memory row as pseudo pair)",
         "random_pairs": "random memory pseudo pairs (harmful ablation)", "no_noise": "− noise (σ² = 0)",
         "noise_dim": "noise σ² · 512 / d per space", "no_intra": "− intra alignment (λ = 0)",
         "no_memories": "− memories (B pairs only, native InfoNCE)",
         "anchor_x": "anchor_x (X fixed, Y mapped into X; Ex-MCR-inspired)", "paired": "paired upper bound (real pairs)",
         "no_consistency": "random memory pseudo pairs (old run dir)", "exmcr": "anchor_x (old run dir, was exmcr)"}
METRICS = {"retrieval": ["c2a_R@1", "c2a_R@5", "c2a_R@10", "c2a_MdR", "a2c_R@1", "a2c_R@5", "a2c_R@10", "a2c_MdR"],
           "classify": ["classify_acc"]}


def fmt(values: list[float], digits: int = 3) -> str:
    """Mean ± sample std; one value, or the same value for every seed (chance, pivot), alone; – when missing."""
    if not values or any(v is None for v in values):
        return "–"
    if len(values) == 1 or max(values) == min(values):
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def cell(runs: list[dict], key: str) -> str:
    """Median ranks (…_MdR, 1 = first) with one decimal, recalls with three."""
    return fmt([m.get(key) for m in runs], 1 if key.endswith("MdR") else 3)


def main(root: Path, kind: str) -> None:
    keys = METRICS[kind]
    runs = {d.name: [json.loads(s.joinpath("metrics.json").read_text()) for s in sorted(d.glob("seed-*"))
                     if s.joinpath("metrics.json").exists()] for d in root.iterdir() if d.is_dir()}
    rows = [r for r in ORDER if runs.get(r)] + sorted(r for r in runs if r not in ORDER and runs[r])
    print("| row | seeds | " + " | ".join(keys) + " | train s |")
    print("|---|---|" + "---|" * len(keys) + "---|")
    full = runs.get("full") or []
    soft = f"soft pivot (τ {full[0].get('soft_pivot/tau')}, {full[0].get('soft_pivot/tau_from')})" if full else ""
    for prefix, name in (("chance", "chance"), ("pivot", "pivot (nearest shared item)"), ("soft_pivot", soft)):
        if full and any(f"{prefix}/{k}" in full[0] for k in keys):
            print(f"| {name} | {len(full)} | " + " | ".join(cell(full, f"{prefix}/{k}") for k in keys) + " | – |")
    for r in rows:
        ms = runs[r]
        print(f"| {NAMES.get(r, r)} | {len(ms)} | " + " | ".join(cell(ms, f"connected/{k}") for k in keys)
              + f" | {statistics.mean(m['train/seconds'] for m in ms):.0f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
