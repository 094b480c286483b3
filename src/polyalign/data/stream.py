"""Training samples streamed from tar shards (``data/shards.py``): an endless ``IterableDataset`` whose samples have
the form map-style datasets give (``image``, ``caption``, ``index``, ``labels``), so ``loader.Collator`` batches them.

Epoch e reads this rank's shards of ``iter_shards(seed, e, ...)``, split again across the DataLoader's workers.
Per-sample randomness (the caption chosen) derives from (sample_seed, epoch, index) as in ``data/base.py``. Not yet
here: a resumable position (shard, offset, buffer) for exact resume, augmentation and the intra-modal views.
"""
from __future__ import annotations

import torch

from polyalign.data.base import SkipReport, sample_rng, stable_hash
from polyalign.data.shards import INDEX, iter_shards, read_index, shard_paths
from polyalign.errors import DataError


class ShardStream(torch.utils.data.IterableDataset):
    """Endless samples of ``shards`` (a pattern with braces, a folder, ``shards.json`` or a list) for one rank, from
    epoch ``start_epoch`` on. ``label_names`` {field: classes} defaults to the ``shards.json`` beside the shards.
    Skipped samples are counted in ``skip_report`` (of this process: a DataLoader worker keeps its own)."""

    def __init__(self, shards, image_size: int = 48, seed: int = 0, buffer: int = 1000, rank: int = 0,
                 world: int = 1, label_names: dict[str, list[str]] | None = None, start_epoch: int = 0):
        self.paths = shard_paths(shards)
        self.image_size, self.seed, self.buffer, self.rank, self.world = image_size, seed, buffer, rank, world
        self.start_epoch, self.sample_seed, self.skip_report = start_epoch, 0, SkipReport()
        if label_names is None:
            index = self.paths[0].parent / INDEX
            label_names = read_index(index).get("label_names", {}) if index.is_file() else {}
        self.label_names = label_names
        self._class = {name: {c: k for k, c in enumerate(classes)} for name, classes in label_names.items()}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if len(self.paths) < self.world * n_workers:  # a reader without shards would wait forever
            raise DataError(f"{len(self.paths)} shards cannot feed {self.world} rank(s) × {n_workers} worker(s): "
                            "write smaller shards (--shard-size) or use fewer data.num_workers")
        epoch = self.start_epoch
        while True:
            n = 0
            for s in iter_shards(self.paths, self.seed, epoch, self.rank, self.world, worker, n_workers,
                                 self.buffer, self.image_size, self.skip_report):
                n += 1
                yield self._sample(s, epoch)
            if n == 0:
                raise DataError(f"no usable samples in this reader's shards of epoch {epoch} "
                                f"(skipped: {dict(self.skip_report.skipped)})")
            epoch += 1

    def _sample(self, s: dict, epoch: int) -> dict:
        """A shard sample → the training sample of the dataset contract."""
        index = int(s["key"]) if s["key"].isdigit() else stable_hash(s["key"])
        caps = s["captions"]
        caption = caps[int(sample_rng(self.sample_seed, epoch, index).integers(len(caps)))]
        labels = {name: self._class[name][c] for name, c in s["labels"].items()
                  if c in self._class.get(name, {})}
        return {"image": s["image"], "caption": caption, "index": index, "labels": labels}

    def all_captions(self):
        """Every caption of every sample, in a fixed order (for training the BPE tokenizer); images are not decoded."""
        for s in iter_shards(self.paths, buffer=1, image_size=None, report=SkipReport()):
            yield from s["captions"]
