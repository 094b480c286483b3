"""Seed sweeps: one recipe trained with several seeds, summarised as mean ± std per metric, and tables that
put several sweeps side by side (what docs/results.md is made of).

    polyalign sweep CONFIG --seeds 0,1,2 --out DIR [key=value ...]   → DIR/seed-<s>/ runs + DIR/summary.{json,md}
    polyalign table DIR [DIR ...] [--metrics a,b] [--names x,y]      → a markdown table, one row per sweep
"""
from __future__ import annotations

import json
import math
import shlex
import statistics
import time
from pathlib import Path

from polyalign.config import load_config
from polyalign.errors import PolyalignError
from polyalign.train.checkpoint import find_checkpoint
from polyalign.train.files import atomic_write, write_json

SUMMARY = "summary.json"


def summarise(per_seed: dict[int, dict[str, float]]) -> dict[str, dict]:
    """``{metric: {"mean", "std", "n", "values"}}`` over the seeds that report the metric (std: sample, ddof=1)."""
    keys = sorted({k for m in per_seed.values() for k in m})
    out = {}
    for key in keys:
        values = [float(m[key]) for m in per_seed.values() if key in m]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "n": len(values), "values": values}
    return out


def run_sweep(config: str, seeds: list[int], out: str | Path, overrides: list[str] = (),
              show_progress: bool = True) -> dict:
    """Train ``config`` once per seed into ``out/seed-<s>`` (finished seeds are reused, killed ones resumed)."""
    from polyalign.app.training import train

    if not seeds:
        raise PolyalignError("sweep needs at least one seed (--seeds 0,1,2)")
    out = Path(out)
    load_config(config, list(overrides))  # fail on a bad recipe before any training
    per_seed, wall = {}, {}
    for seed in seeds:
        run = out / f"seed-{seed}"
        metrics_path = run / "metrics.json"
        if metrics_path.exists():
            print(f"sweep: seed {seed} already finished in {run}; reusing its metrics")
            per_seed[seed] = json.loads(metrics_path.read_text())
            continue
        cfg = load_config(config, [*overrides, f"train.seed={seed}"])
        resume = find_checkpoint(run / "checkpoints") is not None
        print(f"sweep: seed {seed} → {run}" + (" (resuming)" if resume else ""), flush=True)
        t0 = time.perf_counter()
        per_seed[seed] = train(cfg, run, resume=resume, show_progress=show_progress)
        wall[seed] = time.perf_counter() - t0
    summary = {"config": str(config), "overrides": list(overrides), "seeds": list(seeds),
               "command": "polyalign sweep " + shlex.join([str(config), "--seeds", ",".join(map(str, seeds)),
                                                            "--out", str(out), *overrides]),
               "wall_s_this_invocation": wall, "metrics": summarise(per_seed)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SUMMARY, summary, sort_keys=False)  # atomic: a kill leaves the old summary or the new one
    text = summary_markdown(summary)
    atomic_write(out / "summary.md", lambda p: p.write_text(text))
    return summary


def _fmt(stat: dict, digits: int = 3) -> str:
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def summary_markdown(summary: dict) -> str:
    """Every metric of one sweep: mean ± std and the per-seed values."""
    lines = [f"`{summary['command']}`", "", "| metric | mean ± std | per seed |", "|---|---|---|"]
    for key, stat in summary["metrics"].items():
        lines.append(f"| {key} | {_fmt(stat)} | {', '.join(f'{v:.3f}' for v in stat['values'])} |")
    return "\n".join(lines) + "\n"


def load_summary(path: str | Path) -> dict:
    path = Path(path)
    file = path / SUMMARY if path.is_dir() else path
    if not file.is_file():
        raise PolyalignError(f"{path} holds no sweep summary ({SUMMARY}); run `polyalign sweep` first")
    return json.loads(file.read_text())


def compare_table(paths: list[str | Path], metrics: list[str], names: list[str] | None = None,
                  digits: int = 3) -> str:
    """A markdown table: one row per sweep, one column per metric (mean ± std over its seeds)."""
    summaries = [load_summary(p) for p in paths]
    names = names or [Path(p).name for p in paths]
    if len(names) != len(paths):
        raise PolyalignError(f"--names gives {len(names)} names for {len(paths)} sweeps")
    lines = ["| run | seeds | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for name, summary in zip(names, summaries):
        cells = []
        for key in metrics:
            stat = summary["metrics"].get(key)
            cells.append(_fmt(stat, digits) if stat and not math.isnan(stat["mean"]) else "–")
        lines.append(f"| {name} | {len(summary['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
