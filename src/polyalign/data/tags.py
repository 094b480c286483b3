"""Tag vocabularies and multi-hot tag targets (for the tags loss term and the tagging evaluation)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch


def tag_vocabulary(tag_lists: Iterable[list[str]], min_count: int = 5, max_tags: int = 1000) -> list[str]:
    """Tags on at least ``min_count`` items, most frequent first (ties alphabetical), at most ``max_tags``."""
    counts = Counter(t for tags in tag_lists for t in set(tags))  # each tag once per item
    ranked = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return ranked[:max_tags]


def multi_hot(tags: list[str], index: dict[str, int]) -> torch.Tensor:
    """(T,) float32 with 1 at ``index[t]`` for each tag ``t`` in the vocabulary; other tags are ignored."""
    out = torch.zeros(len(index), dtype=torch.float32)
    hits = [index[t] for t in tags if t in index]
    if hits:
        out[hits] = 1.0
    return out


def tag_matrix(dataset, vocab: list[str], indices: Iterable[int] | None = None) -> torch.Tensor:
    """(N, T) float32 multi-hot tags of the dataset's items (all of them, or ``indices``) over ``vocab``."""
    index = {t: k for k, t in enumerate(vocab)}
    indices = range(len(dataset)) if indices is None else indices
    rows = [multi_hot(dataset.tags(int(i)), index) for i in indices]
    return torch.stack(rows) if rows else torch.zeros(0, len(vocab), dtype=torch.float32)
