"""experiments/keep.py: finished runs' small files go into the repository and come back; nothing is overwritten
on restore, and a run that is not finished is not kept."""
import json
import subprocess
import sys
from pathlib import Path

KEEP = Path(__file__).resolve().parents[1] / "experiments" / "keep.py"


def keep(*args):
    return subprocess.run([sys.executable, str(KEEP), *map(str, args)], capture_output=True, text=True, check=True)


def make_run(root: Path, rel: str, metrics: dict | None, wall: int = 7):
    run = root / rel
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-10.pt").write_bytes(b"\0" * 1000)
    (run / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "config.yaml").write_text("train: {seed: 0}\n")
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
        (run.parent / f"{run.name}.wall").write_text(f"{wall}\n")
    return run


def test_save_keeps_finished_runs_without_checkpoints_and_restore_brings_them_back(tmp_path):
    out, kept, again = tmp_path / "out", tmp_path / "kept", tmp_path / "again"
    make_run(out, "shapes/f1/inter/seed-0", {"probe/shape_acc": 0.9})
    make_run(out, "shapes/f1/inter/seed-1", None)  # still training: not kept
    keep("save", out, kept)
    files = sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file())
    assert files == ["shapes/f1/inter/seed-0.wall", "shapes/f1/inter/seed-0/config.yaml",
                     "shapes/f1/inter/seed-0/log.jsonl", "shapes/f1/inter/seed-0/metrics.json"]
    keep("restore", kept, again)
    assert json.loads((again / "shapes/f1/inter/seed-0/metrics.json").read_text()) == {"probe/shape_acc": 0.9}
    assert (again / "shapes/f1/inter/seed-0.wall").read_text() == "7\n"


def test_restore_never_overwrites_and_save_takes_the_newer_metrics(tmp_path):
    out, kept = tmp_path / "out", tmp_path / "kept"
    run = make_run(out, "a/seed-0", {"x": 1.0})
    keep("save", out, kept)
    (run / "metrics.json").write_text(json.dumps({"x": 1.0, "probe/colour_acc": 0.5}))  # a probe added later
    keep("save", out, kept)
    assert json.loads((kept / "a/seed-0/metrics.json").read_text()) == {"x": 1.0, "probe/colour_acc": 0.5}
    (kept / "a/seed-0/metrics.json").write_text(json.dumps({"x": 2.0}))
    keep("restore", kept, out)  # the run on this machine wins
    assert json.loads((run / "metrics.json").read_text()) == {"x": 1.0, "probe/colour_acc": 0.5}


def test_a_missing_folder_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, str(KEEP), "save", str(tmp_path / "nope"), str(tmp_path / "k")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "is not a folder" in r.stderr
