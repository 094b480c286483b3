"""`polyalign connect` (C-MCR, arXiv 2305.14381) resumes exactly: after SIGKILL, after a crash mid-epoch or at an
epoch's end; and it never overwrites a run directory without --resume."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from polyalign.cli import main
from polyalign.connect import load_connect_config, run_connect
from polyalign.train.checkpoint import find_checkpoint, load_state

QUIET = lambda msg: None  # noqa: E731
PER_EPOCH = 10  # 600 B items in batches of 60
SHORT = ["train.epochs=5", "train.checkpoint_every=15"]  # 50 steps; checkpoints at 15 (mid-epoch), 30 (epoch end), ...
LONG = ["train.epochs=80", "train.checkpoint_every=15"]  # 800 steps, a few seconds: long enough to be killed midway
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """Random unit vectors: 600 B items in X (16-d) and Y (24-d), memories of 300 A and C, 50 test pairs."""
    d = tmp_path_factory.mktemp("connect-resume")
    rng = np.random.default_rng(0)
    for name, (n, dim) in {"b_x": (600, 16), "b_y": (600, 24), "mem_a": (300, 16), "mem_c": (300, 24),
                           "a_test": (50, 16), "c_test": (50, 24)}.items():
        x = rng.standard_normal((n, dim)).astype(np.float32)
        np.save(d / f"{name}.npy", x / np.linalg.norm(x, axis=1, keepdims=True))
    cfg = {"inputs": {"b_x": "b_x.npy", "b_y": "b_y.npy", "memory_a": "mem_a.npy", "memory_c": "mem_c.npy"},
           "eval": {"a_test": "a_test.npy", "c_test": "c_test.npy"}, "method": {"dim": 16},
           "train": {"batch_size": 60, "threads": 1, "log_every": 1}}
    (d / "connect.yaml").write_text(yaml.safe_dump(cfg))
    return d / "connect.yaml"


@pytest.fixture(scope="module")
def full_short(config, tmp_path_factory) -> Path:
    """The uninterrupted SHORT run."""
    out = tmp_path_factory.mktemp("full") / "run"
    run_connect(load_connect_config(config, SHORT), out, log=QUIET)
    return out


class Crash(Exception):
    pass


def crash_at(step: int, seen: list | None = None):
    """A log that raises when step ``step`` is reported: the run dies after that step, before its checkpoint."""
    def log(msg: str) -> None:
        if seen is not None:
            seen.append(msg)
        if msg.startswith(f"step {step}/"):
            raise Crash
    return log


def snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``run``: its bytes and modification time."""
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
            if p.is_file()}


def assert_same_run(a: Path, b: Path) -> None:
    """Same log rows (bit for bit: the text), same final weights and BatchNorm statistics, same metrics."""
    assert (a / "log.jsonl").read_text() == (b / "log.jsonl").read_text()
    wa, wb = load_file(str(a / "connector.safetensors")), load_file(str(b / "connector.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert {k: v for k, v in ma.items() if k != "train/seconds"} == {k: v for k, v in mb.items() if k != "train/seconds"}


@pytest.mark.parametrize("crash,ckpt", [(20, 15), (35, 30)], ids=["mid-epoch", "epoch-end"])
def test_resume_after_a_crash_is_exact(config, full_short, tmp_path, crash, ckpt):
    cfg, run = load_connect_config(config, SHORT), tmp_path / "run"
    with pytest.raises(Crash):
        run_connect(cfg, run, log=crash_at(crash))
    assert find_checkpoint(run / "checkpoints") == ckpt
    state = load_state(run / "checkpoints", ckpt)
    assert (state["epoch"], state["batch"]) == divmod(ckpt, PER_EPOCH)  # where the next step starts
    assert (state["order"] is None) == (ckpt % PER_EPOCH == 0)  # mid-epoch: the epoch's batch order is kept
    logged = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, crash))  # rows past the checkpoint, which the resumed run must drop
    seen = []
    run_connect(cfg, run, resume=True, log=seen.append)
    assert f"resuming from the checkpoint at step {ckpt} (epoch {ckpt // PER_EPOCH + 1}, " \
           f"batch {ckpt % PER_EPOCH + 1})" in seen
    assert_same_run(run, full_short)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["latest.json", "step-000050.safetensors", "step-000050.state.pt"]  # the last step's; the others pruned


def test_a_run_directory_is_never_overwritten(config, full_short, tmp_path, capsys):
    partial = tmp_path / "partial"
    with pytest.raises(Crash):
        run_connect(load_connect_config(config, SHORT), partial, log=crash_at(20))
    for run in (full_short, partial):  # finished, and killed after a checkpoint
        before = snapshot(run)
        assert main(["connect", str(config), *SHORT, "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"{run} already holds a connect run (checkpoint at step" in err
        assert "pass --resume, or another --out" in err
        assert snapshot(run) == before
    # a resume whose config gives another schedule is refused too, and leaves the run (config.yaml included) as it was
    before = snapshot(partial)
    assert main(["connect", str(config), *SHORT, "train.batch_size=50", "--out", str(partial), "--resume"]) == 2
    assert "resume with the run's inputs and train.* keys" in capsys.readouterr().err
    assert snapshot(partial) == before
    # --resume without a checkpoint starts from scratch
    fresh = tmp_path / "fresh"
    assert main(["connect", str(config), *SHORT, "--out", str(fresh), "--resume"]) == 0
    assert "starting from scratch" in capsys.readouterr().out
    assert_same_run(fresh, full_short)


# ── SIGKILL of the command line ──────────────────────────────────────────────────────────────────────────────
def _connect(config: Path, out: Path, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "polyalign", "connect", str(config), *LONG, "--out", str(out)]
    return subprocess.Popen(cmd + (["--resume"] if resume else []), env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _finish(proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait for a run and require success; past ``timeout``, kill its process group and fail with its stderr."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"connect run still going after {timeout} s; stderr:\n{proc.stderr.read()}")
    assert rc == 0, proc.stderr.read()


def test_resume_after_sigkill_is_exact(config, tmp_path):
    _finish(_connect(config, tmp_path / "full"))
    killed, run = _connect(config, tmp_path / "killed"), tmp_path / "killed"
    latest = run / "checkpoints" / "latest.json"  # replaced atomically: always whole
    deadline = time.time() + 180
    try:
        while time.time() < deadline and killed.poll() is None:  # past a few checkpoints, far from the end (800)
            if latest.exists() and json.loads(latest.read_text())["step"] >= 200:
                break
            time.sleep(0.005)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)  # the CLI and anything it started
    assert killed.wait(timeout=60) == -signal.SIGKILL, f"the run ended on its own:\n{killed.stderr.read()}"
    killed.stderr.close()
    deadline = time.time() + 20
    while _group_alive(killed.pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _group_alive(killed.pid), "processes of the killed run are still alive"
    assert 200 <= find_checkpoint(run / "checkpoints") < 800 and not (run / "connector.json").exists()

    before = snapshot(run)  # without --resume: refused, exit code 2, nothing touched
    again = subprocess.run([sys.executable, "-m", "polyalign", "connect", str(config), *LONG, "--out", str(run)],
                           env=ENV, capture_output=True, text=True, timeout=180)
    assert again.returncode == 2, again.stderr
    assert "already holds a connect run" in again.stderr and "pass --resume" in again.stderr
    assert snapshot(run) == before

    _finish(_connect(config, run, resume=True))
    assert_same_run(run, tmp_path / "full")
