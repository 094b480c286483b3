"""Retrieval that counts every right answer (``retrieval_any/*``), beside the strict one that counts only a query's
own item.

Several items may be right for one query: on shapes many scenes share a caption string ("a red circle"), on the
emoji concept split the images of one concept in different styles share every caption, so strict text→image R@1
is capped below 1. Here item i and caption j are *relevant* to each other when

  - j's text (whitespace-normalised, otherwise exact) is one of i's captions, or
  - i and j's own item have the same ``concept_id`` (when the dataset rows carry one; see ``concept_ids``),

and always when j is i's own caption. The relation is not closed transitively (two images that share some caption
are not thereby right for each other's other captions). A query's rank is then the number of candidates scoring
strictly above its best-scoring relevant one (0 = first), exact (not capped), from the same sweep of (chunk, N)
similarity blocks as the strict ranks (``AnyRanks`` observes ``positive_ranks``): no N×M matrix, and the relevant
pairs are listed once (their count is what the duplicates make it, at least M).
"""
from __future__ import annotations

import numpy as np
import torch

from polyalign.eval.retrieval import positive_ranks


def normalise_caption(text: str) -> str:
    """A caption as compared for equality: runs of whitespace become one space, ends stripped (case kept)."""
    return " ".join(text.split())


def concept_ids(dataset) -> list | None:
    """The ``concept_id`` of each item (None where an item has none), or None when the dataset gives none.

    Read from ``dataset.concept_id(i)`` when the dataset has that accessor (image manifests), else from its rows
    ``dataset.rows`` (audio manifests keep them)."""
    n = len(dataset)
    if callable(getattr(dataset, "concept_id", None)):
        ids = [dataset.concept_id(i) for i in range(n)]
    elif isinstance(getattr(dataset, "rows", None), list) and len(dataset.rows) == n:
        ids = [r.get("concept_id") if isinstance(r, dict) else None for r in dataset.rows]
    else:
        return None
    ids = [None if c is None or (isinstance(c, str) and not c.strip()) else str(c) for c in ids]
    return ids if any(c is not None for c in ids) else None


def _join(query_group: np.ndarray, member_group: np.ndarray, member: np.ndarray):
    """(query index, member) for every query and every member of its group; groups are ids >= 0 (-1: no group)."""
    order = np.argsort(member_group, kind="stable")
    member_group, member = member_group[order], member[order]
    n_groups = 1 + max([-1] + [int(a.max()) for a in (query_group, member_group) if a.size])
    size = np.bincount(member_group[member_group >= 0], minlength=n_groups)
    start = np.cumsum(size) - size + int((member_group < 0).sum())  # members without a group sort first
    query = np.flatnonzero(query_group >= 0)
    per_query = size[query_group[query]]
    q = np.repeat(query, per_query)
    offset = np.arange(q.size) - np.repeat(np.cumsum(per_query) - per_query, per_query)
    return q, member[start[query_group[q]] + offset]


def _ids(names: list) -> np.ndarray:
    """Dense int ids of hashable names, -1 for None."""
    index: dict = {}
    return np.array([-1 if x is None else index.setdefault(x, len(index)) for x in names], dtype=np.int64)


def relevance_pairs(txt_to_img: torch.Tensor, n_img: int, texts: list[str] | None = None,
                    concepts: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption, item) index pairs (P,), (P,) of every relevant pair (module docstring), sorted by caption then item.

    ``txt_to_img`` (M,) is each caption's own item; ``texts`` (M,) the captions (None: no text equality, e.g. when
    the second tower is not text); ``concepts`` (n_img,) each item's concept id or None. (Index work in NumPy: it
    is single-threaded and predictable where torch's CPU sort is not.)"""
    owner = txt_to_img.detach().cpu().numpy().astype(np.int64)
    m = owner.size
    keys = [np.arange(m) * n_img + owner]  # a caption's own item
    if texts is not None:
        if len(texts) != m:
            raise ValueError(f"relevance_pairs: {len(texts)} texts for {m} captions")
        text = _ids([normalise_caption(t) for t in texts])  # (M,)
        item_text = np.unique(owner * m + text)  # the distinct (item, text) incidences
        j, i = _join(text, item_text % m, item_text // m)
        keys.append(j * n_img + i)
    if concepts is not None:
        if len(concepts) != n_img:
            raise ValueError(f"relevance_pairs: {len(concepts)} concept ids for {n_img} items")
        concept = _ids(list(concepts))  # (N,)
        j, i = _join(concept[owner], concept, np.arange(n_img))
        keys.append(j * n_img + i)
    keys = np.unique(np.concatenate(keys))  # sorted: by caption, then item
    return torch.from_numpy(keys // n_img), torch.from_numpy(keys % n_img)


class AnyRanks:
    """Exact ranks of the best-placed relevant candidate in both directions, accumulated from the similarity blocks
    of ``positive_ranks`` (pass it as an observer); ``ranks()`` → (t2i (M,), i2t (N,)), 0 = first."""

    def __init__(self, txt_emb: torch.Tensor, img_emb: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor],
                 dtype: torch.dtype | None = None, pair_chunk: int | None = None):
        txt, img = txt_emb.detach(), img_emb.detach()
        if dtype is not None:
            txt, img = txt.to(dtype), img.to(dtype)
        self.pj, self.pi = (p.to(img.device) for p in pairs)
        acc = torch.promote_types(txt.dtype, torch.float32)  # bf16 products summed in fp32, as positive_ranks does
        best = torch.full((img.shape[0],), -torch.inf, dtype=acc, device=img.device)  # (N,): best relevant caption
        pair_chunk = pair_chunk or max(1024, (1 << 23) // max(img.shape[1], 1))  # (chunk, D) gathers of ~32 MB
        for s in range(0, self.pj.numel(), pair_chunk):
            pj, pi = self.pj[s : s + pair_chunk], self.pi[s : s + pair_chunk]
            dots = torch.einsum("pd,pd->p", txt.index_select(0, pj).to(acc), img.index_select(0, pi).to(acc))
            best.scatter_reduce_(0, pi, dots, "amax")
        self.best = best.to(txt.dtype)
        self.t2i = torch.empty(txt.shape[0], dtype=torch.long, device=img.device)
        self.i2t = torch.zeros(img.shape[0], dtype=torch.int32, device=img.device)

    def update(self, start: int, sims: torch.Tensor) -> None:
        """Count the candidates above the best relevant one for the captions ``start ...`` of the block (c, N)."""
        c = sims.shape[0]
        lo, hi = torch.searchsorted(self.pj, torch.tensor([start, start + c], device=self.pj.device)).tolist()
        pj, pi = self.pj[lo:hi] - start, self.pi[lo:hi]
        value = sims[pj, pi]  # the block's own similarity of each relevant pair, so rounding never counts it
        row_best = torch.full((c,), -torch.inf, dtype=sims.dtype, device=sims.device)
        row_best.scatter_reduce_(0, pj, value, "amax")
        count = torch.int16 if sims.shape[1] < 2**15 else torch.int32  # (uint8 sums to int16 are faster still)
        self.t2i[start : start + c] = (sims > row_best[:, None]).view(torch.uint8).sum(dim=1, dtype=count)
        self.i2t += (sims > self.best[None, :]).view(torch.uint8).sum(dim=0, dtype=torch.int32)
        self.i2t -= torch.bincount(pi[value > self.best[pi]], minlength=self.i2t.numel()).int()  # relevant: never count

    def ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.t2i, self.i2t.long()


def retrieval_ranks(img_emb: torch.Tensor, txt_emb: torch.Tensor, txt_to_img: torch.Tensor, k: int = 10,
                    chunk_size: int = 8192, dtype: torch.dtype | None = None, texts: list[str] | None = None,
                    concepts: list | None = None, any_relevant: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Per-query ranks from one sweep: ``{"retrieval": {"t2i", "i2t"}}`` strict (capped at ``k``, as
    ``retrieval_metrics``), plus ``"retrieval_any"`` (exact) when ``any_relevant`` and ``texts`` or ``concepts``
    are given. i2t covers the items with at least one caption."""
    n_img, n_txt = img_emb.shape[0], txt_emb.shape[0]
    txt_to_img = txt_to_img.to(img_emb.device).long()
    if txt_to_img.shape != (n_txt,) or n_txt == 0 or int(txt_to_img.min()) < 0 or int(txt_to_img.max()) >= n_img:
        raise ValueError(f"txt_to_img must be ({n_txt},) with values in [0, {n_img})")
    observer = None
    if any_relevant and (texts is not None or concepts is not None):
        observer = AnyRanks(txt_emb, img_emb, relevance_pairs(txt_to_img, n_img, texts, concepts), dtype)
    t2i, i2t = positive_ranks(txt_emb, img_emb, txt_to_img, k, chunk_size, dtype, [observer] if observer else [])
    captioned = torch.unique(txt_to_img)
    out = {"retrieval": {"t2i": t2i, "i2t": i2t[captioned]}}
    if observer is not None:
        any_t2i, any_i2t = observer.ranks()
        out["retrieval_any"] = {"t2i": any_t2i, "i2t": any_i2t[captioned]}
    return out
