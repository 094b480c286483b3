"""What the experiments' report scripts share: finished runs by seed, metric values, mean ± std, paired differences
with t-intervals over the seeds (``polyalign.app.sweep.paired_diff``), markdown tables, loss curves from log.jsonl."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from polyalign.app.sweep import paired_diff


def seeds_of(path: Path) -> dict[int, Path]:
    """{seed: run dir} of the finished runs (metrics.json) under ``path``."""
    if not path.is_dir():
        return {}
    return {int(p.name.split("-")[1]): p for p in sorted(path.glob("seed-*")) if (p / "metrics.json").is_file()}


def values(runs: dict[int, Path], key: str) -> dict[int, float]:
    out = {}
    for s, p in runs.items():
        v = json.loads((p / "metrics.json").read_text()).get(key)
        if v is not None and not math.isnan(float(v)):
            out[s] = float(v)
    return out


def fmt_stat(v: dict[int, float]) -> str:
    if not v:
        return "–"
    xs = list(v.values())
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def fmt_diff(d: dict) -> str:
    if not d["seeds"]:
        return "–"
    if d["low"] is None:
        return f"{d['mean']:+.3f} (1 seed)"
    star = " *" if d["low"] > 0 or d["high"] < 0 else ""
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{star}"


def vs_constant(v: dict[int, float], ref: dict[int, float]) -> dict:
    """Gain over a seed-independent reference (one run): each seed's value minus it, a t-interval over the seeds."""
    if not ref or not v:
        return {"seeds": [], "mean": math.nan, "low": None, "high": None}
    c = next(iter(ref.values()))
    return paired_diff(dict.fromkeys(v, c), v)


def table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] +
                     ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def log_rows(run: Path) -> list[dict]:
    """The training steps' rows of a run's log.jsonl (those with a loss)."""
    path = run / "log.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in rows if "step" in r and "loss" in r]
