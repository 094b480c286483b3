"""train.report_to=tensorboard: the log rows' scalars, the lr, the validation loss, the final metrics and the
retrieval-examples picture land in RUN/tensorboard/ (read back with TensorBoard's own reader); log.jsonl is unchanged."""
import importlib.util
import json

import pytest

from polyalign.config import load_config
from polyalign.errors import ConfigError

TB = ["train.report_to=tensorboard", "train.threads=1", "train.max_steps=4", "train.checkpoint_every=2",
      "data.train_size=64", "eval.n_examples=2", "eval.bootstrap_resamples=0"]


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_every_logged_scalar_and_the_retrieval_picture(tmp_path, tiny_overrides):
    pytest.importorskip("tensorboard")
    from polyalign.app.training import train

    metrics = train(load_config(None, tiny_overrides + TB), tmp_path / "run", show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    acc = read_events(tmp_path / "run" / "tensorboard")
    tags = acc.Tags()
    step_rows = [r for r in rows if "loss" in r]
    for key in set(step_rows[0]) - {"step"}:  # loss, clip_loss, lr, samples_per_s, grad_norm, logit_scale, ...
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [r["step"] for r in step_rows]
        assert [e.value for e in events] == pytest.approx([r[key] for r in step_rows], rel=1e-6)
    val = [r for r in rows if "val_loss" in r]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("val/loss")] == \
        [(r["step"], r["val_loss"]) for r in val] and len(val) == 2
    key = "retrieval/t2i_R@1"
    assert [(e.step, e.value) for e in acc.Scalars(f"eval/{key}")] == [(4, pytest.approx(metrics[key]))]
    assert tags["images"] == ["eval/retrieval_examples"]
    image = acc.Images("eval/retrieval_examples")[0]
    assert image.step == 4 and image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and image.width > 100


def test_no_tensorboard_folder_by_default(tmp_path, tiny_overrides):
    from polyalign.app.training import train

    overrides = tiny_overrides + [o for o in TB if not o.startswith("train.report_to")] + ["eval.n_examples=0"]
    cfg = load_config(None, overrides)
    assert cfg.train.report_to == "none"
    train(cfg, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_report_to_values_and_a_missing_package_are_clear_errors(monkeypatch):
    with pytest.raises(ConfigError, match="train.report_to' must be one of none, tensorboard, got 'wandb'"):
        load_config(None, ["train.report_to=wandb"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        load_config(None, ["train.report_to=tensorboard"])
    load_config(None, ["train.report_to=tensorboard"], for_training=False)  # a saved run still loads to evaluate


def test_a_resumed_run_hides_the_events_the_killed_attempt_wrote_after_its_checkpoint(tmp_path, tiny_overrides):
    pytest.importorskip("tensorboard")
    from polyalign.app.training import train

    cfg, run = load_config(None, tiny_overrides + TB + ["eval.n_examples=0"]), tmp_path / "run"
    train(cfg, run, show_progress=False)
    for f in [*(run / "checkpoints").glob("step-*4.*"), run / "checkpoints" / "latest.json", run / "metrics.json"]:
        f.unlink()  # as if killed after logging steps 3-4 and evaluating, with step 2 the last checkpoint
    train(cfg, run, resume=True, show_progress=False)
    acc = read_events(run / "tensorboard")
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]
    assert len(acc.Scalars("eval/retrieval/t2i_R@1")) == 1
