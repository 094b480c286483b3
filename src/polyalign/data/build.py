"""Datasets from the data config."""
from __future__ import annotations

from ..config import DataConfig
from .base import ImageTextDataset


def build_datasets(cfg: DataConfig, sample_seed: int, show_progress: bool = True) -> dict[str, ImageTextDataset]:
    """``{"train": ..., "val": ..., "test": ...}`` (val/test absent when a manifest recipe gives none)."""
    if cfg.name == "shapes":
        from .shapes import ShapesDataset

        sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
        out = {split: ShapesDataset(split, n, cfg.image_size, seed=0, cache_dir=cfg.cache_dir or None)
               for split, n in sizes.items() if n > 0}
    else:
        from .manifest import ManifestDataset

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
    return out
