"""Run files written atomically: a kill at any moment leaves the old file or the new one, never a torn one."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename onto ``path`` (fsynced first); on any error the temp file is removed."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj, sort_keys: bool = True) -> None:
    """``obj`` as indented JSON at ``path``, replaced atomically (a kill leaves the old file or the new one)."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys)
    atomic_write(Path(path), lambda p: p.write_text(text))


def truncate_log(path: Path, step: int) -> list[dict]:
    """Keep the rows of a ``log.jsonl`` up to ``step`` (a resumed run logs the later ones again), dropping torn or
    unreadable lines (a kill mid-write); the file is replaced atomically. Returns the rows kept."""
    path, rows = Path(path), []
    if not path.exists():
        return rows
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # torn: it was being written
            continue
        if isinstance(row, dict) and type(row.get("step")) is int and row["step"] <= step:
            rows.append(row)
    atomic_write(path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    return rows
