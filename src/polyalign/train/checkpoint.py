"""Checkpoints: weights as safetensors + training state, committed atomically by swapping a small pointer file.

Layout of ``RUN/checkpoints/``::

    step-000100.safetensors   model weights
    step-000100.state.pt      optimizer, step, RNG states, best metric, ...
    latest.json / best.json   {"step": 100} — written to a temp file then renamed, so a kill at any moment
                              leaves either the old or the new pointer, each naming complete files.
Files no pointer names are deleted after each save.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj, sort_keys: bool = True) -> None:
    """``obj`` as indented JSON at ``path``, replaced atomically (a kill leaves the old file or the new one)."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys)
    atomic_write(Path(path), lambda p: p.write_text(text))


def truncate_log(path: Path, step: int) -> list[dict]:
    """Keep the rows of a ``log.jsonl`` up to ``step`` (a resumed run logs the later ones again), stopping at a torn
    last line (a kill mid-write); the file is replaced atomically. Returns the rows kept."""
    path, rows = Path(path), []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # only the last line can be torn: it was being written
            break
        if row["step"] <= step:
            rows.append(row)
    atomic_write(path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    return rows


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(ckpt_dir: Path, step: int, model: torch.nn.Module, state: dict, best: bool = False) -> None:
    """Write step files, then move the ``latest`` (and, if ``best``, the ``best``) pointer to them."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(ckpt_dir / f"{name}.safetensors", lambda p: save_file(weights, str(p)))
    atomic_write(ckpt_dir / f"{name}.state.pt", lambda p: torch.save(state, p))
    pointer = json.dumps({"step": step})
    for which in ("latest", "best") if best else ("latest",):
        atomic_write(ckpt_dir / f"{which}.json", lambda p: p.write_text(pointer))
    _prune(ckpt_dir)


def _pointed_steps(ckpt_dir: Path) -> set[int]:
    steps = set()
    for which in ("latest", "best"):
        p = ckpt_dir / f"{which}.json"
        if p.exists():
            steps.add(json.loads(p.read_text())["step"])
    return steps


def _prune(ckpt_dir: Path) -> None:
    keep = _pointed_steps(ckpt_dir)
    for f in ckpt_dir.iterdir():
        m = re.fullmatch(r"step-(\d+)\.(safetensors|state\.pt)", f.name)
        if (m and int(m.group(1)) not in keep) or f.name.startswith("."):
            f.unlink(missing_ok=True)


def find_checkpoint(ckpt_dir: Path, which: str = "latest") -> int | None:
    """The step the pointer names, or None when there is no checkpoint."""
    p = ckpt_dir / f"{which}.json"
    return json.loads(p.read_text())["step"] if p.exists() else None


def load_weights(ckpt_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_dir / f"step-{step:06d}.safetensors"))


def load_state(ckpt_dir: Path, step: int) -> dict:
    return torch.load(ckpt_dir / f"step-{step:06d}.state.pt", weights_only=False)
