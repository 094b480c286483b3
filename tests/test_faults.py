"""Fault tests of whole runs: SIGKILL at random moments (resumed bit for bit), every kind of damaged checkpoint file
(a clear message and the newest intact checkpoint), and a disk that fills up at the second checkpoint."""
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polyalign.app.training import train
from polyalign.cli import main
from polyalign.config import load_config
from polyalign.errors import TrainingError
from polyalign.train import checkpoint
from polyalign.train.checkpoint import find_checkpoint, load_weights

from conftest import TINY
from test_checkpoints import DAMAGE, POINTER_DAMAGE

TIMINGS = ("samples_per_s", "data_frac")


def rows_of(run: Path) -> list[dict]:
    """The log rows without their timings: what must be equal bit for bit between two runs."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, step: int) -> None:
    assert rows_of(a) == rows_of(b)
    wa, wb = load_weights(a / "checkpoints", step), load_weights(b / "checkpoints", step)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ── SIGKILL at random moments ────────────────────────────────────────────────────────────────────────────────
KILL_RUN = TINY + ["train.max_steps=40", "train.checkpoint_every=5", "eval.n_examples=0",
                   "model.image.dropout=0.1", "model.text.dropout=0.1"]  # dropout: the RNG state must resume too


def _launch(tmp_path: Path, out: Path, resume: bool) -> subprocess.Popen:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  threads: 1\n")
    cmd = [sys.executable, "-m", "polyalign", "train", str(recipe), *KILL_RUN, "--out", str(out)]
    with open(tmp_path / f"{out.name}.stderr", "a") as err:  # the child keeps its own descriptor
        return subprocess.Popen(cmd + (["--resume"] if resume else []), env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)


def _logged(run: Path) -> list[dict]:
    """The log rows written so far (a torn last line is skipped)."""
    with contextlib.suppress(FileNotFoundError):
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
                if line.endswith("}")]
    return []


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """Poll ``ready()`` until it holds (True) or the run ends first (False)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ready():
            return True
        time.sleep(0.002)
    return False


def _finish(proc: subprocess.Popen, run: Path, timeout: float = 240) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = "timeout"
    assert rc == 0, (run.parent / f"{run.name}.stderr").read_text()[-3000:]


def test_a_run_killed_again_and_again_resumes_bit_for_bit(tmp_path):
    """Six SIGKILLs at seeded random moments: during start-up, mid-epoch between checkpoints, and just after a
    checkpoint's validation row (inside the save); each time `--resume` continues, and the end is the same run."""
    full = _launch(tmp_path, tmp_path / "full", resume=False)  # the uninterrupted run, alongside
    run, rng, kills = tmp_path / "killed", random.Random(17), []
    proc = _launch(tmp_path, run, resume=False)
    for _ in range(6):
        done = max([r["step"] for r in _logged(run)], default=0)
        how = rng.choice(["start-up", "step", "checkpoint"]) if kills else "step"
        if how == "start-up":
            time.sleep(rng.uniform(0.2, 2.5))
        elif how == "step":
            target = min(done + rng.randint(2, 9), 38)
            _wait_for(proc, lambda: any(r["step"] >= target for r in _logged(run)))
            time.sleep(rng.uniform(0, 0.1))
        else:
            _wait_for(proc, lambda: any("val_loss" in r and r["step"] > done for r in _logged(run)))
            time.sleep(rng.uniform(0, 0.01))
        if proc.poll() is not None:
            break  # it finished first
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        kills.append((how, max([r["step"] for r in _logged(run)], default=0)))
        proc = _launch(tmp_path, run, resume=True)
    _finish(proc, run)
    _finish(full, tmp_path / "full")
    assert len(kills) >= 5, kills
    assert_same_run(run, tmp_path / "full", 40)
    metrics = [{k: v for k, v in json.loads((r / "metrics.json").read_text()).items() if not k.startswith("train/")}
               for r in (run, tmp_path / "full")]
    assert metrics[0] == metrics[1]


# ── damaged run files ────────────────────────────────────────────────────────────────────────────────────────
TINY_RUN = TINY + ["eval.n_examples=0"]  # 12 steps; checkpoints at 4, 8 (the previous) and 12 (the latest)


def _cli(*args: str) -> int:
    checkpoint._warned.clear()  # each command warns afresh, as a new process would
    return main(list(args))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny run and its recipe."""
    root = tmp_path_factory.mktemp("finished")
    (root / "recipe.yaml").write_text("{}\n")
    assert _cli("train", str(root / "recipe.yaml"), *TINY_RUN, "--out", str(root / "run")) == 0
    return root / "run", root / "recipe.yaml"


def _damage_pointer(text):
    def damage(ckpt: Path, step: int) -> None:
        if text is None:
            (ckpt / "latest.json").unlink()
        else:
            (ckpt / "latest.json").write_bytes(text.replace("3", str(step)).encode("utf-8", "surrogateescape"))
    return damage


def _damage_all(ckpt: Path, step: int) -> None:
    for f in ckpt.glob("step-*.safetensors"):
        f.write_bytes(bytes(f.stat().st_size))


# case → (damage(ckpt, 12), the file the message names, the step resumed from; None: nothing intact is left)
CASES = {name: (f, "step-000012." + ("safetensors" if name.startswith("weights") else "state.pt"), 8)
         for name, f in DAMAGE.items()}
CASES |= {name: (_damage_pointer(text), "step-000099" if "missing" in name else "latest.json", 12)
          for name, text in POINTER_DAMAGE.items()}
CASES["best-torn"] = (lambda c, s: (c / "best.json").write_text('{"step": 1'), "best.json", 12)
CASES["all-steps-zeroed"] = (_damage_all, "no other checkpoint", None)


@pytest.mark.parametrize("case", CASES)
def test_damaged_run_files_give_a_clear_message_and_the_newest_intact_checkpoint(finished, tmp_path, case, capsys):
    base, recipe = finished
    damage, named, resumed_from = CASES[case]
    run = tmp_path / "run"
    shutil.copytree(base, run)
    damage(run / "checkpoints", 12)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()

    which = "best" if case.startswith("best") else "latest"
    rc = _cli("eval", str(run), "--which", which)
    err = capsys.readouterr().err
    assert "Traceback" not in err and named in err, err
    if resumed_from is None:
        assert rc == 1 and "is intact: nothing to resume or evaluate" in err
    else:
        assert rc == 0 and (which == "latest" or "using step 12" in err)

    rc = _cli("train", str(recipe), *TINY_RUN, "--out", str(run), "--resume")
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if resumed_from is None:
        assert rc == 1 and named in err
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing deleted
        return
    assert rc == 0 and f"resuming from step {resumed_from}" in out, err
    assert (named in err) == (which == "latest")  # a damaged best pointer does not matter to a resume
    assert_same_run(run, base, 12)  # the log cut back to the step resumed from, then the same steps again


# ── a full disk ──────────────────────────────────────────────────────────────────────────────────────────────
@contextlib.contextmanager
def _tmpfs(path: Path, size_kib: int, options: str = ""):
    """A small tmpfs mounted at ``path`` (root only: skipped elsewhere); yields a function that resizes it."""
    path.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k{options}", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield lambda kib: subprocess.run(["mount", "-o", f"remount,size={kib}k", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_disk_full_at_the_second_checkpoint_names_the_space_and_resumes_once_freed(finished, tmp_path):
    base, _ = finished
    step_kib = sum(-(-f.stat().st_size // 4096) * 4 for f in (base / "checkpoints").glob("step-000008.*"))  # pages
    run, cfg = tmp_path / "run", load_config(None, TINY_RUN)
    with _tmpfs(run / "checkpoints", step_kib * 3 // 2) as resize:  # room for one checkpoint and a half
        with pytest.raises(TrainingError) as e:
            train(cfg, run, show_progress=False)
        msg = str(e.value)
        assert f"cannot write checkpoint step 8 to {run / 'checkpoints'}: No space left on device" in msg
        assert "KiB free there, the checkpoint needs" in msg and "latest.json still names step 4" in msg
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
            ["best.json", "latest.json", "step-000004.safetensors", "step-000004.state.pt"]  # no partial file
        assert find_checkpoint(run / "checkpoints") == 4
        resize(step_kib * 5)  # space freed: room for latest, previous, best and the one being written
        train(cfg, run, resume=True, show_progress=False)
        assert_same_run(run, base, 12)


def test_a_read_only_checkpoint_directory_is_a_clear_error(tmp_path):
    with _tmpfs(tmp_path / "ro", 64, ",ro"):
        with pytest.raises(TrainingError, match=r"cannot write checkpoint step 1 to .*ro: Read-only file system; "
                                                r"64\.0 KiB free there, the checkpoint needs [\d.]+ KiB"):
            checkpoint.save_checkpoint(tmp_path / "ro", 1, torch.nn.Linear(4, 4), {"step": 1})
