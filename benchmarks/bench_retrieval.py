"""Retrieval section: the ranking machinery of ``retrieval_metrics`` side by side on the same embeddings: the
row-wise top-k it used before, the tiled counts it uses now (fp32 default, bf16), and FAISS's k-NN search."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from timing import sync


def _topk_positive_ranks(txt, img, txt_to_img, k=10, chunk_size=8192, dtype=None):
    """The machinery before: one (8192, N) block at a time, t2i from a row-wise top-k, i2t a column-wise count."""
    if dtype is not None:
        txt, img = txt.to(dtype), img.to(dtype)
    n_img = img.shape[0]
    positive = (txt.float() * img[txt_to_img].float()).sum(dim=1)
    best = torch.full((n_img,), -torch.inf, device=img.device).scatter_reduce(0, txt_to_img, positive, "amax")
    best = best.to(txt.dtype)
    t2i = torch.empty(txt.shape[0], dtype=torch.long, device=img.device)
    i2t = torch.zeros(n_img, dtype=torch.int32, device=img.device)
    for start in range(0, txt.shape[0], chunk_size):
        sims = txt[start : start + chunk_size] @ img.T
        owner = txt_to_img[start : start + chunk_size, None]
        hit = torch.topk(sims, k, dim=1).indices == owner
        t2i[start : start + chunk_size] = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), k)
        above = sims > best[None, :]
        i2t += above.view(torch.uint8).sum(dim=0, dtype=torch.int32)
        i2t.index_add_(0, owner[:, 0], -above.gather(1, owner)[:, 0].int())
    return t2i, i2t.long().clamp_(max=k)


def _faiss_ranks(txt, img, txt_to_img, k=10):
    """FAISS exact inner-product k-NN (fp32) in both directions; a rank is the positive's place in the k found."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    t, i = txt.cpu().numpy(), img.cpu().numpy()
    owner = txt_to_img.cpu()
    _, t2i_idx = faiss.knn(t, i, k, metric=faiss.METRIC_INNER_PRODUCT)  # (M, k) images
    hit = torch.from_numpy(t2i_idx) == owner[:, None]
    t2i = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), k)
    _, i2t_idx = faiss.knn(i, t, k, metric=faiss.METRIC_INNER_PRODUCT)  # (N, k) captions
    hit = owner[torch.from_numpy(i2t_idx)] == torch.arange(i.shape[0])[:, None]
    i2t = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), k)
    return t2i, i2t


def bench_retrieval(n: int, dim: int, device, methods: str | None = None) -> list[dict]:
    """Seconds for one n×n sweep (recall@1/5/10 in both directions) by each machinery, on the same embeddings;
    ``methods`` a comma-separated subset of the row names' keys (topk32, topk16, count32, count16, faiss)."""
    from polyalign.eval.retrieval import positive_ranks, rank_metrics

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    txt = F.normalize(img + 0.3 * torch.randn(n, dim, generator=g), dim=1)  # a noisy match: recall in (0, 1)
    img, txt = img.to(device), txt.to(device)
    owner = torch.arange(n, device=device)
    table = {
        "topk32": ("before: row-wise top-k, fp32", lambda: _topk_positive_ranks(txt, img, owner)),
        "topk16": ("before: row-wise top-k, bf16", lambda: _topk_positive_ranks(txt, img, owner, dtype=torch.bfloat16)),
        "count32": ("now: tiled counts, fp32 (default)", lambda: positive_ranks(txt, img, owner, 10)),
        "count16": ("now: tiled counts, bf16", lambda: positive_ranks(txt, img, owner, 10, dtype=torch.bfloat16)),
        "faiss": ("FAISS knn k=10, fp32, both ways", lambda: _faiss_ranks(txt, img, owner)),
    }
    keys = methods.split(",") if methods else list(table)
    if device.type != "cpu":
        keys = [key for key in keys if key != "faiss"]
    rows = []
    for key in keys:
        name, fn = table[key]
        sync(device)
        t0 = time.perf_counter()
        t2i, i2t = fn()
        metrics = rank_metrics({"t2i": t2i, "i2t": i2t})
        sync(device)
        seconds = time.perf_counter() - t0
        print(f"retrieval {name} {n}×{n}, d={dim}: {seconds:.1f} s (t2i R@1 {metrics['t2i_R@1']:.4f}, "
              f"i2t R@1 {metrics['i2t_R@1']:.4f}, rsum {metrics['rsum']:.4f})", flush=True)
        rows.append({"method": name, "n": n, "dim": dim, "seconds": seconds, "t2i_R@1": metrics["t2i_R@1"]})
    return rows
