"""End-to-end training: loss falls, exact resume after SIGKILL, NaN handling, manifests with bad rows, CLI errors."""
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
from safetensors.torch import load_file

from polyalign.losses import objective
from polyalign.config import load_config
from polyalign.errors import TrainingError
from polyalign.train.checkpoint import find_checkpoint, load_weights
from polyalign.app.training import train


def losses_of(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def test_tiny_run_loss_falls_and_writes_outputs(tmp_path, tiny_overrides, capsys):
    cfg = load_config(None, tiny_overrides + ["train.max_steps=40", "train.checkpoint_every=20"])
    metrics = train(cfg, tmp_path / "run", show_progress=False)
    rows = [r for r in losses_of(tmp_path / "run") if r[1] is not None]
    first, last = np.mean([r[1] for r in rows[:5]]), np.mean([r[1] for r in rows[-5:]])
    assert last < 0.8 * first, (first, last)
    assert any("R@1" in k for k in metrics) and any("zeroshot" in k for k in metrics)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["train/steps"] == 40 and 0 <= saved["train/data_time_frac"] < 1
    for name in ("config.yaml", "tokenizer.json", "loss.png", "retrieval_examples.png"):
        assert (tmp_path / "run" / name).exists(), name
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "latest.json" in ckpts and "best.json" in ckpts and len(ckpts) <= 6  # latest + best kept, rest pruned

    # `polyalign eval RUN` re-evaluates the saved weights and reproduces the end-of-training metrics
    from polyalign.cli import main
    assert main(["eval", str(tmp_path / "run")]) == 0
    printed = json.loads(capsys.readouterr().out)
    for key in metrics:
        if key.startswith(("retrieval/", "zeroshot/")):
            assert printed[key] == pytest.approx(metrics[key], abs=1e-6), key


def _cli(tmp_path, out, overrides, resume=False, nproc=1):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("train:\n  threads: 1\n")
    launcher = [sys.executable, "-m", "polyalign"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "polyalign"]
    cmd = [*launcher, "train", str(cfg), *overrides, "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "POLYALIGN_DIST_TIMEOUT_S": "120"}  # a stuck collective fails
    return subprocess.Popen(cmd + (["--resume"] if resume else []), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (torchrun starts each worker in its own session: killpg misses them)."""
    rows = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split("\n")
    children: dict[int, list[int]] = {}
    for row in rows:
        if row.strip():
            child, parent = map(int, row.split())
            children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie (dead, not yet reaped) counts as dead


def _finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait for a CLI run and require success; past ``timeout``, print every process's Python stacks (the CLI
    dumps them on SIGUSR1), kill the tree and fail with its stderr, instead of a bare TimeoutExpired."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = _tree(proc.pid)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(3)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"run still going after {timeout} s; stacks and stderr:\n{proc.stderr.read()}")
    assert rc == 0, proc.stderr.read()


# every MCT term on, image–image in MoCo mode: momentum encoder and queue must resume (and gather under DDP)
MCT_MOCO = ["data.augment.enabled=true", "data.tag_min_count=2", "loss.weights.image_image=1",
            "loss.weights.text_text=0.5", "loss.weights.tags=1", "loss.image_image=moco", "model.moco.queue_size=80",
            "model.moco.momentum=0.9"]


# the fusion model with every addition: momentum model, queues (with ids), α ramp and soft masks must resume
ALBEF = ["loss.weights.clip=0", "loss.weights.itc=1", "loss.weights.itm=1", "loss.weights.mlm=1", "model.image.kind=vit",
         "model.fusion.queue_size=64", "model.fusion.embed_dim=16", "model.fusion.fusion_layers=2",
         "model.fusion.soft_mask=true", "model.fusion.focal_gamma=2", "model.fusion.text_mask_aug=true",
         "model.fusion.alpha_ramp_steps=30", "eval.rerank_k=10"]


# the pretrained tower with its last blocks tuned: the frozen prefix's cache is rebuilt on resume, the same values
EFFNET = ["model.image.kind=efficientnet_lite0", "model.image.train_blocks=2"]


def _shards(tmp_path) -> list[str]:
    """Streaming shards of 256 shapes scenes (8 shards, with a val manifest): the data overrides of a shards run."""
    from polyalign.data.shapes import ShapesDataset
    from polyalign.data.export import export_manifest
    from polyalign.data.shards import write_shards

    root = tmp_path / "data"
    train = export_manifest(ShapesDataset("train", 256, 32), root, "train", label_field="shape")
    val = export_manifest(ShapesDataset("val", 64, 32), root, "val", label_field="shape")
    write_shards(train, root / "shards", shard_size=32, show_progress=False)
    return ["data.name=shards", f"data.shards={root / 'shards'}", f"data.val_manifest={val}", "data.shuffle_buffer=40"]


SHARDS = "shards"  # the data overrides are built per test (_shards)


@pytest.mark.parametrize("nproc,extra", [(1, []), (2, []), (1, MCT_MOCO), (1, ALBEF), (1, EFFNET), (1, SHARDS),
                                         (2, SHARDS)],
                         ids=["1proc", "2proc", "mct-moco", "albef", "efficientnet", "shards-1proc", "shards-2proc"])
def test_resume_after_sigkill_is_exact(tmp_path, tiny_overrides, nproc, extra):
    if extra == SHARDS:  # streamed: each worker's position in its shards is in the checkpoint
        extra = _shards(tmp_path)
    over = tiny_overrides + extra + ["train.max_steps=48", "train.checkpoint_every=10", "data.num_workers=1",
                                     "model.image.dropout=0.1", "model.text.dropout=0.1"]  # dropout: RNG state must resume
    full = _cli(tmp_path, tmp_path / "full", over, nproc=nproc)
    _finish(full)

    killed = _cli(tmp_path, tmp_path / "killed", over, nproc=nproc)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill mid-epoch, between checkpoints (epoch = 8 steps)
        if log.exists() and any(r[0] >= 25 for r in losses_of(tmp_path / "killed")):
            tree = _tree(killed.pid)
            os.killpg(killed.pid, signal.SIGKILL)  # the CLI (torchrun: the launcher alone, workers have own sessions)
            break
        time.sleep(0.005)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    # torchrun's workers die with their launcher instead of training on as orphans in the run directory
    deadline = time.time() + 20
    while any(map(_alive, tree)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, tree)), "processes of the killed run are still alive"
    assert find_checkpoint(tmp_path / "killed" / "checkpoints") in (20, 30)

    resumed = _cli(tmp_path, tmp_path / "killed", over, resume=True, nproc=nproc)
    _finish(resumed)
    assert losses_of(tmp_path / "killed") == losses_of(tmp_path / "full")
    a = load_weights(tmp_path / "full" / "checkpoints", 48)
    b = load_weights(tmp_path / "killed" / "checkpoints", 48)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# the fusion model's ITC alone (no random ITM negatives or MLM masks, which each rank draws for itself): momentum
# features and their ids are gathered in rank order into the queues, so 2 processes must follow 1 process
ALBEF_ITC = ["loss.weights.clip=0", "loss.weights.itc=1", "loss.weights.itm=0", "loss.weights.mlm=0",
             "model.image.kind=vit", "model.fusion.queue_size=64", "model.fusion.embed_dim=16",
             "model.fusion.fusion_layers=2", "model.fusion.alpha_ramp_steps=6", "eval.rerank_k=0"]


@pytest.mark.parametrize("extra", [[], MCT_MOCO, ALBEF_ITC], ids=["clip", "mct-moco", "albef-itc"])
def test_torchrun_two_processes_follow_the_one_process_run(tmp_path, tiny_overrides, extra):
    """`train.batch_size` is the global batch: 2 processes see the same samples per step and log the same losses
    (with MCT: global-batch NT-Xent/InfoNCE views, tag BCE, MoCo keys gathered into one queue; with the fusion
    model: momentum distillation against gathered queues)."""
    over = tiny_overrides + extra + ["eval.n_examples=0"]
    runs = {n: _cli(tmp_path, tmp_path / f"p{n}", over, nproc=n) for n in (1, 2)}
    for proc in runs.values():
        _finish(proc)
    one, two = losses_of(tmp_path / "p1"), losses_of(tmp_path / "p2")
    assert [r[0] for r in one] == [r[0] for r in two] and len(one) == 15  # 12 steps + 3 validation rows
    for a, b in zip(one, two):
        assert (a[1] or a[2]) == pytest.approx(b[1] or b[2], abs=1e-5)
    m1 = json.loads((tmp_path / "p1" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "p2" / "metrics.json").read_text())
    assert m1["retrieval/t2i_R@10"] == pytest.approx(m2["retrieval/t2i_R@10"], abs=0.02)


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path, tiny_overrides, monkeypatch):
    real, calls = objective.TERMS["clip"], {"n": 0}

    def poisoned(out, cfg):
        calls["n"] += 1
        loss = real(out, cfg)
        return loss * float("nan") if calls["n"] >= 7 and out.first_emb.requires_grad else loss

    monkeypatch.setitem(objective.TERMS, "clip", poisoned)
    cfg = load_config(None, tiny_overrides + ["data.val_size=0"])
    with pytest.raises(TrainingError, match=r"non-finite loss at step \d+.*last good checkpoint \(step 4\)"):
        train(cfg, tmp_path / "run", show_progress=False)
    ckpt = tmp_path / "run" / "checkpoints"
    assert find_checkpoint(ckpt) == 4
    assert all(torch.isfinite(v).all() for v in load_file(ckpt / "step-000004.safetensors").values())


def _write_manifest(root: Path, n_good: int) -> Path:
    """A real manifest of shapes scenes, plus three bad rows: a missing file, a truncated PNG, an empty caption."""
    from polyalign.data.export import export_manifest
    from polyalign.data.shapes import ShapesDataset

    path = export_manifest(ShapesDataset("train", n_good, image_size=32), root, "train", label_field="shape")
    (root / "bad.png").write_bytes((root / "train" / "000000.png").read_bytes()[:60])  # truncated PNG
    bad = [{"image": "missing.png", "caption": "a red circle"}, {"image": "bad.png", "caption": "a blue star"},
           {"image": "train/000001.png", "caption": "   "}]
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in bad))
    return path


def test_manifest_with_bad_rows_trains_and_reports(tmp_path, tiny_overrides, capsys):
    manifest = _write_manifest(tmp_path, 80)
    over = tiny_overrides + ["data.name=manifest", f"data.train_manifest={manifest}", f"data.test_manifest={manifest}",
                             "data.max_bad_fraction=0.05", "train.max_steps=4", "eval.probe_max_train=64"]
    metrics = train(load_config(None, over), tmp_path / "run", show_progress=False)
    assert metrics["data/skipped_rows"] == 6  # 3 bad rows in each of the train and test manifests
    assert "skipped 3 of 83 rows" in capsys.readouterr().out
    from polyalign.errors import DataError
    with pytest.raises(DataError, match="max_bad_fraction"):
        train(load_config(None, over + ["data.max_bad_fraction=0.01"]), tmp_path / "run2", show_progress=False)


def test_cli_bad_key_exits_2_without_traceback(tmp_path):
    (tmp_path / "r.yaml").write_text("{}\n")
    p = subprocess.run([sys.executable, "-m", "polyalign", "train", str(tmp_path / "r.yaml"), "train.max_stesp=3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "train.max_stesp" in p.stderr and "train.max_steps" in p.stderr and "Traceback" not in p.stderr


def test_sigusr1_prints_where_a_running_cli_is(tmp_path, tiny_overrides):
    """`kill -USR1 PID` on a run that seems stuck prints its Python stacks to stderr, and the run goes on."""
    proc = _cli(tmp_path, tmp_path / "run", tiny_overrides + ["train.max_steps=100000", "data.val_size=0"])
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(1.0)
    assert proc.poll() is None  # still training
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    err = proc.stderr.read()
    assert "Current thread" in err and "fit.py" in err, err[-2000:]
