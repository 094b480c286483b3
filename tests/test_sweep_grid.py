"""Grid sweeps: a 2 × 2 grid × 2 seeds trains (two cells side by side, threads split), is interrupted, re-runs
reusing what finished and resuming what did not, and ends with one table of one row per cell; bad specs fail first."""
import json
import shutil

import pytest
import yaml

from polyalign.app.grid import cell_names, parse_grid, run_grid
from polyalign.cli import main
from polyalign.errors import ConfigError

FAST = ["train.max_steps=2", "train.checkpoint_every=2", "data.train_size=64", "data.val_size=32",
        "data.test_size=32", "eval.n_examples=0", "eval.bootstrap_resamples=0", "eval.probe_max_train=64"]
GRID = ["train.lr=1e-3,2e-3", "model.embed_dim=8,16"]
CELLS = ["lr=1e-3,embed_dim=8", "lr=1e-3,embed_dim=16", "lr=2e-3,embed_dim=8", "lr=2e-3,embed_dim=16"]


def test_grid_runs_is_interrupted_resumes_and_writes_one_table(tmp_path, tiny_overrides, capsys):
    out, overrides = tmp_path / "grid", tiny_overrides + FAST + ["train.threads=2"]
    first = run_grid(None, GRID, [0, 1], out, overrides, jobs=2, show_progress=False)
    assert [c["name"] for c in first["cells"]] == CELLS
    assert first["cells"][1]["settings"] == {"train.lr": "1e-3", "model.embed_dim": "16"}
    saved = yaml.safe_load((out / CELLS[1] / "seed-1" / "config.yaml").read_text())
    assert saved["train"]["threads"] == 1 and saved["model"]["embed_dim"] == 16 and saved["train"]["seed"] == 1
    assert "seed 1 →" in (out / CELLS[1] / "sweep.log").read_text()  # each worker's output in its cell's log
    key = "retrieval/t2i_R@1"
    values = [json.loads((out / CELLS[2] / f"seed-{s}" / "metrics.json").read_text())[key] for s in (0, 1)]
    assert first["cells"][2]["metrics"][key]["values"] == values

    # the interruption: a cell never started, a seed killed after its last checkpoint (before metrics.json)
    shutil.rmtree(out / CELLS[3])
    (out / CELLS[0] / "seed-1" / "metrics.json").unlink()
    for f in ("grid.json", "summary.md"):
        (out / f).unlink()
    capsys.readouterr()
    again = run_grid(None, GRID, [0, 1], out, overrides + ["train.threads=1"], show_progress=False)
    printed = capsys.readouterr().out
    assert printed.count("already finished") == 5  # 3 untouched cells × 2 seeds, less the killed seed
    assert "seed 1 → " + str(out / CELLS[0] / "seed-1") + " (resuming)" in printed
    assert (out / CELLS[3] / "seed-1" / "metrics.json").is_file()
    assert again["cells"][2]["metrics"] == first["cells"][2]["metrics"]

    table = (out / "summary.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| lr=")]
    assert len(rows) == 4 and rows[0].startswith("| lr=1e-3,embed_dim=8 | 1e-3 | 8 | 2 | ")
    assert "| cell | train.lr | model.embed_dim | seeds |" in table and key in table
    stat = again["cells"][3]["metrics"][key]
    assert f"{stat['mean']:.3f} ± {stat['std']:.3f}" in rows[3]
    assert json.loads((out / "grid.json").read_text())["grid"] == {"train.lr": ["1e-3", "2e-3"],
                                                                  "model.embed_dim": ["8", "16"]}
    assert (out / CELLS[0] / "summary.json").is_file()  # each cell is a seed sweep: `polyalign table` compares cells
    assert main(["table", str(out / CELLS[0]), str(out / CELLS[1]), "--metrics", key]) == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train: {seed: 0}\n")
    capsys.readouterr()  # the command line: every cell is finished, so it only prints the table again
    grid_args = [a for g in GRID for a in ("--grid", g)]
    assert main(["sweep", str(recipe), *grid_args, "--seeds", "0,1", "--out", str(out), "--metrics", key,
                 *overrides]) == 0
    printed = capsys.readouterr().out
    assert printed.count("already finished") == 8 and f"| cell | train.lr | model.embed_dim | seeds | {key} |" in printed


@pytest.mark.parametrize("spec, message", [
    ("train.lr", "not of the form key=v1,v2"),
    ("=1,2", "not of the form key=v1,v2"),
    ("train.lr=", "empty value"),
    ("train.lr=1e-3,,2e-3", "empty value"),
    ("train.lr=1,1", "gives a value twice"),
    ("train.seed=1,2", "--seeds"),
])
def test_bad_grid_specs_are_clear_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid([spec])


def test_bad_cells_fail_before_anything_trains(tmp_path, capsys):
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["train.lr=1,2", "train.lr=3"])
    with pytest.raises(ConfigError, match=r"cell lrr=1e-3: unknown config key 'train.lrr'; did you mean train.lr"):
        run_grid(None, ["train.lrr=1e-3"], [0], tmp_path / "g")
    with pytest.raises(ConfigError, match="batch_size=-1: .*train.batch_size"):
        run_grid(None, ["train.batch_size=32,-1"], [0], tmp_path / "g")
    assert main(["sweep", "configs/shapes-clip.yaml", "--grid", "train.lr", "--out", str(tmp_path / "g")]) == 2
    assert "not of the form key=v1,v2" in capsys.readouterr().err
    assert main(["sweep", "configs/shapes-clip.yaml", "--jobs", "2", "--out", str(tmp_path / "g")]) == 2
    assert not (tmp_path / "g").exists()


def test_cell_names_use_whole_keys_when_last_parts_clash():
    names = [n for n, _ in cell_names(parse_grid(["model.image.width=32", "model.text.width=16,32"]))]
    assert names == ["model.image.width=32,model.text.width=16", "model.image.width=32,model.text.width=32"]


def test_a_grid_sweep_killed_with_sigkill_resumes_to_one_table(tmp_path, tiny_overrides):
    """The real thing: `polyalign sweep --grid … --seeds 0,1 --jobs 2` (2 × 2 cells × 2 seeds) SIGKILLed (the whole process group: CLI and its two
    workers) while cells train; no worker outlives it, and the same command run again finishes every cell — the
    killed ones resumed from their checkpoints — with one table of four rows."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_train import _alive, _tree

    out, key = tmp_path / "grid", "retrieval/t2i_R@1"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train: {seed: 0}\n")
    slow = [o for o in tiny_overrides + FAST if not o.startswith(("train.max_steps", "train.checkpoint_every"))]
    cmd = [sys.executable, "-m", "polyalign", "sweep", str(recipe), *[a for g in GRID for a in ("--grid", g)],
           "--seeds", "0,1", "--out", str(out), "--jobs", "2", "--metrics", key, *slow, "train.max_steps=60",
           "train.checkpoint_every=5", "train.threads=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    ckpts = lambda: list(out.glob("*/seed-*/checkpoints/latest.json"))
    while time.time() < deadline and proc.poll() is None and len(ckpts()) < 2:  # two cells mid-training
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    tree = _tree(proc.pid)
    assert len(tree) >= 3  # the CLI and its two workers
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    deadline = time.time() + 20
    while any(map(_alive, tree)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, tree)), "sweep workers outlived the killed sweep"
    unfinished = [c for c in CELLS if not all((out / c / f"seed-{s}" / "metrics.json").is_file() for s in (0, 1))]
    assert unfinished  # the kill caught cells mid-training
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [c for c in unfinished if "(resuming)" in (out / c / "sweep.log").read_text()]
    assert resumed  # a killed cell continued from its checkpoint (each worker's output is in its cell's log)
    rows = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| lr=")]
    assert len(rows) == 4 and all((out / c / f"seed-{s}" / "metrics.json").is_file() for c in CELLS for s in (0, 1))
    assert all(row.split(" | ")[3] == "2" for row in rows)  # both seeds of every cell in the table
