"""An exclusive lock on a run directory (``RUN/.lock``), held while a command writes into the run.

``fcntl.flock`` on the file: the kernel releases it when the holder ends, however it ends (SIGKILL included), so a
lock left by a killed run is detected for free and taken over. The file records the holder (command, PID, host,
start time) for the message that a refused command prints. A process may take the lock of a directory it already
holds (``polyalign demo`` holds it, then trains); forked children (loader workers) drop their copy of the
descriptor, so a worker that outlives a killed run cannot keep its directory locked.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from polyalign.errors import PolyalignError

LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # resolved lock path → descriptor, for the locks this process holds


def _forget_in_child() -> None:
    """After a fork: the child holds no lock (closing its copy leaves the parent's lock in place)."""
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def ensure_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` (and its parents), or a ``PolyalignError`` naming the path when that cannot be done."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PolyalignError(f"{run_dir} is a file, not a run directory: pass another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent is a file, read-only file system, no permission
        raise PolyalignError(f"cannot create the run directory {run_dir}: {e.strerror}; pass another --out") from None


def _describe(record: dict) -> str:
    """``polyalign train (PID 123 on host, started …)`` from a lock file's record."""
    return (f"polyalign {record.get('command', '?')} (PID {record.get('pid', '?')} on {record.get('host', '?')}, "
            f"started {record.get('started', '?')})")


def _read_record(fd: int, wait_s: float = 0.0) -> dict:
    """The holder's record; waits up to ``wait_s`` for a holder that has locked but not yet written it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            record = json.loads(os.pread(fd, 4096, 0))
            return record if isinstance(record, dict) else {}
        except ValueError:  # empty or mid-write
            if time.monotonic() >= deadline:
                return {}
            time.sleep(0.05)


def _flock(fd: int, path: Path, wait_s: float) -> None:
    """Take the exclusive lock, waiting up to ``wait_s``; a ``PolyalignError`` naming the holder if another
    process keeps it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            holder = _describe(_read_record(fd, wait_s=0.5))
            os.close(fd)
            raise PolyalignError(f"{path.parent} is in use by {holder}: wait for it to end (or stop it), "
                                 f"or pass another --out") from None
        except OSError as e:  # a file system without locks: go on unlocked, as before there were locks
            print(f"warning: cannot lock {path} ({e.strerror}): two runs into {path.parent} would not be stopped",
                  file=sys.stderr)
            return


def _acquire(path: Path, command: str, wait_s: float) -> int:
    """Lock ``path`` and record this process as the holder; returns the descriptor."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:  # read-only file system, no permission
        raise PolyalignError(f"cannot write into the run directory {path.parent}: {e.strerror}; "
                             f"pass another --out") from None
    _flock(fd, path, wait_s)
    if stale := _read_record(fd):  # a clean release empties the file: this holder ended without releasing
        print(f"note: {path.parent} was left locked by {_describe(stale)}, which has ended; taking it over",
              file=sys.stderr)  # stderr: `polyalign eval` prints its metrics as JSON on stdout
    record = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold ``RUN/.lock`` while the block runs (``RUN`` is created if needed). Another process holding it: a
    ``PolyalignError`` naming the holder, after waiting up to ``wait_s`` seconds, and nothing is written."""
    run_dir = Path(run_dir)
    ensure_run_dir(run_dir)
    path = run_dir / LOCK_NAME
    key = str(path.resolve())
    if key in _held:  # this process holds it already (the outer block releases it)
        yield
        return
    fd = _held[key] = _acquire(path, command, wait_s)
    try:
        yield
    finally:
        if _held.pop(key, None) == fd:  # not in a forked child, which closed its copy
            os.ftruncate(fd, 0)  # no holder on record: the next one takes it over without a notice
            os.close(fd)


def lock_holder(run_dir: str | Path) -> str | None:
    """Who holds ``RUN/.lock`` in words, or None when nobody (another process) does."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file() or str(path.resolve()) in _held:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _describe(_read_record(fd, wait_s=0.5))
    except OSError:  # no locks on this file system
        return None
    finally:
        os.close(fd)  # also releases the probe's shared lock
