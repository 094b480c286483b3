"""The training objective: a weighted sum of named loss terms chosen in the config (``loss.weights``).

Each term reads the model's output dict. Adding a method = one entry in ``TERMS`` and a weight in a recipe.
A term whose weight is 0 is not computed at all.
"""
from __future__ import annotations

import difflib

import torch

from .config import LossConfig
from .errors import ConfigError
from .losses.contrastive import info_nce, local_info_nce
from .losses.tiled import tiled_info_nce


def clip_term(out: dict, cfg: LossConfig) -> torch.Tensor:
    """Symmetric image–text InfoNCE; under DDP (gathered ``*_emb_all`` present) this rank's local share."""
    a, b, scale = out["image_emb"], out["text_emb"], out["logit_scale"]
    tiled = cfg.contrastive == "tiled"
    if "image_emb_all" in out:
        return local_info_nce(a, b, out["image_emb_all"], out["text_emb_all"], scale, out["rank_offset"],
                              tiled, cfg.tile)
    return tiled_info_nce(a, b, scale, cfg.tile) if tiled else info_nce(a, b, scale)


TERMS = {  # name → f(model output dict, loss config) -> scalar
    "clip": clip_term,
}


class Objective:
    """Callable ``out → {"<name>_loss": value for each active term, "loss": weighted total}``."""

    def __init__(self, weights: dict[str, float] | LossConfig):
        self.cfg = weights if isinstance(weights, LossConfig) else LossConfig(weights=dict(weights))
        weights = self.cfg.weights
        for name in weights:
            if name not in TERMS:
                close = difflib.get_close_matches(name, TERMS, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown loss term 'loss.weights.{name}' (known: {', '.join(TERMS)}){hint}")
        self.weights = {k: float(w) for k, w in weights.items() if w != 0}
        if not self.weights:
            raise ConfigError("loss.weights: every term has weight 0; nothing to train")

    def __call__(self, out: dict) -> dict[str, torch.Tensor]:
        losses = {f"{name}_loss": TERMS[name](out, self.cfg) for name in self.weights}
        losses["loss"] = sum(self.weights[name] * losses[f"{name}_loss"] for name in self.weights)
        return losses
