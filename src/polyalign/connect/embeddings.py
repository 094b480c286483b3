"""Embedding files as C-MCR's ``polyalign connect`` reads them: one (N, D) matrix with optional row ids.

``NAME.npy`` (float array; ids in ``NAME.ids.txt`` or ``NAME.ids.json``) or ``NAME.safetensors`` (tensor
``embeddings``, optionally an integer tensor ``ids``); rows are checked and L2-normalised on load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file

from polyalign.errors import ConfigError, DataError

Log = Callable[[str], None]

@dataclass
class Embeddings:
    """One embedding matrix (N, D), float32 and L2-normalised, with its row ids (None: rows have no ids)."""

    vectors: torch.Tensor
    ids: list[str] | None = None
    name: str = "embeddings"


def _sibling_ids(path: Path) -> list[str] | None:
    stem = path.with_suffix("")
    if (p := stem.with_name(stem.name + ".ids.txt")).is_file():
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if (p := stem.with_name(stem.name + ".ids.json")).is_file():
        return [str(x) for x in json.loads(p.read_text())]
    return None


def check_embeddings(x, name: str, log: Log = print) -> torch.Tensor:
    """(N, D) float32 rows, checked (2-D, non-empty, finite, non-zero) and L2-normalised (noted if they were not)."""
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{name}: expected a non-empty (N, D) matrix, got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise DataError(f"{name}: expected float embeddings, got dtype {x.dtype}")
    x = x.detach().float().cpu()
    bad = ~torch.isfinite(x).all(dim=1)
    if bad.any():
        raise DataError(f"{name}: {int(bad.sum())} of {x.shape[0]} rows hold NaN or inf "
                        f"(first: row {int(bad.nonzero()[0])})")
    norms = x.norm(dim=1)
    if (norms == 0).any():
        raise DataError(f"{name}: {int((norms == 0).sum())} rows are all zeros "
                        f"(first: row {int((norms == 0).nonzero()[0])})")
    if (norms - 1).abs().max() > 1e-3:
        log(f"{name}: rows were not L2-normalised (norms {norms.min():.3g}–{norms.max():.3g}); normalised them")
    return x / norms[:, None]


def read_embeddings(path: str | Path, name: str, log: Log = print) -> Embeddings:
    """Read a ``.npy`` or ``.safetensors`` embedding file (see the module docstring) and check it."""
    if not str(path):
        raise ConfigError(f"{name} is not set: name a .npy or .safetensors embedding file")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{name}: file not found: {path}")
    ids = None
    if path.suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{name}: {path} is not a numeric .npy array ({e})") from None
    elif path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise DataError(f"{name}: cannot read {path} as safetensors ({e})") from None
        if "embeddings" not in tensors:
            raise DataError(f"{name}: {path} has no tensor 'embeddings' (found: {', '.join(tensors) or 'none'})")
        x = tensors["embeddings"]
        if "ids" in tensors:
            ids = [str(int(i)) for i in tensors["ids"].reshape(-1)]
    else:
        raise DataError(f"{name}: {path} is neither .npy nor .safetensors")
    ids = ids if ids is not None else _sibling_ids(path)
    vectors = check_embeddings(x, f"{name} ({path.name})", log)
    if ids is not None and len(ids) != vectors.shape[0]:
        raise DataError(f"{name}: {path.name} has {vectors.shape[0]} rows but {len(ids)} ids")
    return Embeddings(vectors, ids, name)


def duplicates(ids: list[str]) -> list[str]:
    seen, dup = set(), []
    for i in ids:
        (dup.append(i) if i in seen else seen.add(i))
    return dup


def join_by_id(x: Embeddings, y: Embeddings, partial: bool = False,
               log: Log = print) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` and ``y`` that hold the same item, in ``x``'s order: (n, Dx), (n, Dy)."""
    if x.ids is None and y.ids is None:
        if x.vectors.shape[0] != y.vectors.shape[0]:
            raise DataError(f"{x.name} has {x.vectors.shape[0]} rows and {y.name} {y.vectors.shape[0]}, and neither "
                            "has ids to join them by (add NAME.ids.txt files)")
        return x.vectors, y.vectors
    for e, other in ((x, y), (y, x)):
        if e.ids is None:
            raise DataError(f"{other.name} has ids but {e.name} has none (add an ids file next to it)")
        if dup := duplicates(e.ids):
            raise DataError(f"{e.name}: {len(dup)} duplicate ids, e.g. {dup[:3]}")
    pos_y = {i: n for n, i in enumerate(y.ids)}
    shared = [(n, pos_y[i]) for n, i in enumerate(x.ids) if i in pos_y]
    if len(shared) != len(x.ids) or len(shared) != len(y.ids):
        only_x = [i for i in x.ids if i not in pos_y]
        only_y = sorted(set(y.ids) - set(x.ids))
        msg = (f"{x.name} has {len(x.ids)} ids and {y.name} {len(y.ids)}; {len(shared)} shared, {len(only_x)} only in "
               f"{x.name} (e.g. {only_x[:3]}), {len(only_y)} only in {y.name} (e.g. {only_y[:3]})")
        if not partial or not shared:
            raise DataError(msg + ("" if partial else "; set inputs.partial_join=true to train on the shared ids"))
        log(f"joining on the shared ids only: {msg}")
    ix, iy = (torch.tensor(v) for v in zip(*shared))
    return x.vectors[ix], y.vectors[iy]
