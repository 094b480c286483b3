"""The configuration layer: every dataclass, its loading and its validation (imports no model, data or loss code).

``load_config(path, overrides)`` gives a validated ``Config`` (``RANGES``: the allowed values of every numeric key);
``polyalign.config.connect`` holds the config of ``polyalign connect``. Dotted-key machinery shared by both:
``polyalign.config.tree``.
"""
from polyalign.config.checks import check_augment_config, check_loss, validate
from polyalign.config.fusion import check_fusion_config, fusion_schedules, fusion_settings
from polyalign.config.load import load_config, save_config
from polyalign.config.schema import (AudioEncoderConfig, AugmentConfig, Config, DataConfig, EvalConfig, FdtConfig,
                                     FusionConfig, ImageEncoderConfig, LossConfig, MocoConfig, ModelConfig,
                                     PointsEncoderConfig, TextEncoderConfig, TrainConfig)
from polyalign.config.tables import (CHOICES, DATA_MODALITIES, FUSION_TERMS, IMAGE_TEXT_TERMS, LOSS_TERMS, RANGES)
from polyalign.config.tree import flat_items, get_key, parse_override, set_key, to_dict

__all__ = [
    "CHOICES", "DATA_MODALITIES", "FUSION_TERMS", "IMAGE_TEXT_TERMS", "LOSS_TERMS", "RANGES", "AudioEncoderConfig",
    "AugmentConfig", "Config", "DataConfig", "EvalConfig", "FdtConfig", "FusionConfig", "ImageEncoderConfig",
    "LossConfig", "MocoConfig", "ModelConfig", "PointsEncoderConfig", "TextEncoderConfig", "TrainConfig",
    "check_augment_config", "check_fusion_config", "check_loss", "flat_items", "fusion_schedules", "fusion_settings", "get_key",
    "load_config", "parse_override", "save_config", "set_key", "to_dict", "validate",
]
