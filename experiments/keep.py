"""Keep an experiment's finished runs in the repository, without their checkpoints, so that a later session on a
new machine carries on from them instead of training them again.

    python experiments/keep.py save runs/mct21 experiments/results/mct21      # after runs finish (idempotent)
    python experiments/keep.py restore experiments/results/mct21 runs/mct21   # before relaunching the experiment

A run is kept once it is finished (its metrics.json exists): metrics.json, log.jsonl, config.yaml, itm_probes.json
(issue 23's probes) and the experiment script's RUN.wall beside it: tens of kB per run, which is all the reports (experiments/*_report.py) read.
`restore` copies them back into the experiment's output folder, where the scripts skip finished runs; it never
overwrites a file that is already there (a run finished on this machine wins). The report reads either folder.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

FILES = ("metrics.json", "log.jsonl", "config.yaml", "itm_probes.json")


def finished_runs(root: Path):
    for m in sorted(root.rglob("metrics.json")):
        yield m.parent


def copy_run(run: Path, src_root: Path, dst_root: Path, overwrite: bool) -> int:
    rel = run.relative_to(src_root)
    dst = dst_root / rel
    n = 0
    wall = run.parent / f"{run.name}.wall"
    pairs = [(run / f, dst / f) for f in FILES if (run / f).is_file()]
    if wall.is_file():
        pairs.append((wall, dst.parent / wall.name))
    for a, b in pairs:
        if b.exists() and (not overwrite or b.read_bytes() == a.read_bytes()):
            continue
        b.parent.mkdir(parents=True, exist_ok=True)
        tmp = b.with_name(f"{b.name}.{os.getpid()}.tmp")  # two savers at once never share one
        shutil.copyfile(a, tmp)
        tmp.replace(b)
        n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["save", "restore"])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    a = ap.parse_args(argv)
    if not a.src.is_dir():
        print(f"error: {a.src} is not a folder", file=sys.stderr)
        return 2
    runs = list(finished_runs(a.src))
    # save: the output folder is the truth (a probe added later updates metrics.json); restore never overwrites
    files = sum(copy_run(r, a.src, a.dst, overwrite=a.cmd == "save") for r in runs)
    print(f"{a.cmd}: {len(runs)} finished runs in {a.src}, {files} files written under {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
