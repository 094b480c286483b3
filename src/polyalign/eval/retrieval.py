"""Text↔image retrieval recall@k with several captions per image, computed in query chunks (never N×M at once)."""
from __future__ import annotations

import torch


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


def retrieval_metrics(
    img_emb: torch.Tensor, txt_emb: torch.Tensor, txt_to_img: torch.Tensor, ks=(1, 5, 10), chunk_size: int = 8192
) -> dict[str, float]:
    """Recall@k as fractions: ``t2i_R@k`` (caption finds its image), ``i2t_R@k`` (image finds any of its captions), ``rsum``.

    Images without any caption are left out of i2t.
    """
    n_img, n_txt = img_emb.shape[0], txt_emb.shape[0]
    txt_to_img = txt_to_img.to(img_emb.device).long()
    if txt_to_img.shape != (n_txt,):
        raise ValueError(f"txt_to_img has shape {tuple(txt_to_img.shape)}, expected ({n_txt},)")
    if n_txt == 0 or int(txt_to_img.min()) < 0 or int(txt_to_img.max()) >= n_img:
        raise ValueError(f"txt_to_img must be non-empty with values in [0, {n_img})")
    kmax = max(ks)

    _, t2i = topk_chunked(txt_emb, img_emb, kmax, chunk_size)  # (M, k) image ids
    t2i_hit = t2i == txt_to_img[:, None]

    captioned = torch.unique(txt_to_img)  # images with at least one caption
    _, i2t = topk_chunked(img_emb[captioned], txt_emb, kmax, chunk_size)  # (N', k) caption ids
    i2t_hit = txt_to_img[i2t] == captioned[:, None]

    out = {}
    for name, hit in (("t2i", t2i_hit), ("i2t", i2t_hit)):
        for k in ks:
            out[f"{name}_R@{k}"] = hit[:, :k].any(dim=1).float().mean().item()
    out["rsum"] = sum(out.values())
    return out
