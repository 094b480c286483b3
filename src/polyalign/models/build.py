"""The one builder: encoders and heads from the config (literal choices, no registry), handed ready-built to the
model constructors. The fusion terms (itc, itm, mlm) build the fusion model; every other term the dual encoder."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from polyalign.config import FUSION_TERMS, LossConfig, ModelConfig, fusion_settings
from polyalign.errors import ConfigError
from polyalign.models.dual import DualEncoder, IntraHeads
from polyalign.models.encoders.audio import AudioCNN
from polyalign.models.encoders.efficientnet import EfficientNetLite
from polyalign.models.encoders.image import ConvNet, ViT
from polyalign.models.encoders.points import PointNet
from polyalign.models.encoders.text import HFTextEncoder, TextTransformer
from polyalign.models.fusion import FusionModel
from polyalign.models.heads.bert_fusion import bert_fusion_encoder
from polyalign.models.heads.fdt import FDTHead
from polyalign.models.heads.momentum import MomentumEncoder, MomentumTower
from polyalign.models.heads.projection import MLPHead, ProjectionHead, TokenMaxHead
from polyalign.models.interface import Model


def build_encoder(cfg: ModelConfig, modality: str, image_size: int, vocab_size: int, keep_layers: int = 0) -> nn.Module:
    """One tower's encoder from its config section: input → tokens (B, N, width). ``keep_layers`` > 0 (an HF text
    tower): only its first layers, the rest handed over as ``upper_layers`` (ALBEF's split, for the fusion model)."""
    if modality == "image":
        ic = cfg.image
        if ic.kind == "vit":
            return ViT(image_size, ic.patch_size, ic.width, ic.layers, ic.heads, ic.mlp_ratio, ic.dropout)
        if ic.kind.startswith("efficientnet_"):
            return EfficientNetLite(ic.kind, pretrained=True, lock=ic.lock, train_blocks=ic.train_blocks, cache=ic.cache)
        return ConvNet(ic.width, ic.layers)
    if modality == "text":
        tc = cfg.text
        if tc.kind == "hf":
            return HFTextEncoder(tc.hf_path, tc.lock, tc.cache, tc.train_layers, keep_layers)
        if keep_layers:
            raise ConfigError("model.fusion.text_split needs a pretrained BERT-like text tower (model.text.kind=hf)")
        return TextTransformer(vocab_size, tc.context_length, tc.width, tc.layers, tc.heads, tc.mlp_ratio, tc.dropout,
                               tc.causal)
    if modality == "audio":
        return AudioCNN(cfg.audio.width, cfg.audio.layers, n_mels=cfg.audio.n_mels, hop=cfg.audio.hop)
    if modality == "points":
        pc = cfg.points
        return PointNet(pc.width, pc.groups, pc.k, pc.hidden)
    raise ConfigError(f"unknown modality {modality!r} (image | text | audio | points)")


def build_intra_heads(cfg: ModelConfig, loss: LossConfig, image_encoder: nn.Module, text_encoder: nn.Module,
                      image_pool: str, text_pool: str, tag_names: list[str]) -> IntraHeads:
    """The heads of the active intra-modal terms: image_image (MLP head; moco: plus a momentum encoder and queue),
    text_text (MLP head), tags (a linear classifier over ``tag_names``, the training data's vocabulary)."""
    terms, heads = loss.active(), IntraHeads()
    if "image_image" in terms:
        heads.image = MLPHead(image_encoder.width, cfg.intra_dim, image_pool)
        if loss.image_image == "moco":
            heads.momentum = MomentumEncoder(image_encoder, heads.image, cfg.intra_dim, cfg.moco.queue_size,
                                             cfg.moco.momentum, cfg.moco.shuffle_bn)
    if "text_text" in terms:
        heads.text = MLPHead(text_encoder.width, cfg.intra_dim, text_pool)
        if cfg.text_momentum > 0:  # MCT's momentum text encoder: the second caption view's embeddings
            heads.text_momentum = MomentumTower(text_encoder, heads.text, cfg.text_momentum)
    if "tags" in terms:
        if not tag_names:
            raise ConfigError("loss.weights.tags > 0 but the training data has no tag seen on at least "
                              "data.tag_min_count items: lower data.tag_min_count or drop the term")
        heads.tags, heads.tag_names = nn.Linear(image_encoder.width, len(tag_names)), list(tag_names)
    return heads


def build_fdt_head(cfg: ModelConfig, image_width: int, text_width: int) -> FDTHead:
    """The FDT head: a codebook shared by both modalities, a query MLP per modality, its own logit scale that
    starts at CLIP's initial one (clamped to its range)."""
    f = cfg.fdt
    clip_scale = math.exp(torch.tensor(math.log(1.0 / cfg.init_temperature)).item())  # as the float32 parameter
    return FDTHead(image_width, text_width, f.codebook_size, f.dim or cfg.embed_dim, fdt_temperature(f), f.norm,
                   f.pool, f.chunk, clip_scale, f.logit_scale_range, f.anneal, f.anneal_steps)


AUTHORS_CODEBOOK = 16384  # the codebook size of the FDT paper's t_fdt = 1,000 (CC3M)


def fdt_temperature(f) -> float:
    """T_fdt at construction: ``t_fdt``, or with ``t_fdt_auto=scaled`` ``t_fdt · C / 16,384``. (``active``
    starts from ``t_fdt`` too; the trainer calibrates it on the first batch.)"""
    return f.t_fdt * f.codebook_size / AUTHORS_CODEBOOK if f.t_fdt_auto == "scaled" else f.t_fdt


def build_model(cfg: ModelConfig, image_size: int, vocab_size: int, loss: LossConfig | None = None,
                tag_names: list[str] = (), special_ids: dict[str, int] | None = None, train_steps: int = 0,
                function_ids=()) -> Model:
    """Encoders (of ``cfg.modalities``) and the heads of the terms with nonzero weight in ``loss`` (tags need the
    training data's ``tag_names``); the fusion terms build the ``FusionModel`` on the same encoders
    (``special_ids``: the tokenizer's ``{"[MASK]": id, ...}``, for MLM; ``train_steps``: the run's length, which the
    fusion teacher's momentum and α ramp scale with when given as shares of the run; ``function_ids``: token ids the
    soft mask never draws, ``polyalign.tokenizer.function_word_ids``)."""
    terms = loss.active() if loss else set()
    if terms & set(FUSION_TERMS):
        if special_ids is None:
            raise ConfigError("the fusion model needs the tokenizer's special token ids (build_model(special_ids=...))")
        image_encoder = build_encoder(cfg, "image", image_size, vocab_size)
        text_encoder = build_encoder(cfg, "text", image_size, vocab_size, keep_layers=cfg.fusion.text_split)
        settings, fusion = fusion_settings(cfg, loss, train_steps), None
        if cfg.fusion.text_split:  # ALBEF's split: the text tower's upper layers + new cross-attention
            fusion = bert_fusion_encoder(text_encoder, image_encoder.width, settings.dropout)
            settings = dataclasses.replace(settings, fusion_layers=len(fusion.blocks),
                                           fusion_heads=fusion.blocks[0].heads)
        return FusionModel(image_encoder, text_encoder, settings, vocab_size, special_ids, fusion_encoder=fusion,
                           function_ids=function_ids)
    encoders = tuple(build_encoder(cfg, m, image_size, vocab_size) for m in cfg.modalities)
    pools = [getattr(cfg, m).pool or e.pool for m, e in zip(cfg.modalities, encoders)]
    if cfg.inter_head == "max":  # FDT's max pooling without the codebook (image patches only: no [CLS])
        heads = tuple(TokenMaxHead(e.width, cfg.embed_dim, p, skip_first=getattr(e, "has_cls", False))
                      for e, p in zip(encoders, pools))
    else:
        mlp = cfg.inter_head == "mlp"
        heads = tuple(ProjectionHead(e.width, cfg.embed_dim, p, mlp) for e, p in zip(encoders, pools))
    intra, fdt = None, None
    if cfg.modalities == ("image", "text") and loss is not None:
        intra = build_intra_heads(cfg, loss, *encoders, *pools, list(tag_names))
        if "fdt" in terms:
            fdt = build_fdt_head(cfg, encoders[0].width, encoders[1].width)
    return DualEncoder(encoders, heads, cfg.modalities, cfg.init_temperature, cfg.max_logit_scale, intra, fdt,
                       clip_on=loss is None or "clip" in terms)
