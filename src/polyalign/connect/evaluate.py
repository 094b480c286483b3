"""Evaluation of connected spaces (C-MCR): A↔C retrieval and cross-space classification, with two baselines that use
no projector and chance, as ``connected/…``, ``pivot/…``, ``soft_pivot/…``, ``chance/…`` metrics.

``pivot/…``: a query becomes the other-space embedding of its nearest shared (B) item. ``soft_pivot/…``: of all B
items, weighted by ``softmax(sim / τ)`` in the query's space (:func:`soft_pivot`); ``soft_pivot/tau`` is τ, chosen
from ``TAU_GRID`` by the mean R@1 of both directions on the validation pairs (eval.a_val, eval.c_val;
``soft_pivot/val_R@1`` is that mean) or by the accuracy on validation items to classify (eval.items_val,
eval.labels_val; ``soft_pivot/val_acc``), with ``soft_pivot/tau_from: val``; else method.tau_memory
(``tau_from: default``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from polyalign.connect.embeddings import Log, duplicates, read_embeddings
from polyalign.errors import DataError
from polyalign.eval.retrieval import positive_ranks, topk_chunked
from polyalign.losses.cmcr import soft_retrieve
from polyalign.train.files import atomic_write

if TYPE_CHECKING:
    from polyalign.connect.model import ConnectedSpaces
    from polyalign.config.connect import ConnectEval

@dataclass
class RetrievalSet:
    """Test pairs: A items (in X) and C items (in Y); ``c_to_a[j]`` is the A row paired with C row j."""

    a: torch.Tensor  # (Na, Dx)
    c: torch.Tensor  # (Nc, Dy)
    c_to_a: torch.Tensor  # (Nc,) long


@dataclass
class ClassifySet:
    """Items of one space to classify against class embeddings of the other space."""

    classes: torch.Tensor  # (K, D of classes_space)
    items: torch.Tensor  # (N, D of the other space)
    labels: torch.Tensor  # (N,) long: the class row of each item
    classes_space: str = "x"


TAU_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)  # the soft pivot's τ candidates, chosen on the validation pairs


def _read_labels(path: str, key: str = "eval.labels") -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{key}: file not found: {p}")
    if p.suffix == ".json":
        return [str(x) for x in json.loads(p.read_text())]
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def _load_pairs(a_path: str, c_path: str, split: str, log: Log) -> RetrievalSet:
    """The pairs of ``eval.a_<split>`` and ``eval.c_<split>`` (joined by id, or by row when neither has ids)."""
    na, nc = f"eval.a_{split}", f"eval.c_{split}"
    a, c = read_embeddings(a_path, na, log), read_embeddings(c_path, nc, log)
    if a.ids is None or c.ids is None:
        if a.ids is not None or c.ids is not None or a.vectors.shape[0] != c.vectors.shape[0]:
            raise DataError(f"{na} and {nc}: give both files ids (pairs share an id), or neither "
                            f"with the same row count ({a.vectors.shape[0]} vs {c.vectors.shape[0]})")
        c_to_a = torch.arange(a.vectors.shape[0])
    else:
        if dup := duplicates(a.ids):
            raise DataError(f"{na}: {len(dup)} duplicate ids, e.g. {dup[:3]} (each A item needs one id)")
        pos = {i: n for n, i in enumerate(a.ids)}
        missing = [i for i in c.ids if i not in pos]
        if missing:
            raise DataError(f"{nc}: {len(missing)} of {len(c.ids)} ids have no A item in {na}, e.g. {missing[:3]}")
        c_to_a = torch.tensor([pos[i] for i in c.ids])
    return RetrievalSet(a.vectors, c.vectors, c_to_a)


def _load_classify(cfg: ConnectEval, items_path: str, labels_path: str, log: Log, items_key: str = "eval.items",
                   labels_key: str = "eval.labels") -> ClassifySet:
    classes = read_embeddings(cfg.classes, "eval.classes", log)
    items = read_embeddings(items_path, items_key, log)
    if classes.ids is None:
        raise DataError("eval.classes needs ids: the class names (NAME.ids.txt next to it)")
    labels, pos = _read_labels(labels_path, labels_key), {name: k for k, name in enumerate(classes.ids)}
    if len(labels) != items.vectors.shape[0]:
        raise DataError(f"{labels_key} has {len(labels)} labels for {items.vectors.shape[0]} items")
    if unknown := sorted({lab for lab in labels if lab not in pos}):
        raise DataError(f"{labels_key}: {len(unknown)} class names not among eval.classes' ids, e.g. {unknown[:3]}")
    return ClassifySet(classes.vectors, items.vectors, torch.tensor([pos[lab] for lab in labels]), cfg.classes_space)


def load_val_set(cfg: ConnectEval, log: Log = print) -> RetrievalSet | ClassifySet | None:
    """The validation set that chooses the soft pivot's τ: pairs (eval.a_val, eval.c_val) or items to classify
    (eval.items_val, eval.labels_val); None when neither is given."""
    if cfg.a_val:
        return _load_pairs(cfg.a_val, cfg.c_val, "val", log)
    if cfg.items_val:
        return _load_classify(cfg, cfg.items_val, cfg.labels_val, log, "eval.items_val", "eval.labels_val")
    return None


def load_eval_sets(cfg: ConnectEval, log: Log = print) -> tuple[RetrievalSet | None, ClassifySet | None]:
    """The evaluation files named in ``cfg`` (each part optional)."""
    retrieval = _load_pairs(cfg.a_test, cfg.c_test, "test", log) if cfg.a_test else None
    classify = _load_classify(cfg, cfg.items, cfg.labels, log) if cfg.classes else None
    return retrieval, classify


def check_eval_dims(dims: tuple[int, int], retrieval: RetrievalSet | None, classify: ClassifySet | None,
                    val: RetrievalSet | ClassifySet | None = None) -> None:
    """A ``DataError`` naming every evaluation file whose dimension is not its space's."""
    dx, dy = dims
    dim = {"x": dx, "y": dy}
    found = {}
    if isinstance(val, ClassifySet):
        other = "y" if val.classes_space == "x" else "x"
        found[f"eval.items_val ({other.upper()})"] = (val.items.shape[1], dim[other])
        val = None
    for split, pairs in (("test", retrieval), ("val", val)):
        if pairs is not None:
            found.update({f"eval.a_{split} (X)": (pairs.a.shape[1], dx), f"eval.c_{split} (Y)": (pairs.c.shape[1], dy)})
    if classify is not None:
        other = "y" if classify.classes_space == "x" else "x"
        space = classify.classes_space
        found.update({f"eval.classes ({space.upper()})": (classify.classes.shape[1], dim[space]),
                      f"eval.items ({other.upper()})": (classify.items.shape[1], dim[other])})
    bad = [f"{k} has dim {got}, its space {want}" for k, (got, want) in found.items() if got != want]
    if bad:
        raise DataError("evaluation dims do not match the training spaces: " + "; ".join(bad))


def _pivot(queries: torch.Tensor, b_from: torch.Tensor, b_to: torch.Tensor, chunk: int) -> torch.Tensor:
    """Pivot baseline: each query becomes the other-space embedding of its nearest B item in its own space."""
    return b_to[topk_chunked(queries, b_from, 1, chunk)[1][:, 0]]


def soft_pivot(queries: torch.Tensor, b_from: torch.Tensor, b_to: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft pivot baseline: ``normalize(softmax(queries · b_fromᵀ / tau) · b_to)`` (Q, D of b_to), over all B items."""
    return soft_retrieve(queries, b_from, tau, values=b_to)


def _through_b(r: RetrievalSet, to_other, chunk: int, ranks: dict | None = None) -> dict[str, float]:
    """A↔C recalls of a baseline that maps A into Y and C into X: ``to_other(queries, space_from, space_to)``;
    ``ranks`` (when given) receives the per-query ranks as ``c2a`` and ``a2c``."""
    a_in_y, c_in_x = to_other(r.a, "x", "y"), to_other(r.c, "y", "x")  # A → B (X) → Y; C → B (Y) → X
    a2c, c2a = _ranks(a_in_y, r.c, r.c_to_a, chunk)[1], _ranks(r.a, c_in_x, r.c_to_a, chunk)[0]
    if ranks is not None:
        ranks.update(c2a=c2a, a2c=a2c)
    return _from_ranks(c2a, a2c)


def _soft_accuracy(s: ClassifySet, b: dict[str, torch.Tensor], tau: float) -> float:
    """Classification accuracy of the soft pivot: each item → softmax over B in its space → the classes' space."""
    other = "y" if s.classes_space == "x" else "x"
    items = soft_pivot(s.items, b[other], b[s.classes_space], tau)
    return (items @ s.classes.T).argmax(1).eq(s.labels).float().mean().item()


def choose_tau(val: RetrievalSet | ClassifySet, b: dict[str, torch.Tensor], chunk: int = 8192,
               grid=TAU_GRID) -> tuple[float, float]:
    """The soft pivot's τ of ``grid`` with the best score on ``val`` (the first on a tie), and that score: the mean
    R@1 of both directions on validation pairs, the accuracy on validation items to classify."""
    scores = []
    for tau in grid:
        if isinstance(val, ClassifySet):
            scores.append(_soft_accuracy(val, b, tau))
            continue
        m = _through_b(val, lambda q, f, t, tau=tau: soft_pivot(q, b[f], b[t], tau), chunk)
        scores.append((m["a2c_R@1"] + m["c2a_R@1"]) / 2)
    best = max(range(len(grid)), key=lambda i: (scores[i], -i))
    return grid[best], scores[best]


def _ranks(a: torch.Tensor, c: torch.Tensor, c_to_a: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ranks (0 = first) from one sweep: ``c2a`` (Nc,) of each C query's A item, ``a2c`` of each A query's
    best-ranked C item, for the A items that have a C pair (in A row order)."""
    c2a, a2c = positive_ranks(c, a, c_to_a, None, chunk)  # "captions" = C, "images" = A; 0 = first
    return c2a, a2c[torch.unique(c_to_a)]


def _from_ranks(c2a: torch.Tensor, a2c: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """R@k both ways and the median rank (1 = first) of per-query ranks."""
    out = {}
    for name, rank in (("a2c", a2c), ("c2a", c2a)):
        out.update({f"{name}_R@{k}": (rank < k).float().mean().item() for k in ks})
        out[f"{name}_MdR"] = rank.float().median().item() + 1
    return out


def _recalls(a: torch.Tensor, c: torch.Tensor, c_to_a: torch.Tensor, chunk: int, ks=(1, 5, 10)) -> dict[str, float]:
    """R@k both ways and the median rank (1 = first) of the positive, from one sweep of exact ranks: ``c2a`` of each
    C query's A item, ``a2c`` of each A query's best-ranked C item (A items without any C pair left out)."""
    return _from_ranks(*_ranks(a, c, c_to_a, chunk), ks)


def _chance_recalls(c_to_a: torch.Tensor, n_a: int, ks=(1, 5, 10)) -> dict[str, float]:
    """Expected recall@k of a random ranking: C→A has one positive among n_a; A→C has m positives among n_c."""
    n_c, counts = c_to_a.shape[0], torch.bincount(c_to_a, minlength=n_a)
    counts = counts[counts > 0].tolist()

    def hit(n: int, m: int, k: int) -> float:  # P(at least one of m positives among the first k of n)
        miss = 1.0
        for j in range(min(k, n)):
            miss *= max(0, n - m - j) / (n - j)
        return 1 - miss

    return {**{f"a2c_R@{k}": sum(hit(n_c, m, k) for m in counts) / len(counts) for k in ks},
            **{f"c2a_R@{k}": min(k, n_a) / n_a for k in ks}, "c2a_MdR": (n_a + 1) / 2}


def evaluate(model: ConnectedSpaces, shared: tuple[torch.Tensor, torch.Tensor] | None = None,
             retrieval: RetrievalSet | None = None, classify: ClassifySet | None = None,
             chunk_size: int = 8192, val: RetrievalSet | ClassifySet | None = None, tau: float = 0.01,
             per_query: dict[str, torch.Tensor] | None = None) -> dict[str, float | str]:
    """A↔C retrieval R@1/5/10 and median rank, and classification accuracy, of the connected model, the pivot and
    soft pivot baselines (through the B items of ``shared`` = (B in X, B in Y), row-aligned; left out without it;
    the soft pivot's τ chosen on ``val``, else ``tau``) and chance, as ``connected/…``, ``pivot/…``,
    ``soft_pivot/…``, ``chance/…`` keys. ``per_query`` (when given) receives what the figures are means and medians
    of, for intervals over queries: ``<method>/c2a`` and ``<method>/a2c`` ranks (0 = first) and
    ``<method>/classify_hit`` (1 = the item's class ranked first), in the evaluation files' row order."""
    check_eval_dims((model.info["dim_x"], model.info["dim_y"]), retrieval, classify, val)
    out = {}
    ranks: dict[str, dict[str, torch.Tensor]] = {}
    if retrieval is not None:
        r = retrieval
        a_emb, c_emb = model.embed(r.a, "x"), model.embed(r.c, "y")
        c2a, a2c = _ranks(a_emb, c_emb, r.c_to_a, chunk_size)
        ranks["connected"] = {"c2a": c2a, "a2c": a2c}
        out.update({f"connected/{k}": v for k, v in _from_ranks(c2a, a2c).items()})
        out.update({f"chance/{k}": v for k, v in _chance_recalls(r.c_to_a, r.a.shape[0]).items()})
    b = {"x": shared[0], "y": shared[1]} if shared is not None else None
    if b is not None and (retrieval is not None or classify is not None):
        if val is not None:
            tau, score = choose_tau(val, b, chunk_size)
            name = "soft_pivot/val_acc" if isinstance(val, ClassifySet) else "soft_pivot/val_R@1"
            out.update({"soft_pivot/tau": tau, "soft_pivot/tau_from": "val", name: score})
        else:
            out.update({"soft_pivot/tau": tau, "soft_pivot/tau_from": "default"})
    if retrieval is not None and b is not None:
        pivot = _through_b(retrieval, lambda q, f, t: _pivot(q, b[f], b[t], chunk_size), chunk_size,
                           ranks.setdefault("pivot", {}))
        out.update({f"pivot/{k}": v for k, v in pivot.items()})
        soft = _through_b(retrieval, lambda q, f, t: soft_pivot(q, b[f], b[t], tau), chunk_size,
                          ranks.setdefault("soft_pivot", {}))
        out.update({f"soft_pivot/{k}": v for k, v in soft.items()})
    if classify is not None:
        s = classify
        other = "y" if s.classes_space == "x" else "x"

        def hits(name: str, items: torch.Tensor, classes: torch.Tensor) -> None:
            hit = (items @ classes.T).argmax(1).eq(s.labels)
            ranks.setdefault(name, {})["classify_hit"] = hit
            out[f"{name}/classify_acc"] = hit.float().mean().item()

        hits("connected", model.embed(s.items, other), model.embed(s.classes, s.classes_space))
        out["chance/classify_acc"] = 1.0 / s.classes.shape[0]
        if b is not None:  # item → nearest B (or all B, softly) → the classes' space
            hits("pivot", _pivot(s.items, b[other], b[s.classes_space], chunk_size), s.classes)
            hits("soft_pivot", soft_pivot(s.items, b[other], b[s.classes_space], tau), s.classes)
    if per_query is not None:
        per_query.update({f"{m}/{k}": v.detach().cpu() for m, d in ranks.items() for k, v in d.items()})
    return out


def save_per_query(path: Path, per_query: dict[str, torch.Tensor]) -> None:
    """``per_query`` (see :func:`evaluate`) as one ``.npz`` file (keys ``method.what``), written atomically; nothing
    when it is empty."""
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez(f, **{k.replace("/", "."): v.numpy() for k, v in per_query.items()})

    if per_query:
        atomic_write(path, write)
