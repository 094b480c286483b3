"""The fusion model's settings: its validation and the schedules given as shares of the run, resolved for a run."""
from __future__ import annotations

import dataclasses

from polyalign.config.schema import FusionConfig, LossConfig, ModelConfig
from polyalign.config.tables import RANGES
from polyalign.config.tree import check_ranges
from polyalign.errors import ConfigError


def fusion_settings(model: ModelConfig, loss: LossConfig, train_steps: int = 0) -> FusionConfig:
    """``model.fusion`` with its loss weights taken from ``loss.weights`` (the one place they are set), and the
    schedules given as shares of the run resolved for a run of ``train_steps`` (0: unknown — a model built for
    evaluation, whose teacher and α never act): the momentum from ``momentum_horizon``, the α ramp's steps."""
    w, f = loss.weights, model.fusion
    momentum, ramp = fusion_schedules(f, train_steps)
    return dataclasses.replace(f, itc_weight=float(w.get("itc", 0)), itm_weight=float(w.get("itm", 0)),
                               mlm_weight=float(w.get("mlm", 0)), momentum=momentum, alpha_ramp_steps=ramp)


def fusion_schedules(f: FusionConfig, train_steps: int) -> tuple[float, int]:
    """(m per step, α ramp steps) for a run of ``train_steps``: as given when set, else from the run's length."""
    momentum = f.momentum if f.momentum > 0 else (
        max(0.0, 1.0 - 1.0 / (f.momentum_horizon * train_steps)) if f.momentum_horizon * train_steps > 0 else 0.0)
    ramp = f.alpha_ramp_steps if f.alpha_ramp_steps >= 0 else round(f.alpha_ramp * train_steps)
    return momentum, ramp


def check_fusion_config(cfg: FusionConfig, prefix: str = "model.fusion") -> None:
    """Raise ``ConfigError`` naming the ``<prefix>.<field>`` that holds an impossible value."""
    def bad(name, why):
        return ConfigError(f"{prefix}.{name} {why}, got {getattr(cfg, name)!r}")

    check_ranges(cfg, RANGES, "model.fusion")  # layers, queue, momentum, α and its ramp, mlm_prob, γ, λ, weights
    if not (cfg.itc_weight or cfg.itm_weight or cfg.mlm_weight):
        raise ConfigError(f"{prefix}: itc_weight, itm_weight and mlm_weight are all 0; nothing to train")
    lo, hi = cfg.temperature_range
    if not 0.0 < lo <= cfg.init_temperature <= hi:
        raise ConfigError(f"{prefix}: need 0 < temperature_range[0] <= init_temperature <= temperature_range[1], "
                          f"got {cfg.temperature_range!r} and {cfg.init_temperature!r}")
    if cfg.soft_mask:
        if not cfg.itm_weight:
            raise ConfigError(f"{prefix}.soft_mask needs the ITM loss (itm_weight > 0): soft masks make ITM pairs")
        if not -cfg.fusion_layers <= cfg.gradcam_layer < cfg.fusion_layers:
            raise bad("gradcam_layer", f"must index one of the {cfg.fusion_layers} fusion layers")
        if cfg.gradcam_layer % cfg.fusion_layers == cfg.fusion_layers - 1:
            raise bad("gradcam_layer", "must not be the last fusion layer (there only the [CLS] token's attention "
                      "reaches the ITM score, so every word's Grad-CAM map is 0)")

