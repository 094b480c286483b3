"""Text↔image retrieval recall@k with several captions per image, computed in query chunks (never N×M at once)."""
from __future__ import annotations

import functools

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


_TILE_ROWS, _TILE_COLS = 256, 4096  # a (256, 4096) fp32 similarity tile (4 MB) is counted while still in cache
_TIE = 2.0**-18  # |a - b| <= this * |q| * max|k|: the same pair's products from two kernels, a tie to recount


@functools.lru_cache(maxsize=None)  # the kernel probe runs once per (dtype, device), not on every sweep
def _matmul(dtype: torch.dtype, device: torch.device):
    """``mm(a, b) = a @ b.T``: on CPUs in fp32 through oneDNN (its AVX-512 kernels are ~1.7x MKL's sgemm on AMD
    EPYC here), else ``torch.mm``."""
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        try:
            linear = torch.ops.mkldnn._linear_pointwise
            probe = torch.ones(2, 3)
            if torch.equal(linear(probe, probe, None, "none", [], ""), probe @ probe.T):
                return lambda a, b: linear(a, b, None, "none", [], "")
        except (AttributeError, RuntimeError):
            pass
    return lambda a, b: torch.mm(a, b.T)


def _count_tiled(txt, img, txt_to_img, positive, best, k, chunk_size, observers):
    """Uncapped-where-it-matters counts (M,), (N,): how many images score strictly above each caption's positive
    and how many captions of other images strictly above each image's best caption.

    Products in ``txt``'s dtype, one (rows, cols) tile at a time, each counted right after its product while it is
    in cache (rows = ``chunk_size`` when observers need whole (chunk, N) blocks, else at most ``_TILE_ROWS``).
    Every tile is counted against two thresholds ``_TIE`` apart around the positive (best), so a tie up to
    rounding (the same pair from a different kernel: duplicated embeddings) never counts by accident: the queries
    with a value in that band and fewer than ``k`` clear wins are recounted from one product each, with the block's
    own positive as the threshold. Counts are exact below ``k`` (``k`` None: everywhere)."""
    m, n = txt.shape[0], img.shape[0]
    dev, mm = img.device, _matmul(txt.dtype, img.device)
    cap = m + n if k is None else k
    tie = txt.dtype == torch.float32  # in other dtypes (bf16) ties are left to rounding, as documented
    if tie:
        q_norm, k_norm = txt.norm(dim=1), img.norm(dim=1)
        d_t = _TIE * q_norm * k_norm.max()  # (M,)
        d_i = _TIE * k_norm * q_norm.max()  # (N,)
    else:
        d_t, d_i = torch.zeros(m, device=dev), torch.zeros(n, device=dev)
    t_lo, t_hi, u_lo, u_hi = positive - d_t, positive + d_t, best - d_i, best + d_i
    lo_op = torch.ge if tie else torch.gt  # the band [lo, hi) holds every tie, even when d is 0
    t_lo_cnt, t_hi_cnt = (torch.zeros(m, dtype=torch.int32, device=dev) for _ in range(2))
    i_lo_cnt, i_hi_cnt = (torch.zeros(n, dtype=torch.int32, device=dev) for _ in range(2))
    rows = chunk_size if observers else min(chunk_size, _TILE_ROWS)
    cols = min(_TILE_COLS, n)
    mask = torch.empty(min(rows, m), cols, dtype=torch.bool, device=dev)
    block = torch.empty(min(rows, m), n, dtype=txt.dtype, device=dev) if observers else None
    row_sum = torch.int16 if cols < 2**15 else torch.int32
    for r0 in range(0, m, rows):
        r1 = min(r0 + rows, m)
        q, owner = txt[r0:r1], txt_to_img[r0:r1]
        tl, th = t_lo[r0:r1, None], t_hi[r0:r1, None]
        lo_r, hi_r = t_lo_cnt[r0:r1], t_hi_cnt[r0:r1]
        for c0 in range(0, n, cols):
            c1 = min(c0 + cols, n)
            s, above = mm(q, img[c0:c1]), mask[: r1 - r0, : c1 - c0]  # (c, w)
            if block is not None:
                block[: r1 - r0, c0:c1] = s
            lo_r += lo_op(s, tl, out=above).view(torch.uint8).sum(dim=1, dtype=row_sum)
            if tie:
                hi_r += torch.gt(s, th, out=above).view(torch.uint8).sum(dim=1, dtype=row_sum)
            ul, uh = u_lo[c0:c1], u_hi[c0:c1]
            i_lo_cnt[c0:c1] += lo_op(s, ul, out=above).view(torch.uint8).sum(dim=0, dtype=torch.int32)
            if tie:
                i_hi_cnt[c0:c1] += torch.gt(s, uh, out=above).view(torch.uint8).sum(dim=0, dtype=torch.int32)
            mine = torch.nonzero((owner >= c0) & (owner < c1))[:, 0]  # captions whose own image is in this tile
            if mine.numel():  # the own pair is never counted (it was counted only if above the threshold)
                o = owner[mine]
                v = s[mine, o - c0]
                lo_r.index_add_(0, mine, -lo_op(v, tl[mine, 0]).int())
                i_lo_cnt.index_add_(0, o, -lo_op(v, u_lo[o]).int())
                if tie:
                    hi_r.index_add_(0, mine, -(v > th[mine, 0]).int())
                    i_hi_cnt.index_add_(0, o, -(v > u_hi[o]).int())
        for observer in observers:
            observer.update(r0, block[: r1 - r0])
    if not tie:
        return t_lo_cnt.long(), i_lo_cnt.long()
    t2i, i2t = t_lo_cnt.long(), i_lo_cnt.long()
    step = max(1, (1 << 24) // max(n, m))  # recount in (step, N) fp32 blocks of ~64 MB
    redo = torch.nonzero((t_hi_cnt < cap) & (t_lo_cnt != t_hi_cnt))[:, 0]  # a near-tie that could decide a rank
    for s0 in range(0, redo.numel(), step):
        j = redo[s0 : s0 + step]
        sims = mm(txt[j], img)  # (a, N): one product per query, the own one among them
        own = txt_to_img[j, None]
        above = sims > sims.gather(1, own)
        if k is not None:  # capped ranks are positions in the ranking: an equal image with a lower index goes first
            above |= (sims == sims.gather(1, own)) & (torch.arange(n, device=dev)[None, :] < own)
        t2i[j] = above.sum(dim=1)
    redo = torch.nonzero((i_hi_cnt < cap) & (i_lo_cnt != i_hi_cnt))[:, 0]
    for s0 in range(0, redo.numel(), step):
        i = redo[s0 : s0 + step]
        sims = mm(img[i], txt)  # (a, M)
        own = txt_to_img[None, :] == i[:, None]
        top = sims.masked_fill(~own, -torch.inf).amax(dim=1, keepdim=True)  # the best own caption, same products
        i2t[i] = ((sims > top) & ~own).sum(dim=1)
    return t2i, i2t


def positive_ranks(txt_emb: torch.Tensor, img_emb: torch.Tensor, txt_to_img: torch.Tensor, k: int | None = 10,
                   chunk_size: int = 8192, dtype: torch.dtype | None = None,
                   observers=()) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of the positives (0 = first), capped at ``k`` (``None``: exact), from one sweep of similarity blocks.

    ``t2i`` (M,): the position of each caption's image among all images ranked by score, an equal score going to
    the lower image index (exact, ``k`` None: how many images score strictly higher than it); ``i2t`` (N,): how
    many captions of *other* images score strictly higher than the image's best caption. Recall@k' is
    ``rank < k'`` for k' <= k. Both are counts over the whole sweep (no top-k), capped at ``k`` afterwards.

    Products are tiled and counted while in cache (``_count_tiled``; fp32 on CPUs through oneDNN); a tie up to
    rounding is resolved by recounting that query from one product, so duplicated embeddings never count.
    ``dtype`` (e.g. bfloat16) casts the embeddings for the products (faster, but near-ties may reorder). Each of
    ``observers`` is shown every (chunk, N) block as ``observer.update(start, sims)`` (other rankings of the same
    sweep).
    """
    txt, img = txt_emb.detach(), img_emb.detach()
    txt_to_img = txt_to_img.to(img.device).long()
    if dtype is not None:
        txt, img = txt.to(dtype), img.to(dtype)
    n_img = img.shape[0]
    positive = (txt.float() * img[txt_to_img].float()).sum(dim=1)  # (M,)
    best = torch.full((n_img,), -torch.inf, device=img.device).scatter_reduce(0, txt_to_img, positive, "amax")
    t2i, i2t = _count_tiled(txt, img, txt_to_img, positive, best, k, chunk_size, list(observers))
    if k is None:
        return t2i, i2t
    k = min(k, n_img)
    return t2i.clamp_(max=k), i2t.clamp_(max=k)


def retrieval_metrics(
    img_emb: torch.Tensor, txt_emb: torch.Tensor, txt_to_img: torch.Tensor, ks=(1, 5, 10), chunk_size: int = 8192,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Recall@k as fractions: ``t2i_R@k`` (caption finds its image), ``i2t_R@k`` (image finds any of its captions), ``rsum``.

    Images without any caption are left out of i2t. One sweep of similarity blocks serves both directions;
    The default (``dtype`` None) runs the products in fp32 (tiled, oneDNN on CPUs: ``positive_ranks``);
    ``dtype=torch.bfloat16`` runs them in bf16 (faster on CPUs with bf16 units; near-ties may reorder).
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
