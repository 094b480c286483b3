"""The training objective: a weighted sum of named loss terms chosen in the config (``loss.weights``).

Each term reads the model's output dict. Adding a method = one entry in ``TERMS`` and a weight in a recipe.
A term whose weight is 0 is not computed at all.
"""
from __future__ import annotations

import difflib
import functools

import torch

from .config import LossConfig
from .errors import ConfigError
from .losses.contrastive import info_nce, local_info_nce
from .losses.intra import local_nt_xent, moco_info_nce, nt_xent, tag_bce
from .losses.albef import itc_term, itm_term, mlm_term
from .losses.tiled import tiled_info_nce


def _pair_info_nce(out: dict, cfg: LossConfig, a_key: str, b_key: str, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between ``out[a_key]`` and ``out[b_key]`` (dense or tiled per ``cfg.contrastive``);
    under DDP (gathered ``<key>_all`` present) this rank's local share of the global-batch loss."""
    a, b, tiled = out[a_key], out[b_key], cfg.contrastive == "tiled"
    if f"{a_key}_all" in out:
        return local_info_nce(a, b, out[f"{a_key}_all"], out[f"{b_key}_all"], scale, out["rank_offset"],
                              tiled, cfg.tile)
    return tiled_info_nce(a, b, scale, cfg.tile) if tiled else info_nce(a, b, scale)


def clip_term(out: dict, cfg: LossConfig, modalities: tuple[str, str] = ("image", "text")) -> torch.Tensor:
    """Symmetric InfoNCE between the two towers' projection-head embeddings (image–text, audio–text, ...)."""
    a, b = modalities
    return _pair_info_nce(out, cfg, f"{a}_emb", f"{b}_emb", out["logit_scale"])


def fdt_term(out: dict, cfg: LossConfig) -> torch.Tensor:
    """Symmetric image–text InfoNCE on the FDT embeddings with their own logit scale (arXiv 2303.14865)."""
    return _pair_info_nce(out, cfg, "fdt_image_emb", "fdt_text_emb", out["fdt_logit_scale"])


def image_image_term(out: dict, cfg: LossConfig) -> torch.Tensor:
    """Two augmented views of each image: SimCLR NT-Xent in-batch, or MoCo (both views as queries, the other
    view's momentum key as positive, the queue as negatives)."""
    t = cfg.temperatures.get("image_image", 0.1)
    z1, z2 = out["image_view1_emb"], out["image_view2_emb"]
    if "moco_queue" in out:
        q = out["moco_queue"]
        return 0.5 * (moco_info_nce(z1, out["moco_key2_emb"], q, t) + moco_info_nce(z2, out["moco_key1_emb"], q, t))
    if "image_view1_emb_all" in out:
        return local_nt_xent(z1, z2, out["image_view1_emb_all"], out["image_view2_emb_all"], t, out["rank_offset"])
    return nt_xent(z1, z2, t)


def text_text_term(out: dict, cfg: LossConfig) -> torch.Tensor:
    """Two views of each caption (another caption of the item, or word dropout): symmetric in-batch InfoNCE."""
    a, b, scale = out["text_view1_emb"], out["text_view2_emb"], 1.0 / cfg.temperatures.get("text_text", 0.05)
    if "text_view1_emb_all" in out:
        return local_info_nce(a, b, out["text_view1_emb_all"], out["text_view2_emb_all"], scale, out["rank_offset"])
    return info_nce(a, b, scale)


def tags_term(out: dict, cfg: LossConfig) -> torch.Tensor:
    """Multi-label BCE of the image's tag scores against its tags (a per-sample mean: DDP averages it exactly)."""
    return tag_bce(out["tag_logits"], out["tag_targets"])


TERMS = {  # name → f(model output dict, loss config) -> scalar
    "clip": clip_term,
    "image_image": image_image_term,
    "text_text": text_text_term,
    "tags": tags_term,
    "fdt": fdt_term,
    "itc": itc_term,  # the fusion model's terms (polyalign.albef)
    "itm": itm_term,
    "mlm": mlm_term,
}


class Objective:
    """Callable ``out → {"<name>_loss": value for each active term, "loss": weighted total}``; ``modalities`` names
    the model's two towers (the clip term contrasts ``<first>_emb`` with ``<second>_emb``)."""

    def __init__(self, weights: dict[str, float] | LossConfig, modalities: tuple[str, str] = ("image", "text")):
        self.cfg = weights if isinstance(weights, LossConfig) else LossConfig(weights=dict(weights))
        self.modalities = tuple(modalities)
        weights = self.cfg.weights
        for name in weights:
            if name not in TERMS:
                close = difflib.get_close_matches(name, TERMS, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown loss term 'loss.weights.{name}' (known: {', '.join(TERMS)}){hint}")
        for name, t in self.cfg.temperatures.items():
            if name not in ("image_image", "text_text"):
                raise ConfigError(f"unknown key 'loss.temperatures.{name}' (known: image_image, text_text)")
            if not t > 0:
                raise ConfigError(f"loss.temperatures.{name} must be > 0, got {t}")
        self.weights = {k: float(w) for k, w in weights.items() if w != 0}
        if not self.weights:
            raise ConfigError("loss.weights: every term has weight 0; nothing to train")

    def __call__(self, out: dict) -> dict[str, torch.Tensor]:
        losses = {f"{name}_loss": self._term(name)(out, self.cfg) for name in self.weights}
        losses["loss"] = sum(self.weights[name] * losses[f"{name}_loss"] for name in self.weights)
        return losses

    def _term(self, name: str):
        """The term's function (looked up at call time); clip of a non–image-text model reads its towers' keys."""
        if name == "clip" and self.modalities != ("image", "text"):
            return functools.partial(clip_term, modalities=self.modalities)
        return TERMS[name]
