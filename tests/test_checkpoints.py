"""Checkpoint integrity: checksums in the pointers, verified loading, fallback to the newest intact step, old
pointers, disk errors that clean up after themselves, and the validation-loss row around the commit."""
import errno
import functools
import json
import pathlib
import re
from pathlib import Path

import pytest
import torch

from polyalign.app.training import train
from polyalign.config import load_config
from polyalign.errors import PolyalignError, TrainingError
from polyalign.train import checkpoint, state
from polyalign.train.checkpoint import find_checkpoint, load_state, load_weights, save_checkpoint
from polyalign.train.files import truncate_log

from conftest import TINY

TINY_RUN = TINY + ["eval.n_examples=0"]


def _save(ckpt: Path, step: int, best: bool = False, keep_previous: bool = True) -> torch.nn.Module:
    torch.manual_seed(step)
    model = torch.nn.Linear(8, 4)
    save_checkpoint(ckpt, step, model, {"step": step, "note": "x" * 100}, best=best, keep_previous=keep_previous)
    return model


def _pointer(ckpt: Path, which: str = "latest") -> dict:
    return json.loads((ckpt / f"{which}.json").read_text())


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # in the tensor data: a silent change of one value, same size
    path.write_bytes(bytes(data))


HOW = {"truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
       "zeroed": lambda p: p.write_bytes(bytes(p.stat().st_size)), "empty": lambda p: p.write_bytes(b""),
       "flipped": _flip, "deleted": Path.unlink}
KINDS = {"weights": "safetensors", "state": "state.pt"}


def _damage_file(kind: str, how: str, ckpt: Path, step: int) -> None:
    HOW[how](ckpt / f"step-{step:06d}.{KINDS[kind]}")


# damage done to the files of checkpoint ``step``: name → function(ckpt_dir, step)
DAMAGE = {f"{kind}-{how}": functools.partial(_damage_file, kind, how) for kind in KINDS for how in HOW}
POINTER_DAMAGE = {  # what latest.json is made to hold (None: deleted)
    "latest-torn": '{"files": {"step-0000', "latest-empty": "", "latest-not-json": "step 3\n",
    "latest-binary": "\udcff\udcfe", "latest-list": "[3]", "latest-null": "null", "latest-step-string": '{"step": "3"}',
    "latest-step-negative": '{"step": -3}', "latest-step-float": '{"step": 3.0}', "latest-files-odd": '{"step": 3, '
    '"files": {"step-000003.safetensors": "abc"}}', "latest-missing-step": '{"step": 99}', "latest-deleted": None,
}


def test_pointers_record_checksums_and_a_save_keeps_latest_previous_and_best(tmp_path):
    ckpt = tmp_path / "c"
    for step in (1, 2, 3, 4):
        _save(ckpt, step, best=step == 2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.json", "latest.json"] + [
        f"step-{s:06d}.{k}" for s in (2, 3, 4) for k in ("safetensors", "state.pt")]
    latest = _pointer(ckpt)
    assert latest["step"] == 4 and latest["previous"]["step"] == 3 and _pointer(ckpt, "best")["step"] == 2
    for entry in (latest, latest["previous"]):
        for name, record in entry["files"].items():
            assert record == checkpoint._record((ckpt / name).read_bytes())
    assert load_state(ckpt, 4)["step"] == 4 and find_checkpoint(ckpt, "best") == 2

    # connect's checkpoints: latest only, nothing kept besides it
    _save(tmp_path / "one", 1, keep_previous=False)
    _save(tmp_path / "one", 2, keep_previous=False)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == \
        ["latest.json", "step-000002.safetensors", "step-000002.state.pt"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_step_files_fall_back_to_the_newest_intact_step(tmp_path, damage, capsys):
    ckpt = tmp_path / "c"
    models = {step: _save(ckpt, step, best=step == 1) for step in (1, 2, 3)}
    DAMAGE[damage](ckpt, 3)
    assert find_checkpoint(ckpt) == 2  # the previous latest
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step-000003." in err and "using step 2, the newest intact" in err
    assert torch.equal(load_weights(ckpt, 2)["weight"], models[2].weight)
    damaged, loader = ("safetensors", load_weights) if damage.startswith("weights") else ("state.pt", load_state)
    with pytest.raises(PolyalignError, match=rf"step-000003\.{damaged}"):
        loader(ckpt, 3)
    DAMAGE[damage](ckpt, 2)
    assert find_checkpoint(ckpt) == 1  # then best
    DAMAGE[damage](ckpt, 1)
    with pytest.raises(PolyalignError, match="no other checkpoint .* is intact"):
        find_checkpoint(ckpt)


@pytest.mark.parametrize("damage", POINTER_DAMAGE)
def test_a_damaged_latest_pointer_falls_back_to_the_newest_intact_step(tmp_path, damage, capsys):
    ckpt = tmp_path / "c"
    for step in (1, 2, 3):
        _save(ckpt, step, best=step == 1)
    text = POINTER_DAMAGE[damage]
    if text is None:
        (ckpt / "latest.json").unlink()
    else:
        (ckpt / "latest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    assert find_checkpoint(ckpt) == 3  # its files are whole (checked by parsing them: no record is left)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("latest.json" in err or "step-000099" in err) and "using step 3" in err
    assert load_state(ckpt, 3)["step"] == 3
    _save(ckpt, 4)  # the next save writes a whole pointer again
    assert find_checkpoint(ckpt) == 4 and capsys.readouterr().err == ""


def test_a_damaged_best_pointer_or_best_step_falls_back(tmp_path, capsys):
    ckpt = tmp_path / "c"
    for step in (1, 2, 3):
        _save(ckpt, step, best=step == 1)
    DAMAGE["weights-flipped"](ckpt, 1)
    assert find_checkpoint(ckpt, "best") == 3 and "step-000001.safetensors" in capsys.readouterr().err
    (ckpt / "best.json").write_text("{")
    assert find_checkpoint(ckpt, "best") == 3 and "best.json is not valid JSON" in capsys.readouterr().err
    assert find_checkpoint(ckpt) == 3  # latest is intact: no warning
    (ckpt / "best.json").unlink()  # no best pointer at all: not a damage
    assert find_checkpoint(ckpt, "best") is None and capsys.readouterr().err == ""
    assert find_checkpoint(tmp_path / "nothing") is None


def test_pointers_of_earlier_versions_still_load(tmp_path, capsys):
    ckpt = tmp_path / "c"
    models = {step: _save(ckpt, step) for step in (1, 2)}
    for which in ("latest", "best"):
        (ckpt / f"{which}.json").write_text(json.dumps({"step": 2}))
    assert find_checkpoint(ckpt) == 2 and find_checkpoint(ckpt, "best") == 2
    assert torch.equal(load_weights(ckpt, 2)["weight"], models[2].weight) and load_state(ckpt, 2)["step"] == 2
    assert capsys.readouterr().err == ""
    DAMAGE["weights-truncated"](ckpt, 2)  # without a checksum, a file that does not parse is still caught
    assert find_checkpoint(ckpt) == 1 and "step-000002.safetensors is damaged" in capsys.readouterr().err
    with pytest.raises(PolyalignError, match="step-000002.safetensors is damaged"):
        load_weights(ckpt, 2)
    _save(ckpt, 3)  # a new save over an old pointer: the old step is kept as the previous one
    assert _pointer(ckpt)["previous"] == {"step": 2, "files": {}}


@pytest.mark.parametrize("fail_on", ["safetensors", "state.pt", "latest.json"])
def test_a_full_disk_while_saving_cleans_up_and_says_how_much_room_is_needed(tmp_path, monkeypatch, fail_on):
    ckpt = tmp_path / "c"
    _save(ckpt, 1)
    _save(ckpt, 2, best=True)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    real_bytes, real_text = pathlib.Path.write_bytes, pathlib.Path.write_text

    def full(real):
        def write(self, data):
            if fail_on in self.name:
                real(self, data[: len(data) // 2])  # a partial temp file, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, data)
        return write

    monkeypatch.setattr(pathlib.Path, "write_bytes", full(real_bytes))
    monkeypatch.setattr(pathlib.Path, "write_text", full(real_text))
    with pytest.raises(TrainingError) as e:
        _save(ckpt, 3, best=True)
    msg = str(e.value)
    assert f"cannot write checkpoint step 3 to {ckpt}: No space left on device" in msg
    assert re.search(r"[\d.]+ [KMG]?i?B free there, the checkpoint needs 1\.\d KiB", msg)
    assert "latest.json still names step 2" in msg
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # no partial or temp file left
    monkeypatch.undo()
    _save(ckpt, 3)  # room again: the next save works
    assert find_checkpoint(ckpt) == 3


def test_an_unwritable_directory_is_a_training_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(TrainingError, match=r"cannot write checkpoint step 1 to .*file/c: Not a directory"):
        _save(tmp_path / "file" / "c", 1)


@pytest.mark.parametrize("bad", ["xx", "[1, 2]", '{"loss": 1}', '{"step": "4"}', "\udcff\udcfe"],
                         ids=["not-json", "a-list", "no-step", "odd-step", "not-utf8"])
def test_resume_cuts_a_damaged_log_back_to_its_step_keeping_every_readable_row(tmp_path, bad):
    log = tmp_path / "log.jsonl"
    rows = [json.dumps({"step": i, "loss": i / 10}) + "\n" for i in range(1, 8)]
    text = "".join(rows[:3]) + bad + "\n" + "".join(rows[3:]) + '{"step": 8, "lo'  # and a torn last line
    log.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert [r["step"] for r in truncate_log(log, 5)] == [1, 2, 3, 4, 5]
    assert log.read_text() == "".join(rows[:5])


class Killed(BaseException):
    """Stands for a SIGKILL at a chosen point of a save."""


def _rows(run: Path) -> list[dict]:
    drop = ("samples_per_s", "data_frac")  # timings
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """An uninterrupted tiny run: 12 steps, checkpoints at 4, 8, 12."""
    run = tmp_path_factory.mktemp("full") / "run"
    train(load_config(None, TINY_RUN), run, show_progress=False)
    return run


@pytest.mark.parametrize("when", ["before-commit", "after-commit"])
def test_a_kill_around_the_commit_keeps_the_validation_row(tmp_path, full_run, monkeypatch, when):
    """The row of step 8's validation loss is written before the pointer moves: a run killed just after the commit
    has it, one killed just before resumes from step 4 and logs it again."""
    cfg = load_config(None, TINY_RUN)
    real = state.save_checkpoint

    def killed_at_8(ckpt_dir, step, *args, **kwargs):
        if step == 8 and when == "after-commit":
            real(ckpt_dir, step, *args, **kwargs)
        if step == 8:
            raise Killed
        real(ckpt_dir, step, *args, **kwargs)

    monkeypatch.setattr(state, "save_checkpoint", killed_at_8)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "run", show_progress=False)
    monkeypatch.undo()
    assert find_checkpoint(tmp_path / "run" / "checkpoints") == (8 if when == "after-commit" else 4)
    val_row = next(r for r in _rows(full_run) if r["step"] == 8 and "val_loss" in r)
    assert val_row in _rows(tmp_path / "run")
    train(cfg, tmp_path / "run", resume=True, show_progress=False)
    assert _rows(tmp_path / "run") == _rows(full_run)
