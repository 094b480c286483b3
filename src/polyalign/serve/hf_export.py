"""Export a trained run as a Hugging Face ``transformers`` folder: ``CLIPModel.from_pretrained(OUT)`` loads it offline.

``export_hf(RUN, OUT)`` writes the weights and ``config.json`` (``save_pretrained``), the tokenizer as a
``PreTrainedTokenizerFast`` (``AutoTokenizer.from_pretrained(OUT)``), a ``CLIPImageProcessor`` with the run's
normalisation, and ``polyalign_export.json`` (the run, the step, the measured difference). The weights map exactly
(``polyalign.models.hf_clip``: a ``vit`` image tower and a ``model.text.causal=true model.text.pool=eos`` text
transformer); our in-tower normalisation ``(x − 0.5) / 0.25`` becomes the image processor's mean/std.

A ViT with a pretrained HF text tower (MiniLM) becomes a ``VisionTextDualEncoderModel`` when its text is pooled at [CLS]
(``model.text.pool=cls``): that class pools ``tanh(dense([CLS]))``, so the export sets BERT's pooler to a near-identity
(``models.hf_clip.dual_state_dict``); a mean-pooled text tower cannot be expressed there. Towers HF has no class for
(cnn, efficientnet_*, audio, points) raise a ``PolyalignError`` pointing to ONNX.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch

from polyalign.errors import PolyalignError
from polyalign.models.encoders.image import MEAN, STD  # the in-tower normalisation
from polyalign.models.hf_clip import clip_mismatch, clip_state_dict, dual_mismatch, dual_state_dict
from polyalign.train.files import write_json

CAPTIONS = ["a red heart", "two small blue stars on a white background", "a green triangle", "x"]
TOLERANCE = 1e-5


def check_exportable(run_dir, model) -> str:
    """The transformers class the run maps onto (``CLIPModel``: ViT + our text transformer; ``VisionTextDualEncoderModel``:
    ViT + a pretrained HF text tower), or a ``PolyalignError`` pointing to ``--onnx``."""
    from polyalign.models.encoders.text import HFTextEncoder

    dual = isinstance(getattr(model, "text_encoder", None), HFTextEncoder)
    why = dual_mismatch(model) if dual else clip_mismatch(model)
    if why:
        raise PolyalignError(f"{run_dir}: cannot export as Hugging Face: {why}; export it as ONNX instead: "
                             f"polyalign export {run_dir} --onnx OUT")
    return "VisionTextDualEncoderModel" if dual else "CLIPModel"


def to_dual(cfg, model, tok):
    """A ``transformers.VisionTextDualEncoderModel`` holding the run's weights (eval mode)."""
    from transformers import CLIPVisionConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    vision = clip_config(cfg, model, tok, text=False)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        CLIPVisionConfig(**vision), model.text_encoder.model.config, projection_dim=cfg.model.embed_dim,
        logit_scale_init_value=min(max(float(model.logit_scale.detach()), 0.0), model.max_log_scale))
    dual = VisionTextDualEncoderModel(config)
    missing, unexpected = dual.load_state_dict(dual_state_dict(model), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers transformers rebuilds itself
    if missing or unexpected:
        raise PolyalignError(f"internal: the dual-encoder mapping left {missing} unset and {unexpected} unused")
    return dual.eval()


def clip_config(cfg, model, tok, text: bool = True):
    """The ``CLIPConfig`` of the run's towers (``text=False``: the vision config's fields alone)."""
    from transformers import CLIPConfig

    vit = model.image_encoder
    common = dict(hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0, projection_dim=cfg.model.embed_dim)
    vision_cfg = dict(hidden_size=vit.width, num_hidden_layers=len(vit.transformer.blocks),
                      intermediate_size=vit.transformer.blocks[0].mlp[0].out_features,
                      num_attention_heads=vit.transformer.blocks[0].heads, image_size=cfg.data.image_size,
                      patch_size=vit.patch.kernel_size[0], num_channels=3, **common)
    if not text:
        return vision_cfg
    text = model.text_encoder
    ids = {t: tok.tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]")}
    text_cfg = dict(vocab_size=tok.vocab_size, hidden_size=text.width, num_hidden_layers=len(text.transformer.blocks),
                    intermediate_size=text.transformer.blocks[0].mlp[0].out_features,
                    num_attention_heads=text.transformer.blocks[0].heads, max_position_embeddings=text.pos.shape[1],
                    pad_token_id=ids["[PAD]"], bos_token_id=ids["[CLS]"], eos_token_id=ids["[SEP]"], **common)
    scale = min(max(float(model.logit_scale.detach()), 0.0), model.max_log_scale)  # as DualEncoder.scale clamps it
    return CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=cfg.model.embed_dim,
                      logit_scale_init_value=scale)


def to_clip(cfg, model, tok):
    """A ``transformers.CLIPModel`` holding the run's weights (eval mode)."""
    from transformers import CLIPModel

    clip = CLIPModel(clip_config(cfg, model, tok))
    missing, unexpected = clip.load_state_dict(clip_state_dict(model), strict=False)
    if missing or unexpected:
        raise PolyalignError(f"internal: the CLIP mapping left {missing} unset and {unexpected} unused")
    return clip.eval()


def hf_tokenizer(tok):
    """Our tokenizer as a ``PreTrainedTokenizerFast`` (padding and truncation left to the call, as HF's are)."""
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer.from_str(tok.tok.to_str())
    raw.no_padding()
    raw.no_truncation()
    return PreTrainedTokenizerFast(tokenizer_object=raw, model_max_length=tok.context_length, pad_token="[PAD]",
                                   unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   bos_token="[CLS]", eos_token="[SEP]",
                                   model_input_names=["input_ids", "attention_mask"])


def image_processor(image_size: int):
    """A ``CLIPImageProcessor`` preparing images as ``polyalign.load`` does: shorter side to S (bicubic), centre crop,
    /255, then the tower's normalisation."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": image_size}, resample=3, do_center_crop=True,
                              crop_size={"height": image_size, "width": image_size}, do_rescale=True,
                              rescale_factor=1 / 255, do_normalize=True, image_mean=[MEAN] * 3, image_std=[STD] * 3)


def max_diff(clip, hf_tok, model, tok, image_size: int) -> dict:
    """Max |normalised HF features − polyalign embeddings| per tower, on random pixels and a few captions."""
    import torch.nn.functional as F

    images = torch.rand(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    enc = hf_tok(CAPTIONS, padding="max_length", truncation=True, max_length=tok.context_length, return_tensors="pt")
    with torch.no_grad():
        hf_img = F.normalize(clip.get_image_features(pixel_values=(images - MEAN) / STD).pooler_output, dim=-1)
        hf_txt = F.normalize(clip.get_text_features(input_ids=enc["input_ids"],
                                                    attention_mask=enc["attention_mask"]).pooler_output, dim=-1)
        ours_img, ours_txt = model.encode_image(images), model.encode_text(*tok(CAPTIONS))
    return {"image": float((hf_img - ours_img).abs().max()), "text": float((hf_txt - ours_txt).abs().max())}


def export_hf(run_dir, out, which: str = "latest") -> dict:
    """Write ``out`` (a new folder, or a previous HF export, replaced): CLIPModel + tokenizer + image processor."""
    from transformers.utils import logging as hf_logging

    from polyalign.app.runs import load_run

    hf_logging.disable_progress_bar()  # one small local write: no bars
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "polyalign_export.json").is_file():
        raise PolyalignError(f"{out} exists and is not a polyalign HF export: give a new folder")
    cfg, model, tok = load_run(run_dir, which)
    kind = check_exportable(run_dir, model)
    clip = to_clip(cfg, model, tok) if kind == "CLIPModel" else to_dual(cfg, model, tok)
    hf_tok = hf_tokenizer(tok)
    diffs = max_diff(clip, hf_tok, model, tok, cfg.data.image_size)
    if max(diffs.values()) > TOLERANCE:
        raise PolyalignError(f"internal: the HF model differs from the run by {diffs} (> {TOLERANCE})")
    from polyalign.train.checkpoint import find_checkpoint

    info = {"format": "polyalign-hf", "class": kind, "run": str(run_dir),
            "step": int(find_checkpoint(run_dir / "checkpoints", which)), "max_abs_diff": diffs,
            "logit_scale": math.exp(clip.config.logit_scale_init_value),
            "preprocessing": f"images: CLIPImageProcessor (mean {MEAN}, std {STD} after /255); text: AutoTokenizer with "
                             f"padding='max_length', truncation=True, max_length={tok.context_length}"}
    stage = out.parent / f".{out.name}.hf-export.tmp{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        clip.save_pretrained(stage)
        hf_tok.save_pretrained(stage)
        image_processor(cfg.data.image_size).save_pretrained(stage)
        write_json(stage / "polyalign_export.json", info)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return info
