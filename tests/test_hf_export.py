"""Hugging Face export: a vit + causal text run loads offline as ``transformers.CLIPModel`` and its normalised
features equal ``polyalign.load``'s embeddings (≤ 1e-5); the tokenizer and image processor prepare inputs as ours do;
towers HF has no class for are refused, pointing to ONNX."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import polyalign
from polyalign.app.training import train
from polyalign.cli import main
from polyalign.config import load_config
from polyalign.errors import PolyalignError
from polyalign.serve.hf_export import export_hf

from conftest import TINY

transformers = pytest.importorskip("transformers")
FAST = ["train.max_steps=2", "eval.n_examples=0", "train.threads=1", "data.val_size=0"]
CLIP_TOWERS = ["model.image.kind=vit", "model.text.causal=true", "model.text.pool=eos"]
CAPTIONS = ["a red circle", "a big blue square on the left", "a small green triangle", "x", "two shapes",
            "a purple heart at the top right of a very long caption that runs past the context length"]


@pytest.fixture(scope="module", autouse=True)
def offline():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(1)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("hf") / "run"
    train(load_config(None, TINY + FAST + CLIP_TOWERS), run, show_progress=False)
    return run


@pytest.fixture(scope="module")
def exported(clip_run):
    out = clip_run.parent / "hf"
    return export_hf(clip_run, out), out


def test_clip_model_features_equal_polyalign_embeddings(clip_run, exported):
    info, out = exported
    clip = transformers.CLIPModel.from_pretrained(out, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    enc = polyalign.load(clip_run)
    s = enc.config.data.image_size
    images = torch.rand(5, 3, s, s, generator=torch.Generator().manual_seed(1))
    inputs = tok(CAPTIONS, padding="max_length", truncation=True, max_length=enc.config.model.text.context_length,
                 return_tensors="pt")
    with torch.no_grad():
        img = F.normalize(clip.get_image_features(pixel_values=(images - 0.5) / 0.25).pooler_output, dim=-1)
        txt = F.normalize(clip.get_text_features(**inputs).pooler_output, dim=-1)
    d_img = float((img - enc.encode_image(images)).abs().max())
    d_txt = float((txt - enc.encode_text(CAPTIONS)).abs().max())
    print(f"max |diff| image {d_img:.2e} text {d_txt:.2e}")
    assert d_img <= 1e-5 and d_txt <= 1e-5
    with torch.no_grad():  # the README's call: padded to the batch's longest only (causal: padding changes nothing)
        short = F.normalize(clip.get_text_features(**tok(CAPTIONS[:3], padding=True, return_tensors="pt"))
                            .pooler_output, dim=-1)
    assert torch.allclose(short, txt[:3], atol=1e-5)
    assert info["max_abs_diff"]["image"] <= 1e-5 and info["max_abs_diff"]["text"] <= 1e-5
    assert json.loads((out / "polyalign_export.json").read_text()) == info
    with torch.no_grad():  # CLIPModel's own logits use the run's (clamped) temperature
        logits = clip(pixel_values=(images - 0.5) / 0.25, **inputs).logits_per_image
    assert torch.allclose(logits, img @ txt.T * enc.model.scale(), atol=1e-4)


def test_tokenizer_and_image_processor_prepare_inputs_as_polyalign(clip_run, exported):
    _, out = exported
    enc = polyalign.load(clip_run)
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids, mask = enc.tokenizer(CAPTIONS)
    got = tok(CAPTIONS, padding="max_length", truncation=True, max_length=ids.shape[1], return_tensors="pt")
    assert torch.equal(got["input_ids"], ids) and torch.equal(got["attention_mask"].bool(), mask)
    from PIL import Image

    s = enc.config.data.image_size
    pil = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (s, s, 3), dtype=np.uint8)) for i in range(2)]
    proc = transformers.AutoImageProcessor.from_pretrained(out, local_files_only=True)
    pixels = proc(images=pil, return_tensors="pt")["pixel_values"]
    ours = torch.stack([enc.preprocess(p) for p in pil])
    assert torch.allclose(pixels, (ours - 0.5) / 0.25, atol=1e-5)


def test_cli_replaces_a_previous_export_and_refuses_a_foreign_folder(clip_run, exported, tmp_path, capsys):
    _, out = exported
    assert main(["export", str(clip_run), "--hf", str(out)]) == 0  # the same folder again: replaced
    assert "CLIPModel" in capsys.readouterr().out and (out / "config.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir() if "tmp" in p.name) == []  # no staging folder left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(PolyalignError, match="not a polyalign HF export"):
        export_hf(clip_run, foreign)
    assert (foreign / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("overrides, why", [
    (["model.image.kind=cnn"], "no class for the image tower ConvNet"),
    (["model.image.kind=vit"], "CLIPTextModel is causal"),
    (["model.image.kind=vit", "model.text.kind=hf", "model.text.hf_path=minilm", "model.text.lock=true"],
     "train with model.text.pool=cls"),  # MiniLM mean-pooled: VisionTextDualEncoderModel cannot express it
])
def test_unsupported_towers_point_to_onnx(tmp_path, overrides, why):
    run = tmp_path / "run"
    train(load_config(None, TINY + FAST + ["train.max_steps=1"] + overrides), run, show_progress=False)
    with pytest.raises(PolyalignError, match=why) as e:
        export_hf(run, tmp_path / "hf")
    assert f"polyalign export {run} --onnx OUT" in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_causal_text_tower_reads_no_later_token():
    from polyalign.models.encoders.text import TextTransformer

    torch.manual_seed(0)
    tower = TextTransformer(50, 8, 16, 2, 2, causal=True).eval()
    ids, mask = torch.randint(5, 50, (2, 8)), torch.ones(2, 8, dtype=torch.bool)
    changed = ids.clone()
    changed[:, 5:] = 7
    with torch.no_grad():
        a, b, c = tower(ids, mask), tower(changed, mask), tower(ids)  # c: no mask, is_causal
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6) and not torch.allclose(a[:, 5:], b[:, 5:])
    assert torch.allclose(a, c, atol=1e-6)


def _random_clip_dir(clip_run, tmp_path):
    """A randomly initialised CLIPModel saved locally with the run's tokenizer: (folder, model, tokenizer)."""
    from polyalign.serve.hf_export import hf_tokenizer
    from polyalign.tokenizer import Tokenizer

    tok = Tokenizer.load(clip_run / "tokenizer.json", 16)
    shared = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, hidden_act="gelu")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=tok.vocab_size, max_position_embeddings=16, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3, **shared),
        vision_config=dict(image_size=32, patch_size=8, **shared), projection_dim=16)
    torch.manual_seed(3)
    clip = transformers.CLIPModel(config).eval()  # random weights, saved locally: nothing downloaded
    hf_dir = tmp_path / "clip"
    clip.save_pretrained(hf_dir)
    hf_tokenizer(tok).save_pretrained(hf_dir)
    return hf_dir, clip, tok


def test_init_from_a_random_clip_model_gives_transformers_first_loss(clip_run, tmp_path):
    from polyalign.data.build import build_datasets
    from polyalign.data.loader import make_loader, to_model_inputs
    from polyalign.tokenizer import Tokenizer

    hf_dir, clip, tok = _random_clip_dir(clip_run, tmp_path)
    cfg = load_config(None, TINY + FAST + CLIP_TOWERS + ["train.max_steps=1", f"model.init_from=hf:{hf_dir}"])
    run = tmp_path / "run"
    train(cfg, run, show_progress=False)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r.get("step") == 1)
    loader = make_loader(build_datasets(cfg.data, cfg.train.seed, False)["train"], tok, cfg.train.batch_size,
                         cfg.train.seed, 0, 0)
    batch = to_model_inputs(next(iter(loader)))
    with torch.no_grad():
        ref = clip(input_ids=batch["text"], attention_mask=batch["text_mask"].long(),
                   pixel_values=(batch["image"] - 0.5) / 0.25, return_loss=True).loss
    print(f"first loss polyalign {first['loss']:.7f} transformers {ref.item():.7f}")
    assert abs(first["loss"] - ref.item()) <= 1e-5
    assert Tokenizer.load(run / "tokenizer.json", 16).tok.get_vocab() == tok.tok.get_vocab()  # the checkpoint's


def test_init_from_also_initialises_the_momentum_copies(clip_run, tmp_path):
    from polyalign.models.build import build_model
    from polyalign.models.hf_clip import load_clip_dir

    hf_dir, _, tok = _random_clip_dir(clip_run, tmp_path)
    cfg = load_config(None, TINY + FAST + CLIP_TOWERS + [
        f"model.init_from=hf:{hf_dir}", "loss.weights.image_image=1", "loss.image_image=moco", "model.moco.queue_size=8",
        "data.intra_augment.enabled=true", "loss.weights.text_text=1", "model.text_momentum=0.9"])
    model = build_model(cfg.model, cfg.data.image_size, tok.vocab_size, cfg.loss, [])
    key = next(iter(model.momentum.encoder.state_dict()))
    before = model.momentum.encoder.state_dict()[key].clone()
    load_clip_dir(model, hf_dir)
    for online, copy in ((model.image_encoder, model.momentum.encoder), (model.text_encoder, model.text_momentum.encoder)):
        a, b = online.state_dict(), copy.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(before, model.momentum.encoder.state_dict()[key])  # the copy did change


def test_init_from_a_folder_without_a_clip_model_is_a_config_error(tmp_path):
    from polyalign.errors import ConfigError

    with pytest.raises(ConfigError, match="model.init_from"):
        load_config(None, TINY + FAST + CLIP_TOWERS + [f"model.init_from=hf:{tmp_path}"])
    with pytest.raises(ConfigError, match="give hf:DIR"):
        load_config(None, TINY + FAST + CLIP_TOWERS + [f"model.init_from={tmp_path}"])


def test_vit_with_minilm_exports_as_a_vision_text_dual_encoder(tmp_path):
    """A ViT + MiniLM run pooled at [CLS] loads as ``VisionTextDualEncoderModel``; its normalised features equal
    ours to 1e-5 (BERT's pooler set to a near-identity: tanh(ε·h)/ε), and the saved tokenizer is MiniLM's."""
    from transformers import AutoTokenizer, VisionTextDualEncoderModel

    run = tmp_path / "run"
    over = TINY + FAST + ["model.image.kind=vit", "model.text.kind=hf", "model.text.hf_path=minilm",
                          "model.text.pool=cls", "model.text.train_layers=1", "model.text.context_length=24"]
    train(load_config(None, over), run, show_progress=False)
    info = export_hf(run, tmp_path / "hf")
    assert info["class"] == "VisionTextDualEncoderModel" and max(info["max_abs_diff"].values()) <= 1e-5
    dual = VisionTextDualEncoderModel.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    model = polyalign.load(run)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    enc = tok(CAPTIONS, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        image = dual.get_image_features(pixel_values=(images - 0.5) / 0.25)
        text = dual.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    ours_image, ours_text = model.encode_image(images), model.encode_text(CAPTIONS)
    assert torch.allclose(F.normalize(image, dim=-1), torch.as_tensor(ours_image), atol=1e-5)
    assert torch.allclose(F.normalize(text, dim=-1), torch.as_tensor(ours_text), atol=1e-5)
