"""Datasets from the data config."""
from __future__ import annotations

from polyalign.config import DataConfig
from polyalign.errors import ConfigError


def build_datasets(cfg: DataConfig, sample_seed: int, show_progress: bool = True) -> dict:
    """``{"train": ..., "val": ..., "test": ...}`` (val/test absent when a manifest recipe gives none, or a
    synthetic split has size 0). Which modalities each dataset's samples carry: ``config.DATA_MODALITIES``."""
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    if cfg.name == "shapes":
        from polyalign.data.shapes import ShapesDataset

        out = {split: ShapesDataset(split, n, cfg.image_size, seed=cfg.seed, cache_dir=cfg.cache_dir or None)
               for split, n in sizes.items() if n > 0}
    elif cfg.name == "shapes_clutter":
        from polyalign.data.shapes_clutter import MIN_IMAGE_SIZE, ShapesClutterDataset

        lo, hi = cfg.clutter_objects
        if lo > hi:
            raise ConfigError(f"data.clutter_objects must be [min, max] with min <= max, got "
                              f"{list(cfg.clutter_objects)}")
        if cfg.image_size < MIN_IMAGE_SIZE:
            raise ConfigError(f"data.image_size must be >= {MIN_IMAGE_SIZE} for data.name=shapes_clutter (64 "
                              f"recommended: its objects are small), got {cfg.image_size}")
        out = {split: ShapesClutterDataset(split, n, cfg.image_size, seed=cfg.seed, cache_dir=cfg.cache_dir or None,
                                           objects=(lo, hi), share=cfg.clutter_share)
               for split, n in sizes.items() if n > 0}
    elif cfg.name == "shapes_audio":
        from polyalign.data.audio import ShapesAudio

        out = {split: ShapesAudio(split, n, seed=cfg.seed) for split, n in sizes.items() if n > 0}
    elif cfg.name == "shapes3d":
        from polyalign.data.points import Shapes3D

        out = {split: Shapes3D(split, n, seed=cfg.seed, n_points=cfg.n_points, image_size=cfg.image_size,
                               views=cfg.views, cache_dir=cfg.cache_dir or None)
               for split, n in sizes.items() if n > 0}
    elif cfg.name == "speech":
        from polyalign.data.audio import SpeechManifest

        train = SpeechManifest(cfg.train_manifest, max_bad_fraction=cfg.max_bad_fraction, label_fields=cfg.label_fields)
        out = {"train": train}
        for split, path in (("val", cfg.val_manifest), ("test", cfg.test_manifest)):
            if path:
                out[split] = SpeechManifest(path, max_bad_fraction=cfg.max_bad_fraction,
                                            label_fields=cfg.label_fields, label_names=train.label_names)
    else:  # a manifest, or streamed shards (data.name=shards); val and test are manifests either way
        from polyalign.data.manifest import ManifestDataset

        if cfg.name == "shards":
            from polyalign.data.stream import ShardStream

            train = ShardStream(cfg.shards, cfg.image_size, seed=sample_seed, buffer=cfg.shuffle_buffer)
        else:
            train = ManifestDataset(cfg.train_manifest, cfg.image_size, max_bad_fraction=cfg.max_bad_fraction,
                                    show_progress=show_progress, label_fields=cfg.label_fields)
        out = {"train": train}
        for split, path in (("val", cfg.val_manifest), ("test", cfg.test_manifest)):
            if path:
                out[split] = ManifestDataset(path, cfg.image_size, max_bad_fraction=cfg.max_bad_fraction,
                                             label_names=train.label_names, show_progress=show_progress,
                                             label_fields=cfg.label_fields)
    for ds in out.values():
        ds.sample_seed = sample_seed
    if cfg.caption_fraction < 1:  # the low-label regime: captions and tags of the other training items are hidden
        from polyalign.data.base import captioned_items

        out["train"].captioned = captioned_items(len(out["train"]), cfg.caption_fraction, sample_seed)
    if cfg.audio_augment and hasattr(out["train"], "augment") and cfg.name in ("shapes_audio", "speech"):
        from polyalign.data.audio import AudioAugment

        out["train"].augment = AudioAugment()
    if cfg.points_augment and cfg.name == "shapes3d":
        from polyalign.data.points import PointAugment

        out["train"].augment = PointAugment()
    return out
