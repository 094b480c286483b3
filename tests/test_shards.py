"""Streaming shards (polyalign.data.shards): writing a manifest as tar shards, and the seeded, rank- and
worker-disjoint, buffer-bounded reader over them."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from polyalign.cli import main
from polyalign.data.base import SkipReport
from polyalign.data.shards import INDEX, expand_braces, iter_shards, read_index, write_shards
from polyalign.errors import DataError

RECIPE = str(Path(__file__).resolve().parents[1] / "configs/shapes-clip.yaml")


def _image(path, k: int, fmt: str = "PNG"):
    colour = (k * 37 % 256, k * 91 % 256, k * 13 % 256)
    Image.new("RGB", (12, 10), colour).save(path, fmt)


@pytest.fixture()
def manifest(tmp_path):
    """A 23-row manifest: 20 good rows (PNG and JPEG), one missing image, one corrupt image, one without a caption."""
    (tmp_path / "img").mkdir()
    rows = []
    for k in range(20):
        name = f"img/{k}.{'png' if k % 2 else 'jpg'}"
        _image(tmp_path / name, k, "PNG" if k % 2 else "JPEG")
        rows.append({"image": name, "captions": [f"thing {k}", f"item {k}"], "label": f"c{k % 3}",
                     "tags": ["a", f"t{k}"], "concept_id": f"k{k}"})
    (tmp_path / "img/bad.png").write_bytes(b"not a png at all")
    rows += [{"image": "img/none.png", "caption": "missing"}, {"image": "img/bad.png", "caption": "corrupt"},
             {"image": "img/0.jpg", "caption": ""}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _all_keys(out, **kw):
    return [s["key"] for s in iter_shards(out, image_size=8, **kw)]


def test_write_shards_keeps_bytes_and_fields_and_counts_skips(manifest, tmp_path):
    out = tmp_path / "shards"
    index = write_shards(manifest, out, shard_size=6, show_progress=False)
    assert [s["samples"] for s in index["shards"]] == [6, 6, 6, 2] and index["samples"] == 20
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar", INDEX]
    assert index["skipped"]["skipped"] == {"missing image": 1, "corrupt image": 1, "empty caption": 1}
    assert index["label_names"] == {"label": ["c0", "c1", "c2"]} and read_index(out) == index
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
        assert names[:4] == ["00000000.jpg", "00000000.json", "00000001.png", "00000001.json"]
        assert tar.extractfile("00000001.png").read() == (manifest.parent / "img/1.png").read_bytes()
        meta = json.loads(tar.extractfile("00000001.json").read())
    assert meta == {"image": "img/1.png", "concept_id": "k1", "captions": ["thing 1", "item 1"],
                    "labels": {"label": "c1"}, "tags": ["a", "t1"]}


def test_rewrite_removes_stale_shards(manifest, tmp_path):
    out = tmp_path / "shards"
    write_shards(manifest, out, shard_size=3, show_progress=False)
    write_shards(manifest, out, shard_size=10, show_progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]


def test_cli_data_shards(manifest, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "shards", "--manifest", str(manifest), "--out", str(out), "--shard-size", "8"]) == 0
    assert "wrote 3 shards, 20 samples from 23 rows; skipped 3" in capsys.readouterr().out
    assert len(_all_keys(out)) == 20


def test_expand_braces():
    assert expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.mark.parametrize("world,n_workers", [(1, 1), (2, 1), (1, 3), (2, 2)])
def test_every_sample_once_per_epoch_over_ranks_and_workers(manifest, tmp_path, world, n_workers):
    out = tmp_path / "s"
    write_shards(manifest, out, shard_size=3, show_progress=False)  # 7 shards: uneven shares
    for epoch in (0, 1):
        keys = [k for r in range(world) for w in range(n_workers)
                for k in _all_keys(out, seed=5, epoch=epoch, rank=r, world=world, worker=w, n_workers=n_workers,
                                   buffer=4)]
        assert sorted(keys) == [f"{i:08d}" for i in range(20)]


def test_order_is_seeded_per_epoch_and_pattern_equals_folder(manifest, tmp_path):
    out = tmp_path / "s"
    write_shards(manifest, out, shard_size=3, show_progress=False)
    first = _all_keys(out, seed=1, epoch=0, buffer=5)
    assert _all_keys(str(out / "{00000..00006}.tar"), seed=1, epoch=0, buffer=5) == first
    assert _all_keys(out, seed=1, epoch=1, buffer=5) != first
    assert _all_keys(out, seed=2, epoch=0, buffer=5) != first
    assert first != sorted(first)


def test_shuffle_buffer_bounds_how_far_a_sample_moves(manifest, tmp_path):
    """With a buffer of b, the i-th sample out is among the first i + b read: no more than b are ever held."""
    out = tmp_path / "s"
    write_shards(manifest, out, shard_size=3, show_progress=False)
    samples = list(iter_shards(out, seed=3, buffer=1, image_size=None))  # buffer 1: the shards' order, unshuffled
    stream, shards = [s["key"] for s in samples], [s["shard"] for s in samples]
    assert shards == sorted(shards, key=shards.index) and shards != sorted(shards)  # shard by shard, shuffled
    assert all(a < b for a, b, sa, sb in zip(stream, stream[1:], shards, shards[1:]) if sa == sb)
    for b in (2, 5):
        shuffled = _all_keys(out, seed=3, buffer=b)
        assert sorted(shuffled) == sorted(stream) and shuffled != stream
        assert all(stream.index(k) < i + b for i, k in enumerate(shuffled))


def test_samples_decode_as_the_manifest_does(manifest, tmp_path):
    out = tmp_path / "s"
    write_shards(manifest, out, shard_size=50, show_progress=False)
    sample = next(s for s in iter_shards(out, image_size=8) if s["key"] == "00000001")
    assert sample["image"].shape == (3, 8, 8) and str(sample["image"].dtype) == "torch.uint8"
    expected = np.asarray(Image.open(manifest.parent / "img/1.png").convert("RGB"))[5, 6]
    assert sample["image"][:, 4, 4].tolist() == expected.tolist()
    assert sample["captions"] == ["thing 1", "item 1"] and sample["labels"] == {"label": "c1"}
    assert sample["shard"] == "00000.tar"


def _member(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_corrupt_samples_inside_a_shard_are_skipped_and_counted(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (9, 9), "red").save(good, "PNG")
    meta = json.dumps({"captions": ["a red square"], "labels": {}, "tags": []}).encode()
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key, image, js in [("a", good.getvalue(), meta), ("b", b"garbage", meta), ("c", good.getvalue(), b"{oops"),
                               ("d", None, meta), ("e", good.getvalue(), meta)]:
            if image is not None:
                _member(tar, f"{key}.png", image)
            _member(tar, f"{key}.json", js)
    report = SkipReport()
    keys = [s["key"] for s in iter_shards(str(tmp_path / "00000.tar"), image_size=8, report=report)]
    assert sorted(keys) == ["a", "e"]
    assert report.total == 5 and report.skipped == {"corrupt image": 1, "bad row": 1, "missing image": 1}
    assert report.examples[0].startswith("00000.tar:b: corrupt image")


@pytest.mark.parametrize("cut", [0.5, 0.3, 0.52])
def test_truncated_shard_is_counted_and_the_rest_read(manifest, tmp_path, cut):
    out = tmp_path / "s"
    write_shards(manifest, out, shard_size=10, show_progress=False)
    data = (out / "00001.tar").read_bytes()
    (out / "00001.tar").write_bytes(data[: int(len(data) * cut)])
    report = SkipReport()
    keys = [s["key"] for s in iter_shards(out, image_size=8, report=report)]
    assert set(keys) >= {f"{i:08d}" for i in range(10)} and len(keys) < 20
    assert report.skipped == {"unreadable shard": 1}


def test_missing_shard_and_empty_buffer_are_errors(tmp_path):
    with pytest.raises(DataError, match="shard not found"):
        list(iter_shards(str(tmp_path / "{00000..00001}.tar")))
    with pytest.raises(DataError, match="buffer"):
        list(iter_shards(str(tmp_path / "x.tar"), buffer=0))


def _tokenizer(captions):
    """A stand-in for the BPE tokenizer: one id per caption's length."""
    ids = torch.tensor([[len(c)] for c in captions])
    return ids, torch.ones_like(ids, dtype=torch.bool)


def test_stream_loader_gives_each_epoch_whole_and_reshuffled(manifest, tmp_path):
    from polyalign.data.loader import make_stream_loader
    from polyalign.data.stream import ShardStream

    out = tmp_path / "s"
    write_shards(manifest, out, shard_size=3, show_progress=False)
    stream = ShardStream(out, image_size=8, seed=4, buffer=4)
    batches = iter(make_stream_loader(stream, _tokenizer, batch_size=4, num_workers=0))
    first = [next(batches) for _ in range(5)]  # 20 samples: epoch 0
    second = [next(batches) for _ in range(5)]  # epoch 1
    assert first[0]["image"].shape == (4, 3, 8, 8) and first[0]["text"].shape == (4, 1)
    epoch0 = [int(i) for b in first for i in b["index"]]
    epoch1 = [int(i) for b in second for i in b["index"]]
    assert sorted(epoch0) == sorted(epoch1) == list(range(20)) and epoch0 != epoch1
    assert stream.label_names == {"label": ["c0", "c1", "c2"]}
    sample = next(iter(ShardStream(out, image_size=8, buffer=1)))
    assert sample["labels"] == {"label": ["c0", "c1", "c2"].index(f"c{sample['index'] % 3}")}
    assert sample["caption"] in (f"thing {sample['index']}", f"item {sample['index']}")
    assert sorted(stream.all_captions()) == sorted(c for k in range(20) for c in (f"thing {k}", f"item {k}"))


def test_stream_loader_with_workers_reads_disjoint_shards(manifest, tmp_path):
    from polyalign.data.loader import make_stream_loader
    from polyalign.data.stream import ShardStream

    out = tmp_path / "s"
    write_shards(manifest, out, shard_size=10, show_progress=False)  # 2 shards: one per worker
    batches = iter(make_stream_loader(ShardStream(out, image_size=8, buffer=2), _tokenizer, batch_size=5,
                                      num_workers=2))
    seen = [int(i) for _ in range(4) for i in next(batches)["index"]]  # 2 batches of each worker's 10 samples
    assert sorted(seen) == list(range(20))
    with pytest.raises(DataError, match="cannot feed"):
        next(iter(ShardStream(out, image_size=8, world=3)))


TINY = ["model.embed_dim=16", "model.image.width=32", "model.image.layers=1", "model.text.width=32",
        "model.text.layers=1", "model.text.heads=2", "model.text.vocab_size=200", "model.text.context_length=16",
        "train.batch_size=4", "train.max_steps=3", "train.warmup_steps=1", "train.checkpoint_every=3",
        "train.threads=1", "eval.probe_max_train=16", "eval.n_examples=0", "data.image_size=16"]


def test_train_streams_from_shards(manifest, tmp_path, capsys):
    from polyalign.config import load_config
    from polyalign.errors import ConfigError

    out = tmp_path / "s"
    write_shards(manifest, out, shard_size=6, show_progress=False)
    rows = manifest.read_text().splitlines()[:20]  # the good rows: validation and test data
    (manifest.parent / "val.jsonl").write_text("\n".join(rows) + "\n")
    data = ["data.name=shards", f"data.shards={out}/{{00000..00003}}.tar", "data.shuffle_buffer=8",
            f"data.val_manifest={manifest.parent / 'val.jsonl'}", "data.cache_dir="]
    assert main(["train", RECIPE, *data, *TINY, "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["train/steps"] == 3 and "retrieval/t2i_R@1" in metrics
    capsys.readouterr()
    more = [o for o in TINY if not o.startswith("train.max_steps")] + ["train.max_steps=4"]
    assert main(["train", RECIPE, *data, *more, "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert "the stream restarts" not in capsys.readouterr().err  # the checkpoint holds the stream's position
    state = torch.load(tmp_path / "run/checkpoints/step-000004.state.pt", weights_only=False)
    assert state["stream"] == [{"n_workers": 1, "consumed": 4, "positions": {"0": [0, 16]},  # 4 batches of 4
                                "skips": [[], []]}]  # the shards hold no bad sample
    with pytest.raises(ConfigError, match="val_manifest"):
        load_config(RECIPE, ["data.name=shards", f"data.shards={out}"])
    with pytest.raises(ConfigError, match="not supported yet"):
        load_config(RECIPE, data + ["data.augment.enabled=true"])


def test_an_error_mid_write_leaves_only_finished_shards(manifest, tmp_path, monkeypatch):
    import polyalign.data.shards as shards

    calls = []

    def failing_ext(path):
        calls.append(path)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return "png"

    monkeypatch.setattr(shards, "image_ext", failing_ext)
    with pytest.raises(KeyboardInterrupt):
        write_shards(manifest, tmp_path / "s", shard_size=5, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["00000.tar"]  # no .tmp, no shards.json


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 3 workers on 2 cores: on purpose
@pytest.mark.parametrize("n_workers,consumed", [(0, 3), (0, 7), (2, 3), (2, 6), (3, 5)])
def test_a_resumed_stream_continues_exactly(manifest, tmp_path, n_workers, consumed):
    """The loader's position (per worker: epoch and samples consumed; which worker's batch comes next) continues the
    stream batch for batch, across epoch boundaries (20 samples, batches of 3: epochs end mid-batch)."""
    from polyalign.data.loader import make_stream_loader
    from polyalign.data.stream import ShardStream, StreamTracker, resume_stream

    out = tmp_path / "s"
    write_shards(manifest, out, shard_size=3, show_progress=False)  # 7 shards: every worker has some

    def loader(stream):
        return iter(make_stream_loader(stream, _tokenizer, batch_size=3, num_workers=n_workers))

    workers = max(n_workers, 1)
    full = StreamTracker(loader(ShardStream(out, image_size=8, seed=2, buffer=4)), workers)
    whole = [next(full)["index"].tolist() for _ in range(consumed + 8)]
    first = StreamTracker(loader(ShardStream(out, image_size=8, seed=2, buffer=4)), workers)
    assert [next(first)["index"].tolist() for _ in range(consumed)] == whole[:consumed]
    state = json.loads(json.dumps(first.state()))  # as a checkpoint keeps it
    stream = ShardStream(out, image_size=8, seed=2, buffer=4)
    assert resume_stream(stream, state, workers)
    again = StreamTracker(loader(stream), workers, state)
    assert [next(again)["index"].tolist() for _ in range(8)] == whole[consumed:]
    assert again.state() == full.state()  # and a second resume from there would continue the same
    assert not resume_stream(ShardStream(out, image_size=8), state, workers + 1)  # another split: not resumable


@pytest.mark.parametrize("n_workers,resumed", [(0, False), (2, False), (1, True)])
def test_training_counts_each_bad_sample_once_whatever_reader_met_it(manifest, tmp_path, n_workers, resumed):
    """Bad samples met by loader workers reach the run's metrics, each distinct sample once over epochs and workers
    (the shards are dealt to other workers each epoch: 6 epochs of 4 shards here)."""
    out = tmp_path / "s"
    write_shards(manifest, out, shard_size=5, show_progress=False)  # 4 shards of the 20 good samples
    good = io.BytesIO()
    Image.new("RGB", (9, 9), "red").save(good, "PNG")
    meta = json.dumps({"captions": ["a red square"], "labels": {}, "tags": []}).encode()
    for k, shard in enumerate(sorted(out.glob("*.tar"))):  # one corrupt image appended to each shard
        with tarfile.open(shard, "a") as tar:
            _member(tar, f"bad{k}.png", b"garbage")
            _member(tar, f"bad{k}.json", meta)
    rows = manifest.read_text().splitlines()[:20]
    (manifest.parent / "val.jsonl").write_text("\n".join(rows) + "\n")
    data = ["data.name=shards", f"data.shards={out}", "data.shuffle_buffer=4", f"data.num_workers={n_workers}",
            f"data.val_manifest={manifest.parent / 'val.jsonl'}", "data.cache_dir="]
    over = [o for o in TINY if not o.startswith(("train.max_steps", "train.checkpoint_every"))]
    over += ["train.max_steps=30", "train.checkpoint_every=15"]  # 120 samples: 6 epochs
    if resumed:  # stopped early in epoch 1 (every shard read in epoch 0), resumed for one batch (a shard or two of epoch 1 read):
        # the checkpoint keeps what the first process met
        five = over + ["train.max_steps=6", "train.checkpoint_every=6"]
        assert main(["train", RECIPE, *data, *five, "--out", str(tmp_path / "run")]) == 0
        assert json.loads((tmp_path / "run/metrics.json").read_text())["data/skipped_rows"] == 4
        six = over + ["train.max_steps=7", "train.checkpoint_every=6"]
        assert main(["train", RECIPE, *data, *six, "--out", str(tmp_path / "run"), "--resume"]) == 0
    else:
        assert main(["train", RECIPE, *data, *over, "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["data/skipped_rows"] == 4


def test_bad_samples_of_two_folders_with_the_same_shard_names_count_apart(tmp_path):
    """Shards are numbered from 00000 in every folder: a bad sample is told apart by its full path, not its file name."""
    from polyalign.data.base import DistinctSkipReport

    meta = json.dumps({"captions": ["x"], "labels": {}, "tags": []}).encode()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        with tarfile.open(tmp_path / folder / "00000.tar", "w") as tar:
            _member(tar, "k.png", b"garbage")
            _member(tar, "k.json", meta)
    report = DistinctSkipReport()
    for _ in range(2):  # two epochs: each bad sample still counts once
        list(iter_shards(str(tmp_path / "{a,b}/00000.tar"), image_size=8, report=report))
    assert report.skipped == {"corrupt image": 2}


def test_tracker_state_of_an_interrupted_step_is_the_one_before_its_batch(manifest, tmp_path):
    """An interrupt after a batch was fetched but before its step completed checkpoints the step before: the
    state for one batch fewer than handed on is the state as it was before that batch."""
    from polyalign.data.loader import make_stream_loader
    from polyalign.data.stream import ShardStream, StreamTracker

    out = tmp_path / "s"
    write_shards(manifest, out, shard_size=3, show_progress=False)
    tracker = StreamTracker(iter(make_stream_loader(ShardStream(out, image_size=8, buffer=4), _tokenizer,
                                                    batch_size=3, num_workers=0)), 1)
    next(tracker), next(tracker)
    after_two = tracker.state()
    next(tracker)
    assert tracker.state(2) == after_two and tracker.state(3) == tracker.state() != after_two
    assert tracker.state()["consumed"] == 3 and after_two["positions"] == {"0": [0, 6]}
