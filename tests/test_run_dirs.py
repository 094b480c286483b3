"""Run directories never lose or mix a user's work: one run at a time per directory (a lock that names its holder,
taken over from a killed run), `--resume` on the saved config with only safe overrides, `demo` replacing only its
own runs, a clean restart when there is no checkpoint, a damaged tokenizer rebuilt the same, unusable `--out` paths
and `eval` overrides named."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polyalign import tokenizer as tokenizer_module
from polyalign.app.training import train
from polyalign.cli import main
from polyalign.config import load_config
from polyalign.errors import ConfigError, TrainingError
from polyalign.losses import objective
from polyalign.train.checkpoint import find_checkpoint

from conftest import TINY

SHORT = ["train.max_steps=4", "eval.n_examples=0"]


def _recipe(tmp_path: Path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  threads: 1\n")
    return str(path)


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def _snapshot(run: Path) -> dict:
    """Every file of a run directory with its bytes (what a refused command must leave as it was)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoint at step 4); tests copy it before changing anything."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_config(None, TINY + SHORT + ["train.threads=1"]), run, show_progress=False)
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def test_a_second_run_into_a_training_directory_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, capsys):
    recipe, out = _recipe(tmp_path), tmp_path / "busy"
    over = TINY + ["train.max_steps=100000", "train.checkpoint_every=2", "data.val_size=0", "data.num_workers=1",
                   "eval.n_examples=0"]  # a loader worker: a forked child must not keep the lock of a killed run
    first = subprocess.Popen([sys.executable, "-m", "polyalign", "train", recipe, *over, "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        # wait for the pointer, written after a checkpoint's files: between the two the step on disk is incomplete
        while not (out / "checkpoints" / "latest.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert find_checkpoint(out / "checkpoints") is not None, "the first run never checkpointed"
        # only the files a second run could clobber: the live run keeps renaming its checkpoint temp files
        held = ("config.yaml", "tokenizer.json", ".lock")
        before = {k: (out / k).read_bytes() for k in held}
        started = json.loads(before[".lock"])["started"]  # the holder's record: command, PID, host, start time
        for extra in ([], ["--resume"]):  # a new run, and a --resume while the first still trains
            assert main(["train", recipe, *over, "--out", str(out), *extra]) == 1
            err = capsys.readouterr().err
            assert f"is in use by polyalign train (PID {first.pid} on " in err and f"started {started})" in err, err
        assert main(["eval", str(out)]) == 0  # evaluating a running run works, and leaves its files to it
        assert "metrics.json left as it is" in capsys.readouterr().err and not (out / "metrics.json").exists()
        assert {k: (out / k).read_bytes() for k in held} == before
        os.kill(first.pid, signal.SIGKILL)  # the training process alone: its loader worker ends by itself, later
        first.wait()
        step = find_checkpoint(out / "checkpoints")
        # resumed at once: the dead run's lock is taken over (the worker's copy of it was closed when it forked)
        assert main(["train", recipe, "--out", str(out), "--resume", f"train.max_steps={step + 2}"]) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    err = capsys.readouterr().err
    assert f"was left locked by polyalign train (PID {first.pid} on " in err and "taking it over" in err
    assert _steps(out) == list(range(1, step + 3))  # every step once: no row of the two processes mixed


def test_resume_keeps_the_saved_config_and_takes_only_safe_overrides(run, tmp_path, capsys):
    recipe, before = _recipe(tmp_path), _snapshot(run)
    refused = {"train.weight_decay=0.5": "no longer exact", "data.train_size=500": "train it on other data",
               "model.embed_dim=32": "no longer exact", "train.max_steps=2": "below step 4"}
    for override, why in refused.items():
        assert main(["train", recipe, "--out", str(run), "--resume", override]) == 2, override
        err = capsys.readouterr().err
        assert override.split("=")[0] in err and why in err and "Traceback" not in err, err
        assert _snapshot(run) == before, f"{override} changed the run directory"
    # no training overrides repeated: the saved config, not the recipe's defaults, with the safe overrides
    assert main(["train", recipe, "--out", str(run), "--resume", "train.max_steps=6", "eval.max_captions=1"]) == 0
    printed = capsys.readouterr().out
    assert "differs from it in" in printed and "keep their saved values" in printed
    saved = load_config(run / "config.yaml")
    assert (saved.data.train_size, saved.train.max_steps, saved.eval.max_captions) == (256, 6, 1)
    assert json.loads((run / "metrics.json").read_text())["train/steps"] == 6 and _steps(run) == list(range(1, 7))
    # recovery from a non-finite loss, as its message suggests: a lower lr (or fp32) on --resume is accepted
    assert main(["train", recipe, "--out", str(run), "--resume", "train.max_steps=7", "train.lr=0.001"]) == 0
    assert load_config(run / "config.yaml").train.lr == 0.001 and _steps(run) == list(range(1, 8))
    # the library refuses an unsafe change too (a sweep resuming a seed with other overrides)
    with pytest.raises(ConfigError, match=r"train\.weight_decay is 0\.1 there"):
        train(load_config(None, TINY + ["train.max_steps=8", "train.weight_decay=0.5"]), run, resume=True,
              show_progress=False)


@pytest.mark.parametrize("how", ["nan-at-step-2", "checkpoints-deleted"])
def test_resume_without_a_checkpoint_restarts_with_a_clean_log(how, run, tmp_path, monkeypatch, capsys):
    recipe = _recipe(tmp_path)
    if how == "checkpoints-deleted":
        shutil.rmtree(run / "checkpoints")
    else:
        shutil.rmtree(run)
        real, calls = objective.TERMS["clip"], {"n": 0}

        def poisoned(out, cfg):
            calls["n"] += 1
            return real(out, cfg) * (float("nan") if calls["n"] == 2 else 1.0)

        monkeypatch.setitem(objective.TERMS, "clip", poisoned)
        with pytest.raises(TrainingError, match="no checkpoint was written yet"):
            train(load_config(None, TINY + SHORT + ["data.val_size=0"]), run, show_progress=False)
        monkeypatch.setitem(objective.TERMS, "clip", real)
        assert _steps(run) == [1]
    assert main(["train", recipe, "--out", str(run), "--resume", "train.max_steps=3"]) == 0
    printed = capsys.readouterr().out
    assert "starting from scratch" in printed and "cleared" in printed
    assert _steps(run) == [1, 2, 3]


def test_a_torn_tokenizer_is_named_and_rebuilt_the_same_on_resume(run, capsys):
    original = (run / "tokenizer.json").read_bytes()
    (run / "tokenizer.json").write_bytes(original[: len(original) // 2])  # a kill mid-write of the old code
    assert main(["eval", str(run)]) == 1
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "--resume` rebuilds it" in err and "Traceback" not in err, err
    # another process rebuilds it (BPE training must not depend on the process's hash seeds)
    p = subprocess.run([sys.executable, "-m", "polyalign", "train", str(run / "config.yaml"), "--out", str(run),
                        "--resume"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "cannot read the tokenizer" in p.stdout and "rebuilding it from the training captions" in p.stdout
    assert (run / "tokenizer.json").read_bytes() == original


def test_tokenizer_save_is_atomic(tmp_path):
    tok, path = tokenizer_module.Tokenizer.train(["a red circle", "a blue star"], 60, 8), tmp_path / "tokenizer.json"
    tok.save(path)
    good = path.read_bytes()

    class DiesMidWrite:
        def save(self, name):
            Path(name).write_text('{"torn')
            raise KeyboardInterrupt

    tok.tok = DiesMidWrite()
    with pytest.raises(KeyboardInterrupt):
        tok.save(path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]


def test_demo_keeps_a_folder_with_user_files_and_replaces_only_its_own_runs(tmp_path, capsys):
    demo = ["demo", *TINY, "train.threads=1", "train.max_steps=2", "eval.n_examples=0", "--out"]
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    a_file = tmp_path / "a-file"
    a_file.write_text("precious")
    not_demo = tmp_path / "train-run"
    not_demo.mkdir()
    (not_demo / "config.yaml").write_text("{}\n")
    for out, says in ((user, "files the demo did not write (notes.txt)"), (a_file, "is a file"),
                      (not_demo, "a run the demo did not make")):
        assert main([*demo, str(out)]) == 1
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert [p.name for p in user.iterdir()] == ["notes.txt"] and (user / "notes.txt").read_text() == "precious"
    assert a_file.read_text() == "precious" and [p.name for p in not_demo.iterdir()] == ["config.yaml"]

    out = tmp_path / "demo"
    assert main([*demo, str(out)]) == 0 and (out / ".polyalign-demo").is_file() and (out / "metrics.json").is_file()
    (out / "checkpoints" / "mine.txt").write_text("precious")  # a user file inside the demo's run
    assert main([*demo, str(out)]) == 1 and "checkpoints/mine.txt" in capsys.readouterr().err
    (out / "checkpoints" / "mine.txt").unlink()
    assert main([*demo, str(out)]) == 0  # the demo's own previous run is replaced
    assert "replacing the previous demo run" in capsys.readouterr().out and _steps(out) == [1, 2]


def test_an_out_that_is_a_file_or_under_a_file_is_named(tmp_path, capsys):
    recipe, a_file = _recipe(tmp_path), tmp_path / "a-file"
    a_file.write_text("precious")
    for out, says in ((a_file, f"{a_file} is a file, not a run directory"),
                      (a_file / "run", f"cannot create the run directory {a_file / 'run'}: Not a directory")):
        assert main(["train", recipe, *TINY, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert a_file.read_text() == "precious"


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write into: chmod, or as root (whom chmod does not stop) a read-only tmpfs."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mount.returncode:
        pytest.skip(f"as root, a read-only folder needs a read-only mount, refused here: {mount.stderr.strip()!r}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_out_is_named(read_only_dir, tmp_path, capsys):
    recipe = _recipe(tmp_path)
    for out, says in ((read_only_dir, "cannot write into the run directory"),
                      (read_only_dir / "new", "cannot create the run directory")):
        for command in (["train", recipe], ["demo"]):
            assert main([*command, *TINY, "--out", str(out)]) == 1
            err = capsys.readouterr().err
            assert f"{says} {out}: " in err and "pass another --out" in err and "Traceback" not in err, err


def test_eval_of_a_trained_run_takes_only_eval_overrides(run, tmp_path, capsys):
    for override in ("model.embed_dim=64", "data.train_size=10", "train.lr=1"):
        assert main(["eval", str(run), override]) == 2
        err = capsys.readouterr().err
        assert override.split("=")[0] in err and "only eval.* overrides" in err and "Traceback" not in err, err
    from polyalign.app.export import export_embeddings  # embed takes data.* overrides, not the model's

    with pytest.raises(ConfigError, match="model.embed_dim: fixed by the trained weights"):
        export_embeddings(run, "text", tmp_path / "emb", split="test", overrides=["model.embed_dim=64"])
    assert main(["eval", str(run), "eval.max_captions=1"]) == 0
    merged = json.loads((run / "metrics.json").read_text())
    assert merged["train/steps"] == 4 and "retrieval/t2i_R@1" in merged  # training-time figures kept
