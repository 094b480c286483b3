"""Seed sweeps: one recipe trained with several seeds, summarised as mean ± std per metric, and tables that
put several sweeps side by side (what docs/results.md is made of).

    polyalign sweep CONFIG --seeds 0,1,2 --out DIR [key=value ...]   → DIR/seed-<s>/ runs + DIR/summary.{json,md}
    polyalign table DIR [DIR ...] --metrics a,b [--names x,y] [--baseline x]
        → a markdown table, one row per sweep: mean ± std per metric and, for every sweep but the baseline (the
          first, or --baseline), the paired difference to the baseline over the seeds both ran (see paired_diff)
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


def seed_values(path: str | Path, summary: dict, key: str) -> dict[int, float]:
    """``{seed: value}`` of one metric of a sweep (NaN values left out). A summary's values follow its seeds when
    every seed reports the metric; otherwise each seed's own ``seed-<s>/metrics.json`` tells which seeds do."""
    stat = summary["metrics"].get(key)
    if stat is None:
        return {}
    seeds = [int(s) for s in summary["seeds"]]
    if stat["n"] == len(seeds):
        found = dict(zip(seeds, stat["values"]))
    else:
        root, found = Path(path) if Path(path).is_dir() else Path(path).parent, {}
        for seed in seeds:
            file = root / f"seed-{seed}" / "metrics.json"
            if file.is_file() and key in (metrics := json.loads(file.read_text())):
                found[seed] = metrics[key]
        if len(found) != stat["n"]:
            raise PolyalignError(f"{path}: {stat['n']} of its {len(seeds)} seeds report {key}, and their "
                                 f"seed-<s>/metrics.json files do not say which: cannot pair it by seed")
    return {seed: float(v) for seed, v in found.items() if not math.isnan(float(v))}


def paired_diff(base: dict[int, float], other: dict[int, float], level: float = 0.95) -> dict:
    """Per-seed differences other − base over the seeds both have: ``{"seeds", "mean", "low", "high"}``, the
    interval a Student t ``level`` interval of the mean difference (n − 1 degrees of freedom; None for one seed)."""
    seeds = sorted(set(base) & set(other))
    diffs = [other[s] - base[s] for s in seeds]
    if not diffs:
        return {"seeds": [], "mean": math.nan, "low": None, "high": None}
    from scipy import stats

    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"seeds": seeds, "mean": mean, "low": None, "high": None}
    half = float(stats.t.ppf((1 + level) / 2, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"seeds": seeds, "mean": mean, "low": mean - half, "high": mean + half}


def _fmt_diff(d: dict, digits: int) -> str:
    if not d["seeds"]:
        return "–"
    if d["low"] is None:
        return f"{d['mean']:+.{digits}f} (1 seed)"
    excludes_zero = d["low"] > 0 or d["high"] < 0
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]" + (" *" if excludes_zero else "")


def _seed_notes(name: str, base_name: str, seeds: set[int], base_seeds: set[int]) -> list[str]:
    shared = seeds & base_seeds
    if not shared:
        raise PolyalignError(f"cannot pair {name} with the baseline {base_name}: no seed in common "
                             f"({name}: {', '.join(map(str, sorted(seeds))) or 'none'}; {base_name}: "
                             f"{', '.join(map(str, sorted(base_seeds))) or 'none'})")
    notes = []
    for who, only in ((name, seeds - base_seeds), (base_name, base_seeds - seeds)):
        if only:
            notes.append(f"- {name} vs {base_name}: seed(s) {', '.join(map(str, sorted(only)))} only in {who}, "
                         f"dropped from the pairing")
    return notes


def compare_table(paths: list[str | Path], metrics: list[str], names: list[str] | None = None,
                  digits: int = 3, baseline: str | None = None) -> str:
    """A markdown table: one row per sweep, one column per metric (mean ± std over its seeds); with several sweeps,
    after each metric a column of the paired difference to the baseline sweep (``baseline`` names it; default the
    first): the mean over shared seeds of sweep − baseline and its 95% t-interval, ``*`` where it excludes 0."""
    summaries = [load_summary(p) for p in paths]
    names = names or [Path(p).name for p in paths]
    if len(names) != len(paths):
        raise PolyalignError(f"--names gives {len(names)} names for {len(paths)} sweeps")
    if baseline is not None and baseline not in names:
        raise PolyalignError(f"--baseline {baseline}: not one of the sweeps ({', '.join(names)})")
    paired = len(paths) > 1
    b = names.index(baseline) if baseline is not None else 0
    head = [c for key in metrics for c in ([key, f"Δ {key} vs {names[b]}"] if paired else [key])]
    lines = ["| run | seeds | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    notes = []
    for i, (path, name, summary) in enumerate(zip(paths, names, summaries)):
        if paired and i != b:
            notes += _seed_notes(name, names[b], set(map(int, summary["seeds"])), set(map(int, summaries[b]["seeds"])))
        cells = []
        for key in metrics:
            stat = summary["metrics"].get(key)
            cells.append(_fmt(stat, digits) if stat and not math.isnan(stat["mean"]) else "–")
            if paired and i != b:
                base, other = seed_values(paths[b], summaries[b], key), seed_values(path, summary, key)
                diff = paired_diff(base, other)
                cells.append(_fmt_diff(diff, digits))
                if lost := sorted(set(map(int, summary["seeds"])) & set(map(int, summaries[b]["seeds"])) - set(diff["seeds"])):
                    notes.append(f"- {name} vs {names[b]}: {key} missing (or NaN) in seed(s) "
                                 f"{', '.join(map(str, lost))} of one of them, dropped from its pairing")
            elif paired:
                cells.append("baseline")
        lines.append(f"| {name} | {len(summary['seeds'])} | " + " | ".join(cells) + " |")
    if paired:
        lines += ["", f"Δ: mean over the seeds both sweeps ran of (sweep − {names[b]}), paired by seed, with its 95% "
                  "t-interval over those seeds; * the interval excludes 0.", *notes]
    return "\n".join(lines) + "\n"
