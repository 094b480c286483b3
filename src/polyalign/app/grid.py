"""Grid sweeps: every combination of some keys' values (the cells), each cell a seed sweep, summarised as one
table with one row per cell (mean ± std over the seeds). A cell is an ordinary seed sweep directory (its own
``summary.json``, so ``polyalign table`` compares cells), finished seeds are reused and killed ones resumed.

    polyalign sweep CONFIG --grid model.fdt.t_fdt=60,1000 --grid train.lr=1e-3,2e-3 --seeds 0,1,2 [--jobs 2] --out DIR
        → DIR/<cell>/seed-<s>/ runs, DIR/<cell>/summary.{json,md}, DIR/grid.json and DIR/summary.md (the table)

``--jobs N`` trains N cells side by side, each in its own process with ``train.threads`` split between them
(``max(1, threads // N)``, threads = ``train.threads`` or the machine's cores); a cell's output goes to
``DIR/<cell>/sweep.log``.
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import shlex
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from polyalign.app.sweep import _fmt, run_sweep
from polyalign.config import load_config
from polyalign.errors import ConfigError, PolyalignError
from polyalign.train.files import atomic_write, write_json

GRID_SUMMARY = "grid.json"
HIDDEN = ("_ci_low", "_ci_high")  # interval ends: in grid.json, not in the default table


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["train.lr=1e-3,2e-3", ...]`` → ``[("train.lr", ["1e-3", "2e-3"]), ...]``; a ``ConfigError`` for a spec
    without ``=``, an empty key or value, a key given twice, a value given twice, or ``train.seed`` (use --seeds)."""
    grid = []
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key, values = key.strip(), [v.strip() for v in raw.split(",")]
        if not sep or not key:
            raise ConfigError(f"--grid {spec!r} is not of the form key=v1,v2 (e.g. --grid train.lr=1e-3,2e-3)")
        if not all(values):
            raise ConfigError(f"--grid {spec!r} has an empty value: give comma-separated values, e.g. {key}=1,2")
        if key in dict(grid):
            raise ConfigError(f"--grid {key} is given twice: put all its values in one --grid {key}=a,b")
        if len(set(values)) < len(values):
            raise ConfigError(f"--grid {spec!r} gives a value twice")
        if key == "train.seed":
            raise ConfigError("--grid train.seed: the seeds of every cell are --seeds 0,1,2")
        grid.append((key, values))
    return grid


def cell_names(grid: list[tuple[str, list[str]]]) -> list[tuple[str, dict[str, str]]]:
    """Every cell as ``(directory name, {key: value})``, in product order; a name uses the keys' last parts when
    those differ (``t_fdt=60,lr=1e-3``), else the whole keys."""
    keys = [k for k, _ in grid]
    short = [k.rsplit(".", 1)[-1] for k in keys]
    shown = short if len(set(short)) == len(short) else keys
    cells = []
    for combo in itertools.product(*(values for _, values in grid)):
        name = ",".join(f"{s}={v}" for s, v in zip(shown, combo)).replace("/", "_")
        cells.append((name, dict(zip(keys, combo))))
    return cells


def _cell_in_process(config, seeds, out: Path, overrides: list[str]) -> dict:
    """One cell in a worker process (``--jobs``): its output into ``out/sweep.log``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return run_sweep(config, seeds, out, overrides, show_progress=False)


def run_grid(config: str | None, grid_specs: list[str], seeds: list[int], out: str | Path, overrides: list[str] = (),
             jobs: int = 1, show_progress: bool = True, metrics: list[str] | None = None) -> dict:
    """Train every cell of the grid with every seed into ``out/<cell>/seed-<s>``; returns the grid summary
    (also written as ``out/grid.json`` and the table ``out/summary.md``). Every cell's config is checked first."""
    grid = parse_grid(grid_specs)
    if not grid:
        raise ConfigError("a grid sweep needs at least one --grid key=v1,v2")
    if not seeds:
        raise ConfigError("sweep needs at least one seed (--seeds 0,1,2)")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    out, overrides = Path(out), list(overrides)
    base = load_config(config, overrides)
    cells = cell_names(grid)
    for name, settings in cells:  # an unknown key or a bad value fails here, before any cell trains
        try:
            load_config(config, [*overrides, *(f"{k}={v}" for k, v in settings.items())])
        except ConfigError as e:
            raise ConfigError(f"--grid cell {name}: {e}") from None
    jobs = min(jobs, len(cells))
    threads = [f"train.threads={max(1, (base.train.threads or os.cpu_count() or 1) // jobs)}"] if jobs > 1 else []
    runs = [(out / name, [*overrides, *threads, *(f"{k}={v}" for k, v in settings.items())]) for name, settings in cells]
    print(f"grid sweep: {len(cells)} cells × {len(seeds)} seeds → {out}" + (f", {jobs} cells at a time "
          f"({threads[0]} each; logs in <cell>/sweep.log)" if jobs > 1 else ""), flush=True)
    if jobs == 1:
        results = [run_sweep(config, seeds, cell, ov, show_progress=show_progress) for cell, ov in runs]
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_cell_in_process, config, seeds, cell, ov) for cell, ov in runs]
            results = []
            for (cell, _), future in zip(runs, futures):
                try:
                    results.append(future.result())
                except PolyalignError as e:
                    raise type(e)(f"grid cell {cell.name}: {e} (its output: {cell / 'sweep.log'})") from None
                print(f"grid sweep: cell {cell.name} finished", flush=True)
    grid_args = [a for k, values in grid for a in ("--grid", f"{k}={','.join(values)}")]
    summary = {"config": str(config), "overrides": overrides, "grid": dict(grid), "seeds": list(seeds),
               "command": "polyalign sweep " + shlex.join([str(config), *grid_args, "--seeds", ",".join(map(str, seeds)),
                                                            *(["--jobs", str(jobs)] if jobs > 1 else []),
                                                            "--out", str(out), *overrides]),
               "cells": [{"name": name, "settings": settings, "metrics": result["metrics"]}
                         for (name, settings), result in zip(cells, results)]}
    write_json(out / GRID_SUMMARY, summary, sort_keys=False)  # atomic: a kill leaves the old summary or the new one
    text = grid_markdown(summary, metrics)
    atomic_write(out / "summary.md", lambda p: p.write_text(text))
    return summary


def grid_markdown(summary: dict, metrics: list[str] | None = None) -> str:
    """The grid as one table: a row per cell, its grid values, then each metric's mean ± std over the seeds
    (``metrics``: those columns; default every metric but the interval ends and the train/ and data/ figures)."""
    keys = list(summary["grid"])
    if metrics is None:
        found = {m for cell in summary["cells"] for m in cell["metrics"]}
        metrics = sorted(m for m in found if not m.endswith(HIDDEN) and not m.startswith(("train/", "data/")))
    lines = [f"`{summary['command']}`", "", "| cell | " + " | ".join(keys + ["seeds", *metrics]) + " |",
             "|---" * (len(keys) + len(metrics) + 2) + "|"]
    for cell in summary["cells"]:
        stats = [cell["metrics"].get(m) for m in metrics]
        values = [_fmt(s) if s else "–" for s in stats]
        lines.append(f"| {cell['name']} | " + " | ".join([*(cell["settings"][k] for k in keys),
                                                          str(len(summary["seeds"])), *values]) + " |")
    return "\n".join(lines) + "\n"
