"""``polyalign train --branch-from RUN[@STEP]``: a branch under the same config continues exactly as its source did
(bit for bit); under another config it trains from the same weights; the source is never written; bad sources and
occupied outputs are clear errors."""
import hashlib
import json

import pytest
from safetensors.torch import load_file

from polyalign.cli import main

TINY = ["model.embed_dim=16", "model.image.width=16", "model.image.layers=2", "model.text.width=16",
        "model.text.layers=1", "model.text.heads=2", "data.image_size=16", "data.train_size=64", "data.val_size=0",
        "data.test_size=32", "train.batch_size=8", "train.max_steps=4", "train.checkpoint_every=2", "eval.n_examples=0",
        "train.warmup_steps=1", "eval.probe_max_train=32", "eval.bootstrap_resamples=10"]


def _train(tmp_path, out, *extra):
    return main(["train", "configs/shapes-clip.yaml", *TINY, *extra, "--out", str(tmp_path / out)])


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_branch_with_the_same_config_continues_exactly(tmp_path):
    assert _train(tmp_path, "base") == 0
    before = _digest(tmp_path / "base")
    assert _train(tmp_path, "branch", "--branch-from", str(tmp_path / "base") + "@2") == 0
    assert _digest(tmp_path / "base") == before  # the source is only read
    a = load_file(tmp_path / "base" / "checkpoints" / "step-000004.safetensors")
    b = load_file(tmp_path / "branch" / "checkpoints" / "step-000004.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    info = json.loads((tmp_path / "branch" / "branch.json").read_text())
    assert info["step"] == 2 and info["from"].endswith("base")
    rows = [json.loads(l) for l in (tmp_path / "branch" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps and min(steps) > 2 and max(steps) == 4  # the branch logs its own steps only
    # another config from the same weights: trains, and differs
    assert _train(tmp_path, "other", "train.lr=0.01", "--branch-from", str(tmp_path / "base") + "@2") == 0
    c = load_file(tmp_path / "other" / "checkpoints" / "step-000004.safetensors")
    assert any(not (a[k] == c[k]).all() for k in a)


def test_branch_errors(tmp_path, capsys):
    assert _train(tmp_path, "base") == 0
    assert _train(tmp_path, "b", "--branch-from", str(tmp_path / "base") + "@3") != 0
    assert "holds no checkpoint of step 3 (kept steps: 2, 4)" in capsys.readouterr().err
    assert _train(tmp_path, "b", "--branch-from", str(tmp_path / "nowhere")) != 0
    assert "is not a training run" in capsys.readouterr().err
    assert _train(tmp_path, "b", "--branch-from", str(tmp_path / "base") + "@x") != 0
    assert "must be a number" in capsys.readouterr().err
    assert _train(tmp_path, "base", "--branch-from", str(tmp_path / "base")) != 0  # onto the source: refused
    assert "its own --out" in capsys.readouterr().err
    assert _train(tmp_path, "b", "--branch-from", str(tmp_path / "base")) == 0  # latest: step 4 → max_steps 4: done
    capsys.readouterr()
    assert _train(tmp_path, "b", "--branch-from", str(tmp_path / "base")) != 0  # b holds a run now: never overwritten
    assert "already holds a run" in capsys.readouterr().err


def test_branch_with_resume_continues_a_started_branch(tmp_path, capsys):
    assert _train(tmp_path, "base") == 0
    src = str(tmp_path / "base") + "@2"
    assert _train(tmp_path, "b", "train.max_steps=3", "--branch-from", src) == 0  # a branch stopped at step 3
    capsys.readouterr()
    # rerun by a script with --resume: continues b (from its own step 3), never re-branches over it
    assert _train(tmp_path, "b", "train.max_steps=4", "--branch-from", src, "--resume") == 0
    said = capsys.readouterr().out
    assert "resuming from step 3" in said and "branching" not in said


def test_a_branch_takes_its_own_fdt_temperature_and_best(tmp_path):
    """A branch's config decides its FDT temperature (the copied checkpoint holds the source's) and its best
    checkpoint is judged among its own steps (the source's best validation loss is another run's)."""
    from polyalign.train.checkpoint import find_checkpoint, load_weights

    fdt = ["loss.weights.clip=0", "loss.weights.fdt=1", "model.fdt.codebook_size=64", "data.val_size=32"]
    assert _train(tmp_path, "base", *fdt, "model.fdt.t_fdt=1000") == 0
    assert _train(tmp_path, "b", *fdt, "model.fdt.t_fdt=50", "--branch-from", str(tmp_path / "base") + "@2") == 0
    assert float(load_weights(tmp_path / "b" / "checkpoints", 4)["fdt.t_start"]) == 50.0
    assert find_checkpoint(tmp_path / "b" / "checkpoints", "best") in (3, 4)
    rows = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert {r["fdt_t"] for r in rows if "fdt_t" in r} == {50.0}


def test_branch_under_torchrun_is_set_up_once(tmp_path, tiny_overrides):
    """Under torchrun only rank 0 copies the checkpoint; the other rank waits for it, and the branch trains."""
    from test_train import _cli, _finish

    over = tiny_overrides + ["eval.n_examples=0", "train.max_steps=8", "train.checkpoint_every=4"]
    _finish(_cli(tmp_path, tmp_path / "base", over))
    branch = _cli(tmp_path, tmp_path / "b", over + ["--branch-from", f"{tmp_path / 'base'}@4"], nproc=2)
    _finish(branch)
    assert json.loads((tmp_path / "b" / "branch.json").read_text())["step"] == 4
    assert (tmp_path / "b" / "checkpoints" / "step-000008.safetensors").is_file()
