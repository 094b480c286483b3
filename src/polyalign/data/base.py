"""The dataset contract every polyalign image–text dataset follows.

A dataset is a map-style ``torch.utils.data.Dataset`` over *items* (one image each, one or more captions).
Training asks for ``dataset[(epoch, index)]``; every random choice made for that sample (which caption,
augmentation) derives from ``(seed, epoch, index)`` alone, so it does not depend on worker state, worker count
or world size, and a resumed run sees exactly the same samples.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from polyalign.data.augment import AugmentConfig, augment_image
from polyalign.data.tags import multi_hot


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A generator determined only by (seed, epoch, index): the source of all per-sample randomness."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index])


def intra_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of the image_image views when they have their own pipeline (``data.intra_augment``):
    independent of ``sample_rng``, so neither pipeline's settings move the other's draws."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index, 1])


def captioned_items(n: int, fraction: float, seed: int) -> np.ndarray | None:
    """(n,) bool: the items that keep their captions and tags, ``round(fraction · n)`` of them (at least one), drawn
    from ``seed`` alone; None when ``fraction`` is 1 (every item)."""
    if fraction >= 1.0:
        return None
    keep = np.zeros(n, dtype=bool)
    keep[np.random.default_rng([seed & 0xFFFFFFFF, 0xCA9]).permutation(n)[:max(1, round(fraction * n))]] = True
    return keep


def concept_partners(dataset) -> list[np.ndarray]:
    """For each item, the other items of its ``concept_id`` (the emoji data: the same concept in the other styles);
    empty for an item without one (every item of a dataset without a ``concept_id`` accessor). Where items have a
    ``style``, a partner is of another style than the item (never a second copy in its own style)."""
    concept = getattr(dataset, "concept_id", lambda i: None)
    style = getattr(dataset, "style", lambda i: None)
    ids, styles = [concept(i) for i in range(len(dataset))], [style(i) for i in range(len(dataset))]
    members: dict[str, list[int]] = {}
    for i, c in enumerate(ids):
        if c is not None:
            members.setdefault(c, []).append(i)
    return [np.array([j for j in members[c] if j != i and (styles[i] is None or styles[j] != styles[i])]
                     if c is not None else [], dtype=np.int64) for i, c in enumerate(ids)]


def stable_hash(text: str) -> int:
    """A process-independent 31-bit hash (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


@dataclass
class Views:
    """Extra per-sample inputs for intra-modal objectives (MCT): an augmented image (``augment``), a second
    augmented view (``image_views=2``), a second caption view (``text_views=2``), multi-hot tags (``tag_index``).
    ``intra_augment``: both image views get this pipeline (and their own random stream), the caption-paired image
    keeps ``augment``. ``partners[i]``: items whose image may serve as item i's second view (none: its own)."""

    augment: AugmentConfig | None = None
    intra_augment: AugmentConfig | None = None
    partners: list | None = None
    image_views: int = 1
    text_views: int = 1
    word_drop: float = 0.15
    tag_index: dict[str, int] | None = None


def second_caption(caps: list[str], chosen: int, rng: np.random.Generator, word_drop: float) -> str:
    """Another caption of the item when it has one; else the chosen caption with each word dropped with
    probability ``word_drop`` (at least one word kept)."""
    if len(caps) > 1:
        j = int(rng.integers(len(caps) - 1))
        return caps[j + (j >= chosen)]
    words = caps[chosen].split()
    keep = [w for w in words if rng.random() >= word_drop]
    return " ".join(keep) if keep else words[int(rng.integers(len(words)))]


@dataclass
class SkipReport:
    """Rows dropped while loading a dataset, counted by reason, with the first few kept for messages."""

    total: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str, detail: str = "", identity: str | None = None) -> None:
        """Count one row dropped for ``reason``; ``detail`` (this row's specifics) goes only into the examples
        (``identity``: what tells the row apart, for ``DistinctSkipReport``; unused here)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass
class DistinctSkipReport(SkipReport):
    """A ``SkipReport`` that counts each row once however often it is met (a stream re-reads its bad samples every
    epoch); ``seen`` maps each row's identity (its ``where``, or the full path given) to its reason."""

    seen: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, where: str, detail: str = "", identity: str | None = None) -> None:
        """As ``SkipReport.skip``, once per ``identity`` (default: ``where``)."""
        key = where if identity is None else identity
        if key not in self.seen:
            self.seen[key] = reason
            super().skip(reason, where, detail)


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
    views: Views | None = None  # what training samples carry besides (image, caption); set by the trainer
    sample_seed: int = 0  # per-sample randomness (caption choice, augmentation); the trainer sets train.seed
    captioned: np.ndarray | None = None  # (len,) bool: items that keep captions and tags (None: all); training only
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
        """Every caption of every captioned item (used to train the BPE tokenizer)."""
        for i in range(len(self)):
            if self.captioned is None or self.captioned[i]:
                yield from self.captions(i)
    def __getitem__(self, key) -> dict:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        rng = sample_rng(self.sample_seed, epoch, i)
        caps = self.captions(i)
        c = int(rng.integers(len(caps)))
        sample = {
            "image": self.image(i),  # (3, H, W) uint8
            "caption": caps[c],
            "index": i,
            "labels": self.labels(i),
        }
        hidden = self.captioned is not None and not self.captioned[i]
        if self.captioned is not None:  # a captionless item's caption (and tags) are never read: "" stands in
            sample["captioned"], sample["caption"] = not hidden, "" if hidden else sample["caption"]
        v = self.views
        if v is None:
            return sample
        image = sample["image"]
        if v.augment is not None and v.augment.enabled:
            sample["image"] = augment_image(image, rng, v.augment)
        if v.image_views == 2:
            self._image_views(sample, image, i, epoch, rng, v)
        if v.text_views == 2:
            sample["caption_view2"] = "" if hidden else second_caption(caps, c, rng, v.word_drop)
        if v.tag_index is not None:
            sample["tags"] = multi_hot([] if hidden else self.tags(i), v.tag_index)
        return sample

    def _image_views(self, sample: dict, image: torch.Tensor, i: int, epoch: int, rng, v: Views) -> None:
        """The image_image views: with ``intra_augment`` both new (``image_view1``, ``image_view2``, their own stream),
        else ``image_view2`` beside the caption-paired image; the second from a partner item when there is one."""
        if v.intra_augment is not None:
            rng = intra_rng(self.sample_seed, epoch, i)
        other = image
        if v.partners is not None and len(v.partners[i]):
            other = self.image(int(v.partners[i][rng.integers(len(v.partners[i]))]))
        if v.intra_augment is not None:
            sample["image_view1"] = augment_image(image, rng, v.intra_augment)
            sample["image_view2"] = augment_image(other, rng, v.intra_augment)
        else:
            sample["image_view2"] = other if v.augment is None else augment_image(other, rng, v.augment)


def cached_array(cache: Path | None, make: Callable[[], np.ndarray]) -> np.ndarray:
    """``make()``, or the array saved at ``cache`` by an earlier call (written atomically; None: no cache)."""
    if cache is None:
        return make()
    if cache.exists():
        return np.load(cache)
    array = make()
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".tmp", delete=False) as f:
        np.save(f, array)
    os.replace(f.name, cache)
    return array
