"""The dataset contract every polyalign image–text dataset follows.

A dataset is a map-style ``torch.utils.data.Dataset`` over *items* (one image each, one or more captions).
Training asks for ``dataset[(epoch, index)]``; every random choice made for that sample (which caption,
augmentation) derives from ``(seed, epoch, index)`` alone, so it does not depend on worker state, worker count
or world size, and a resumed run sees exactly the same samples.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A generator determined only by (seed, epoch, index): the source of all per-sample randomness."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index])


def stable_hash(text: str) -> int:
    """A process-independent 31-bit hash (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


@dataclass
class SkipReport:
    """Rows dropped while loading a dataset, counted by reason, with the first few kept for messages."""

    total: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


class ImageTextDataset(torch.utils.data.Dataset):
    """Base class: subclasses fill the abstract accessors; ``__getitem__`` is shared.

    Subclass obligations:
      - ``__len__()``: number of items.
      - ``image(i) -> torch.uint8 tensor (3, H, W)``: the item's image, already at ``image_size``.
      - ``captions(i) -> list[str]``: all captions of item i (non-empty strings).
      - ``labels(i) -> dict[str, int]``: class index per label field (may be empty); class names in
        ``label_names[field]``.
      - ``tags(i) -> list[str]``.
      - ``seed``: int, the seed of the dataset's content (synthetic data).
      - ``skip_report``: a SkipReport (empty for synthetic data).
    """

    seed: int = 0
    sample_seed: int = 0  # per-sample randomness (caption choice, augmentation); the trainer sets train.seed
    label_names: dict[str, list[str]] = {}
    skip_report: SkipReport

    def image(self, i: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def captions(self, i: int) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def labels(self, i: int) -> dict[str, int]:
        return {}

    def tags(self, i: int) -> list[str]:
        return []

    def all_captions(self):
        """Every caption of every item (used to train the BPE tokenizer)."""
        for i in range(len(self)):
            yield from self.captions(i)

    def __getitem__(self, key) -> dict:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        rng = sample_rng(self.sample_seed, epoch, i)
        caps = self.captions(i)
        return {
            "image": self.image(i),  # (3, H, W) uint8
            "caption": caps[int(rng.integers(len(caps)))],
            "index": i,
            "labels": self.labels(i),
        }
