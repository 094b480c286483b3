"""``polyalign train CONFIG --branch-from RUN[@STEP] --out NEW``: continue another run's checkpoint under another
config (issue 23: every ablation row starts from one trained baseline). The new run directory gets a copy of the
checkpoint (weights, optimizer, step, RNG states: the branch continues exactly as the source would, when the config
is the same), the source's tokenizer and tag vocabulary, and ``branch.json`` naming where it came from; then it is
resumed. The source is only read."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from polyalign.errors import PolyalignError
from polyalign.train.checkpoint import branch_checkpoint, find_checkpoint
from polyalign.train.files import write_json

COPIED = ("tokenizer.json", "tags.json")  # what a resumed run reloads besides its checkpoint


def parse_source(text: str) -> tuple[Path, int | None]:
    """``RUN`` or ``RUN@STEP`` → (run directory, step or None for the latest)."""
    run, sep, step = text.rpartition("@") if "@" in text else (text, "", "")
    if sep and not step.isdigit():
        raise PolyalignError(f"--branch-from {text!r}: the step after @ must be a number (RUN@STEP)")
    run_dir = Path(run)
    if not (run_dir / "checkpoints").is_dir():
        raise PolyalignError(f"--branch-from {text!r}: {run_dir} is not a training run (no checkpoints/)")
    return run_dir, int(step) if sep else None


def start_branch(source: str, out: Path) -> int:
    """Set ``out`` up as a branch of ``source``; returns the step it continues from. Refuses an ``out`` that holds a
    run (nothing of it is overwritten)."""
    run_dir, step = parse_source(source)
    out = Path(out)
    if out.resolve() == run_dir.resolve():
        raise PolyalignError(f"--branch-from {source!r}: the branch needs its own --out, not the source run")
    if (last := find_checkpoint(out / "checkpoints")) is not None:
        raise PolyalignError(f"{out} already holds a run (checkpoint at step {last}): pass another --out, or "
                             f"--resume it without --branch-from")
    step = branch_checkpoint(run_dir / "checkpoints", step, out / "checkpoints")
    for name in COPIED:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)
    source_cfg = run_dir / "config.yaml"
    write_json(out / "branch.json", {"from": str(run_dir), "step": step,
                                     "source_config": source_cfg.read_text() if source_cfg.is_file() else None})
    print(f"branching {out} from {run_dir} at step {step}")
    return step


def branch_info(run_dir: Path) -> dict | None:
    """A run's ``branch.json`` (None: not a branch)."""
    path = Path(run_dir) / "branch.json"
    return json.loads(path.read_text()) if path.is_file() else None


def wait_for_branch(out: Path, timeout_s: float = 600) -> None:
    """(torchrun, ranks > 0) wait until rank 0 has set ``out`` up as a branch (its ``branch.json``, written last)."""
    import time

    deadline = time.time() + timeout_s
    while not (Path(out) / "branch.json").is_file():
        if time.time() > deadline:
            raise PolyalignError(f"rank 0 did not set {out} up as a branch within {timeout_s:.0f} s (see its error)")
        time.sleep(0.2)
