"""Audio and point-cloud towers wired into training: config checks, batches, tiny CLAP/ULIP runs, evaluation,
embedding export for ``polyalign connect``."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from polyalign.cli import main
from polyalign.config import load_config
from polyalign.data.loader import Collator
from polyalign.errors import ConfigError
from polyalign.models.build import build_model
from polyalign.losses.objective import Objective
from polyalign.losses.contrastive import info_nce
from polyalign.tokenizer import Tokenizer
from polyalign.app.training import train
from polyalign.data.loader import to_model_inputs

SMALL = ["model.audio.width=32", "model.audio.layers=2", "model.audio.n_mels=32", "model.points.width=32",
         "model.points.groups=8", "model.points.k=8", "model.points.hidden=16", "data.n_points=128", "data.views=2",
         "train.threads=1"]


def _tiny(tiny_overrides, *extra):
    return load_config(None, tiny_overrides + SMALL + list(extra))


@pytest.mark.parametrize("over, match", [
    (["model.modalities=[text,image]"], "model.modalities must be"),
    (["model.modalities=[image,image]"], "model.modalities must be"),
    (["model.modalities=[audio,text]"], "provides image, text, not audio"),
    (["data.name=shapes_audio", "model.modalities=[audio,text]", "loss.weights.text_text=1"], "need model.modalities"),
    (["data.name=speech"], "needs data.train_manifest"),
])
def test_config_rejects_impossible_modalities(over, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, over)


def test_image_text_model_keeps_its_parameter_names_and_order():
    """Checkpoints and the optimiser's state of image–text runs from before the modalities were named still load."""
    model = build_model(load_config(None, ["model.image.layers=1", "model.text.layers=1"]).model, 32, 50)
    prefixes = list(dict.fromkeys(n.split(".")[0] for n, _ in model.named_parameters()))
    assert prefixes == ["logit_scale", "image_encoder", "text_encoder", "image_head", "text_head"]


def test_collator_pads_audio_and_stacks_points():
    tok = Tokenizer.train(["a red circle", "a cube"], 60, 8)
    samples = [{"audio": torch.ones(5), "caption": "a red circle", "index": 0, "labels": {}},
               {"audio": torch.ones(3), "caption": "a cube", "index": 1, "labels": {}}]
    batch = Collator(tok)(samples)
    assert batch["audio"].shape == (2, 5) and batch["audio_mask"].sum(1).tolist() == [5, 3]
    assert batch["audio"][1, 3:].abs().sum() == 0 and batch["text"].shape[0] == 2 and "image" not in batch
    points = Collator(tok)([{"points": torch.zeros(7, 3), "image": torch.zeros(3, 4, 4, dtype=torch.uint8),
                             "caption": "a cube", "index": i, "labels": {}} for i in range(3)])
    assert points["points"].shape == (3, 7, 3) and points["image"].shape == (3, 3, 4, 4)


def test_clip_term_contrasts_the_named_towers(tiny_overrides):
    cfg = _tiny(tiny_overrides, "data.name=shapes_audio", "model.modalities=[audio,text]")
    from polyalign.data.build import build_datasets
    ds = build_datasets(cfg.data, 0)["train"]
    tok = Tokenizer.train(ds.all_captions(), 200, 16)
    model = build_model(cfg.model, 32, tok.vocab_size, cfg.loss)
    out = model(to_model_inputs(Collator(tok)([ds[(0, i)] for i in range(6)])))
    assert out.fields_set() == {"first_emb", "second_emb", "logit_scale"} and out.first_emb.shape == (6, 16)
    assert model.modalities == ("audio", "text")  # first: the audio tower
    loss = Objective(cfg.loss, cfg.model.modalities)(out)["clip_loss"]
    assert torch.allclose(loss, info_nce(out.first_emb, out.second_emb, out.logit_scale))


@pytest.mark.parametrize("name, extra, keys", [
    ("clap", ["data.name=shapes_audio", "model.modalities=[audio,text]"],
     {"retrieval/t2a_R@1", "retrieval/a2t_R@10", "zeroshot/shape_acc", "probe/shape_acc"}),
    ("ulip", ["data.name=shapes3d", "model.modalities=[points,image]", "data.points_augment=true"],
     {"retrieval/i2p_R@1", "retrieval/p2i_R@10", "probe/shape_acc"}),
    ("clip3d", ["data.name=shapes3d", "model.modalities=[image,text]"],
     {"retrieval/t2i_R@1", "zeroshot/shape_acc"}),
])
def test_tiny_runs_train_evaluate_and_reload(tmp_path, tiny_overrides, capsys, name, extra, keys):
    cfg = _tiny(tiny_overrides, *extra, "train.max_steps=30", "train.checkpoint_every=30")
    run = tmp_path / name
    metrics = train(cfg, run, show_progress=False)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert np.mean([r["loss"] for r in rows[-5:]]) < np.mean([r["loss"] for r in rows[:5]])  # it learns
    assert keys <= set(metrics), sorted(metrics)
    if "zeroshot/shape_acc" not in keys:
        assert not any(k.startswith("zeroshot/") for k in metrics)  # no text tower, no zero-shot
    assert main(["eval", str(run)]) == 0  # `polyalign eval` rebuilds the towers from the saved config
    printed = json.loads(capsys.readouterr().out)
    for key in keys:
        assert printed[key] == pytest.approx(metrics[key], abs=1e-6), key


def _speech_manifest(folder, n=24):
    """A tiny speech.jsonl: two 'words' as tones of different pitch and length, with labels."""
    (folder / "audio").mkdir(parents=True)
    rows = []
    for i in range(n):
        word = ("low hum", "high beep")[i % 2]
        t = np.arange(int(16000 * (0.3 + 0.2 * (i % 2)))) / 16000
        sf.write(folder / f"audio/{i}.wav", 0.3 * np.sin(2 * np.pi * (200 + 600 * (i % 2)) * t), 16000)
        rows.append({"audio": f"audio/{i}.wav", "caption": word, "label": word.split()[1], "concept_id": f"c{i}"})
    (folder / "speech.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "speech.jsonl"


def test_speech_run_and_export_feed_connect(tmp_path, tiny_overrides):
    manifest = _speech_manifest(tmp_path / "speech")
    clap = tmp_path / "clap"
    cfg = _tiny(tiny_overrides, "data.name=speech", f"data.train_manifest={manifest}", f"data.test_manifest={manifest}",
                "model.modalities=[audio,text]", "train.batch_size=8", "train.max_steps=6", "data.audio_augment=true",
                "eval.templates={label: ['{}']}")
    metrics = train(cfg, clap, show_progress=False)
    assert "retrieval/a2t_R@1" in metrics and "zeroshot/label_acc" in metrics

    out = tmp_path / "emb"
    assert main(["embed", str(clap), "--modality", "audio", "--manifest", str(manifest), "--id-field", "concept_id",
                 "--label-field", "label", "--out", str(out / "audio")]) == 0
    emb = np.load(out / "audio.npy")
    ids = (out / "audio.ids.txt").read_text().split()
    assert emb.shape == (24, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert ids[:2] == ["c0", "c1"] and (out / "audio.labels.txt").read_text().split()[:2] == ["hum", "beep"]
    # the same rows through the run's own evaluation path give the same embeddings
    from polyalign.data.audio import SpeechManifest
    from polyalign.eval.embed import embed_items
    from polyalign.app.runs import load_run
    _, model, _ = load_run(clap)
    assert np.allclose(emb, embed_items(model, SpeechManifest(manifest), "audio").numpy(), atol=1e-5)

    # texts in two "spaces" (here the same run twice) join by id; a connect run reads every exported file
    (tmp_path / "texts.txt").write_text("low hum\nhigh beep\nlow hum\n")
    for name in ("b_x", "b_y"):
        assert main(["embed", str(clap), "--modality", "text", "--texts", str(tmp_path / "texts.txt"),
                     "--out", str(out / name)]) == 0
    assert (out / "b_x.ids.txt").read_text() == "low hum\nhigh beep\n"
    assert main(["embed", str(clap), "--modality", "text", "--classes", "label", "--manifest", str(manifest),
                 "--out", str(out / "classes")]) == 0
    assert sorted((out / "classes.ids.txt").read_text().split()) == ["beep", "hum"]
    (tmp_path / "connect.yaml").write_text(
        "inputs: {b_x: emb/b_x.npy, b_y: emb/b_y.npy, memory_a: emb/audio.npy, memory_c: emb/audio.npy}\n"
        "eval: {a_test: emb/audio.npy, c_test: emb/audio.npy, classes: emb/classes.npy, items: emb/audio.npy,\n"
        "       labels: emb/audio.labels.txt}\n"
        "train: {batch_size: 2, epochs: 2}\n")
    assert main(["connect", str(tmp_path / "connect.yaml"), "--out", str(tmp_path / "connected")]) == 0
    result = json.loads((tmp_path / "connected" / "metrics.json").read_text())
    assert {"connected/c2a_R@1", "pivot/c2a_R@1", "connected/classify_acc"} <= set(result)


def test_embed_rejects_a_tower_the_run_lacks(tmp_path, tiny_overrides):
    run = tmp_path / "ulip"
    train(_tiny(tiny_overrides, "data.name=shapes3d", "model.modalities=[points,image]", "train.max_steps=2",
                "data.val_size=0"), run, show_progress=False)
    from polyalign.app.export import export_embeddings
    with pytest.raises(ConfigError, match="not text"):
        export_embeddings(run, "text", tmp_path / "x", split="test")
    info = export_embeddings(run, "points", tmp_path / "p", split="test", overrides=["data.seed=3"],
                             label_field="shape")
    assert info["rows"] == 96 and len((tmp_path / "p.labels.txt").read_text().split()) == 96
