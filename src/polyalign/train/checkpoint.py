"""Checkpoints: weights as safetensors + training state, committed atomically by swapping a small pointer file.

Layout of ``RUN/checkpoints/``::

    step-000100.safetensors   model weights
    step-000100.state.pt      optimizer, step, RNG states, best metric, ...
    latest.json / best.json   {"step": 100, "files": {name: {"sha256", "size"}}, "previous": {"step", "files"}}:
                              written to a temp file then renamed, so a kill at any moment leaves either the old or
                              the new pointer, each naming complete files whose checksums it records.
A save keeps the steps the pointers name (``latest``, the ``previous`` latest when asked, ``best``) and deletes the
rest. Loading checks the recorded checksums; on damage ``find_checkpoint`` names the damaged file and falls back to
the newest intact step. Pointers of earlier versions (``{"step": 100}``) still load: their files are checked by
parsing them.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save as save_safetensors

from polyalign import distributed as dist
from polyalign.errors import PolyalignError, TrainingError
from polyalign.train.files import atomic_write, write_json

POINTERS = ("latest", "best")
STEP_FILE = re.compile(r"step-(\d+)\.(safetensors|state\.pt)")
_warned: set[str] = set()  # each warning once per process (find_checkpoint runs several times per command)
_hashed: dict[tuple, str] = {}  # (path, inode, size, mtime) → SHA-256 (see _sha256)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _names(step: int) -> tuple[str, str]:
    return f"step-{step:06d}.safetensors", f"step-{step:06d}.state.pt"


def _record(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def save_checkpoint(ckpt_dir: Path, step: int, model: torch.nn.Module, state: dict, best: bool = False,
                    keep_previous: bool = False) -> None:
    """Write step files, then move the ``latest`` (and, if ``best``, the ``best``) pointer to them with their
    checksums; ``keep_previous`` keeps the step ``latest`` named before as a fallback. On a write error (disk full,
    read-only) nothing is committed, the partial files are removed, and TrainingError says why and how much room
    the checkpoint needs."""
    ckpt_dir = Path(ckpt_dir)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    blobs = dict(zip(_names(step), (save_safetensors(weights), buf.getvalue())))
    entry = {"step": step, "files": {name: _record(data) for name, data in blobs.items()}}
    latest = read_pointer(ckpt_dir, "latest")[0] or {}
    previous = latest if latest.get("step") != step else latest.get("previous")
    previous = {"step": previous["step"], "files": previous.get("files", {})} if keep_previous and previous else None
    pointers = {"latest": {**entry, "previous": previous} if previous else entry}
    if best or (read_pointer(ckpt_dir, "best")[0] or {}).get("step") == step:  # a rewritten step's record too
        pointers["best"] = entry
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for name, data in blobs.items():
            atomic_write(ckpt_dir / name, lambda p: p.write_bytes(data))
        for which, pointer in pointers.items():
            write_json(ckpt_dir / f"{which}.json", pointer)
    except OSError as e:
        _discard(ckpt_dir, step)
        raise TrainingError(_write_error(ckpt_dir, step, e, sum(map(len, blobs.values())))) from None
    _prune(ckpt_dir, step)


def _discard(ckpt_dir: Path, step: int) -> None:
    """After a failed save: delete the step's files unless a pointer still names them."""
    if step in _recorded(ckpt_dir):
        return
    for name in _names(step):
        with contextlib.suppress(OSError):
            (ckpt_dir / name).unlink(missing_ok=True)


def _write_error(ckpt_dir: Path, step: int, err: OSError, needed: int) -> str:
    """Why step ``step`` could not be written: the OS's reason, the free space, the space needed, what to do."""
    where = next(p for p in (ckpt_dir, *ckpt_dir.parents) if p.exists())
    kept = read_pointer(ckpt_dir, "latest")[0]
    kept = f"latest.json still names step {kept['step']}" if kept else "no checkpoint was committed yet"
    free = _size(shutil.disk_usage(where).free)
    return (f"cannot write checkpoint step {step} to {ckpt_dir}: {err.strerror or err}; {free} free there, the "
            f"checkpoint needs {_size(needed)}. Nothing was committed and its partial files were removed "
            f"({kept}): free space (or make the directory writable), then continue with --resume")


def _size(n: int) -> str:
    e, unit = next((e, u) for e, u in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B")) if n >= 2**e or not e)
    return f"{n / 2**e:.1f} {unit}"


def _prune(ckpt_dir: Path, step: int) -> None:
    """Delete the step files no pointer names (``step``, just committed, always stays) and stray temp files."""
    keep = set(_recorded(ckpt_dir)) | {step}
    for f in ckpt_dir.iterdir():
        m = STEP_FILE.fullmatch(f.name)
        if (m and int(m.group(1)) not in keep) or f.name.startswith("."):
            with contextlib.suppress(OSError):  # committed already: a file left behind is pruned next time
                f.unlink(missing_ok=True)


def _is_entry(obj) -> bool:
    """Whether ``obj`` is ``{"step": int >= 0, "files"?: {name: {"sha256": str, "size": int}}}``."""
    if not (isinstance(obj, dict) and type(obj.get("step")) is int and obj["step"] >= 0):
        return False
    files = obj.get("files", {})
    return isinstance(files, dict) and all(
        isinstance(r, dict) and isinstance(r.get("sha256"), str) and type(r.get("size")) is int for r in files.values())


def read_pointer(ckpt_dir: Path, which: str) -> tuple[dict | None, str]:
    """The ``which`` pointer's entry, or None and what is wrong with it ("" when it does not exist)."""
    path = Path(ckpt_dir) / f"{which}.json"
    if not path.exists():
        return None, ""
    try:
        text = path.read_text()
        obj = json.loads(text)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"{path} is empty" if not path.stat().st_size else f"{path} is not valid JSON ({e})"
    if not _is_entry(obj):
        return None, f"{path} is not a checkpoint pointer (it holds {text.strip()[:60]!r})"
    if "previous" in obj and not _is_entry(obj["previous"]):
        del obj["previous"]
    return obj, ""


def _recorded(ckpt_dir: Path) -> dict[int, dict | None]:
    """Step → its files' recorded checksums, for every step a readable pointer names (None: an old pointer)."""
    steps: dict[int, dict | None] = {}
    for which in POINTERS:
        entry = read_pointer(ckpt_dir, which)[0]
        for e in (entry, (entry or {}).get("previous")):
            if e is not None and steps.get(e["step"]) is None:
                steps[e["step"]] = e.get("files") or None
    return steps


def _steps_on_disk(ckpt_dir: Path) -> set[int]:
    files = ckpt_dir.iterdir() if ckpt_dir.is_dir() else ()
    return {int(m.group(1)) for f in files if (m := STEP_FILE.fullmatch(f.name))}


def _sha256(path: Path) -> str:
    """The file's SHA-256, computed once per version (inode, size, mtime): finding and then loading reuse it."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hashed:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        _hashed[key] = h.hexdigest()
    return _hashed[key]


def _parse(path: Path):
    """The weights (``.safetensors``) or the state (``.state.pt``) in ``path``."""
    return load_file(str(path)) if path.name.endswith(".safetensors") else torch.load(path, weights_only=False)


def _unreadable(path: Path, err: Exception) -> str:
    return f"{path} is damaged (it cannot be read: {type(err).__name__}: {str(err)[:120]})"


def _problem(path: Path, record: dict | None) -> str:
    """What is wrong with one checkpoint file ("" when intact): missing, its size or SHA-256 unlike its record,
    or, without a record (a pointer of an earlier version), that it does not parse."""
    if not path.is_file():
        return f"{path} is missing"
    try:
        if record is None:
            _parse(path)
            return ""
        if (size := path.stat().st_size) != record["size"]:
            return f"{path} is damaged ({size} bytes where {record['size']} were written: truncated or overwritten)"
        same = _sha256(path) == record["sha256"]
        return "" if same else f"{path} is damaged (its SHA-256 differs from the one recorded when it was written)"
    except Exception as e:  # a damaged file raises whatever its parser meets first
        return _unreadable(path, e)


def _damage(ckpt_dir: Path, step: int, files: dict | None) -> str:
    """What is wrong with step ``step``'s files ("" when intact), checked against ``files``, their checksums."""
    return next((why for name in _names(step) if (why := _problem(ckpt_dir / name, (files or {}).get(name)))), "")


def _newest_intact(ckpt_dir: Path, skip: int | None) -> int | None:
    recorded = _recorded(ckpt_dir)
    for step in sorted(_steps_on_disk(ckpt_dir) - {skip}, reverse=True):
        if not _damage(ckpt_dir, step, recorded.get(step)):
            return step
    return None


def find_checkpoint(ckpt_dir: Path, which: str = "latest") -> int | None:
    """The intact step the ``which`` pointer names; when the pointer or its files are damaged (or ``latest.json``
    is missing), the newest intact step, after a warning naming the damaged file. None when there is no checkpoint
    (or no ``best`` pointer); PolyalignError when checkpoints exist and none is intact."""
    ckpt_dir = Path(ckpt_dir)
    entry, problem = read_pointer(ckpt_dir, which)
    if entry is not None:
        problem = _damage(ckpt_dir, entry["step"], entry.get("files") or None)
        if not problem:
            return entry["step"]
        problem = f"{which}.json names step {entry['step']}, but {problem}"
    elif not problem:  # no such pointer
        if which != "latest" or not _steps_on_disk(ckpt_dir):
            return None
        problem = f"{ckpt_dir / 'latest.json'} is missing"
    step = _newest_intact(ckpt_dir, entry and entry["step"])
    if step is None:
        raise PolyalignError(f"{problem}, and no other checkpoint in {ckpt_dir} is intact: nothing to resume or "
                             "evaluate. Restore the files from a backup, or train again into another --out")
    _warn(f"warning: {problem}: using step {step}, the newest intact checkpoint in {ckpt_dir}")
    return step


def _warn(msg: str) -> None:
    if msg not in _warned and dist.is_main():
        _warned.add(msg)
        print(msg, file=sys.stderr, flush=True)


def _load(ckpt_dir: Path, step: int, which: int):
    """Step ``step``'s weights (``which`` 0) or state (1), checked against its recorded checksum; PolyalignError
    naming the file when it is missing or damaged."""
    name = _names(step)[which]
    path, record = Path(ckpt_dir) / name, (_recorded(Path(ckpt_dir)).get(step) or {}).get(name)
    why = _problem(path, record) if record is not None or not path.is_file() else ""
    if not why:
        try:
            return _parse(path)
        except Exception as e:  # a damaged file raises whatever its parser meets first
            why = _unreadable(path, e)
    raise PolyalignError(f"{why}: use another checkpoint of the run (or restore the file)")


def load_weights(ckpt_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The weights of step ``step``, verified (PolyalignError naming the file when damaged)."""
    return _load(ckpt_dir, step, 0)


def load_state(ckpt_dir: Path, step: int) -> dict:
    """The training state of step ``step``, verified (PolyalignError naming the file when damaged)."""
    return _load(ckpt_dir, step, 1)


def branch_checkpoint(src_dir: Path, step: int | None, dst_dir: Path) -> int:
    """Copy step ``step`` (None: the latest intact one) of the checkpoints in ``src_dir`` into ``dst_dir`` as its only
    (latest) checkpoint, verified on the way; returns the step. The copy is committed like a save: files first, then
    the pointer."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if step is None:
        step = find_checkpoint(src_dir)
        if step is None:
            raise PolyalignError(f"no checkpoint to branch from in {src_dir}")
    elif step not in _steps_on_disk(src_dir):
        kept = ", ".join(map(str, sorted(_steps_on_disk(src_dir)))) or "none"
        raise PolyalignError(f"{src_dir} holds no checkpoint of step {step} (kept steps: {kept})")
    blobs = {}
    for which, name in enumerate(_names(step)):
        _load(src_dir, step, which)  # verified against its checksum (PolyalignError naming a damaged file)
        blobs[name] = (src_dir / name).read_bytes()
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name, data in blobs.items():
        atomic_write(dst_dir / name, lambda p, data=data: p.write_bytes(data))
    write_json(dst_dir / "latest.json", {"step": step, "files": {n: _record(d) for n, d in blobs.items()}})
    return step
