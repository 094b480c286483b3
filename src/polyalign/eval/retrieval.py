"""Text↔image retrieval recall@k with several captions per image, computed in query chunks (never N×M at once)."""
from __future__ import annotations

import numpy as np
import torch

from polyalign.eval.bootstrap import median_resamples, percentile_interval, resample_histogram


def topk_chunked(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk_size: int = 8192):
    """Top-k keys by dot product for every query: (scores, indices), each (Q, min(k, K)).

    Only a (chunk_size, K) similarity block exists at a time; it is written into one reused buffer.
    """
    queries, keys = queries.detach(), keys.detach()
    k = min(k, keys.shape[0])
    buf = torch.empty(min(chunk_size, queries.shape[0]), keys.shape[0], dtype=queries.dtype, device=queries.device)
    scores, indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start : start + chunk_size]  # (c, D)
        sims = torch.mm(q, keys.T, out=buf[: q.shape[0]])  # (c, K)
        s, i = torch.topk(sims, k, dim=1)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)


def positive_ranks(txt_emb: torch.Tensor, img_emb: torch.Tensor, txt_to_img: torch.Tensor, k: int | None = 10,
                   chunk_size: int = 8192, dtype: torch.dtype | None = None,
                   observers=()) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of the positives (0 = first), capped at ``k`` (``None``: exact), from one sweep of (chunk, N) blocks.

    ``t2i`` (M,): the position of each caption's image among all images (from the block's row-wise top-k; exact:
    how many images score strictly higher than it); ``i2t`` (N,): how many captions of *other* images score
    strictly higher than the image's best caption (a column-wise count, which is cheaper than a column-wise top-k).
    Recall@k' is ``rank < k'`` for k' <= k. ``dtype`` (e.g. bfloat16) casts the embeddings for the products.
    Each of ``observers`` is shown every block as ``observer.update(start, sims)`` (other rankings of the same sweep).
    """
    txt, img = txt_emb.detach(), img_emb.detach()
    if dtype is not None:
        txt, img = txt.to(dtype), img.to(dtype)
    n_img, exact = img.shape[0], k is None
    k = n_img if exact else min(k, n_img)
    positive = (txt.float() * img[txt_to_img].float()).sum(dim=1)  # (M,)
    best = torch.full((n_img,), -torch.inf, device=img.device).scatter_reduce(0, txt_to_img, positive, "amax")
    best = best.to(txt.dtype)
    t2i = torch.empty(txt.shape[0], dtype=torch.long, device=img.device)
    i2t = torch.zeros(n_img, dtype=torch.int32, device=img.device)
    for start in range(0, txt.shape[0], chunk_size):
        sims = txt[start : start + chunk_size] @ img.T  # (c, N)
        owner = txt_to_img[start : start + chunk_size, None]  # (c, 1)
        if exact:  # the block's own similarity as the threshold, so rounding never counts the image itself
            t2i[start : start + chunk_size] = (sims > sims.gather(1, owner)).sum(dim=1)
        else:
            hit = torch.topk(sims, k, dim=1).indices == owner  # (c, k)
            t2i[start : start + chunk_size] = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), k)
        above = sims > best[None, :]  # (c, N): caption beats the image's best caption
        i2t += above.view(torch.uint8).sum(dim=0, dtype=torch.int32)  # (uint8 sums are ~2x faster than bool)
        i2t.index_add_(0, owner[:, 0], -above.gather(1, owner)[:, 0].int())  # an image's own captions never count
        for observer in observers:
            observer.update(start, sims)
    return t2i, i2t.long() if exact else i2t.long().clamp_(max=k)


def retrieval_metrics(
    img_emb: torch.Tensor, txt_emb: torch.Tensor, txt_to_img: torch.Tensor, ks=(1, 5, 10), chunk_size: int = 8192,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Recall@k as fractions: ``t2i_R@k`` (caption finds its image), ``i2t_R@k`` (image finds any of its captions), ``rsum``.

    Images without any caption are left out of i2t. One sweep of similarity blocks serves both directions;
    ``dtype=torch.bfloat16`` runs the products in bf16 (faster on CPUs with bf16 units; near-ties may reorder).
    """
    n_img, n_txt = img_emb.shape[0], txt_emb.shape[0]
    txt_to_img = txt_to_img.to(img_emb.device).long()
    if txt_to_img.shape != (n_txt,):
        raise ValueError(f"txt_to_img has shape {tuple(txt_to_img.shape)}, expected ({n_txt},)")
    if n_txt == 0 or int(txt_to_img.min()) < 0 or int(txt_to_img.max()) >= n_img:
        raise ValueError(f"txt_to_img must be non-empty with values in [0, {n_img})")
    t2i, i2t = positive_ranks(txt_emb, img_emb, txt_to_img, max(ks), chunk_size, dtype)  # (M,), (N,)
    captioned = torch.unique(txt_to_img)  # images with at least one caption
    return rank_metrics({"t2i": t2i, "i2t": i2t[captioned]}, ks)


def rank_metrics(ranks: dict[str, torch.Tensor], ks=(1, 5, 10), median: bool = False, n_resamples: int = 0,
                 seed: int = 0, tag: str = "") -> dict[str, float]:
    """``<direction>_R@k`` (fraction of queries with ``rank < k``), ``rsum`` (their sum) and, if ``median``,
    ``<direction>_MdR`` (median rank, 1 = first; the lower middle for an even count) of each direction's per-query
    ranks (0 = first; ranks capped at k' are fine for k <= k' but not for the median).

    ``n_resamples`` > 0 adds a 95% percentile bootstrap interval over the queries, ``<figure>_ci_low`` and
    ``<figure>_ci_high``, for every figure; the directions are resampled independently (their queries differ), each
    by a generator seeded from (``seed``, ``tag`` + direction), and ``rsum``'s interval sums the resampled figures.
    """
    out: dict[str, float] = {}
    for name, rank in ranks.items():
        for k in ks:
            out[f"{name}_R@{k}"] = (rank < k).float().mean().item()
    out["rsum"] = sum(out.values())
    if median:
        out |= {f"{name}_MdR": rank.float().median().item() + 1 for name, rank in ranks.items()}
    if n_resamples <= 0:
        return out
    boot: dict[str, np.ndarray] = {"rsum": np.zeros(n_resamples)}
    for name, rank in ranks.items():
        rank = rank.cpu().numpy()
        cuts = np.sort(np.asarray(ks))
        bucket = np.searchsorted(cuts, rank, side="right")  # how many of the k are <= rank: one value per R@k bucket
        values, counts = resample_histogram(bucket, n_resamples, seed, tag + name)  # (U,), (B, U)
        for k in ks:  # rank < k exactly when bucket <= (k's place among the cuts)
            boot[f"{name}_R@{k}"] = counts[:, values <= np.searchsorted(cuts, k)].sum(axis=1) / rank.size
            boot["rsum"] = boot["rsum"] + boot[f"{name}_R@{k}"]
        if median:
            boot[f"{name}_MdR"] = median_resamples(rank, n_resamples, seed, f"{tag}{name}_MdR") + 1
    with_ci: dict[str, float] = {}
    for key, value in out.items():
        with_ci[key] = value
        with_ci[f"{key}_ci_low"], with_ci[f"{key}_ci_high"] = percentile_interval(boot[key])
    return with_ci
