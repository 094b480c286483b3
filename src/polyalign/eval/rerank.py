"""Retrieval re-ranked by image–text matching, as ALBEF evaluates it (arXiv 2107.07651): for every query the top-k
candidates by ITC similarity are re-scored by the fusion encoder's ITM match logit (optionally plus the ITC cosine
similarity, as BLIP does); recall@k in both directions, with several captions per image.

A query whose positive is not among its k candidates counts as a miss at every R@k', so ``k`` must be at least the
largest k' reported. Cost: (M + N)·k fusion passes for M captions and N images; encoder tokens are computed once.
"""
from __future__ import annotations

import torch

from polyalign.eval.embed import inference, model_device
from polyalign.eval.retrieval import rank_metrics, topk_chunked


def first_hit(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Rank (0 = first) of the best-placed positive after sorting each row of ``scores`` (Q, k) in descending order
    (ties keep the candidate order); k where a row has no positive."""
    order = scores.argsort(dim=1, descending=True, stable=True)  # (Q, k)
    hit = positive.gather(1, order)
    return torch.where(hit.any(1), hit.int().argmax(1), scores.shape[1])


def _rescore(model, query_tokens, cand_tokens, candidates, text_is_query, text_mask, batch_size) -> torch.Tensor:
    """ITM match logits (Q, k) of each query with each of its candidates, ``batch_size`` pairs per fusion pass."""
    q_idx = torch.arange(candidates.shape[0], device=candidates.device)[:, None].expand_as(candidates).reshape(-1)
    c_idx = candidates.reshape(-1)
    out = torch.empty(c_idx.shape[0], device=candidates.device)
    for s in range(0, c_idx.shape[0], batch_size):
        qi, ci = q_idx[s : s + batch_size], c_idx[s : s + batch_size]
        ti, ii = (qi, ci) if text_is_query else (ci, qi)
        texts, images = (query_tokens, cand_tokens) if text_is_query else (cand_tokens, query_tokens)
        out[s : s + batch_size] = model.match_logits(images[ii], texts[ti], text_mask[ti]).float()
    return out.view_as(candidates)


@torch.no_grad()
def itm_rerank_ranks(model, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                     img_emb: torch.Tensor, txt_emb: torch.Tensor, txt_to_img: torch.Tensor, k: int = 16,
                     batch_size: int = 128, chunk_size: int = 8192, add_itc: bool = False):
    """Ranks of the positives after re-ranking: ``t2i`` (M,) for each caption, ``i2t`` (N,) for each image (its best
    caption), k for a positive outside the candidates. Inputs: encoder tokens of every image (N, 1+P, Dv) and caption
    (M, L, D) with its mask (M, L), ITC embeddings (N, E), (M, E), and the (M,) image of each caption."""
    k_t2i, k_i2t = min(k, img_emb.shape[0]), min(k, txt_emb.shape[0])
    sim_t2i, cand_t2i = topk_chunked(txt_emb, img_emb, k_t2i, chunk_size)  # (M, k)
    sim_i2t, cand_i2t = topk_chunked(img_emb, txt_emb, k_i2t, chunk_size)  # (N, k)
    s_t2i = _rescore(model, text_tokens, image_tokens, cand_t2i, True, text_mask, batch_size)
    s_i2t = _rescore(model, image_tokens, text_tokens, cand_i2t, False, text_mask, batch_size)
    if add_itc:
        s_t2i, s_i2t = s_t2i + sim_t2i.float(), s_i2t + sim_i2t.float()
    images = torch.arange(img_emb.shape[0], device=cand_i2t.device)
    t2i = first_hit(s_t2i, cand_t2i == txt_to_img[:, None])
    i2t = first_hit(s_i2t, txt_to_img[cand_i2t] == images[:, None])
    return t2i, i2t


def itm_rerank_metrics(model, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, txt_to_img: torch.Tensor,
                       k: int = 16, ks=(1, 5, 10), batch_size: int = 128, chunk_size: int = 8192,
                       add_itc: bool = False, n_resamples: int = 0) -> dict[str, float]:
    """Recall@k as fractions after ITM re-ranking of the ITC top-``k``: ``t2i_R@k``, ``i2t_R@k`` (images without a
    caption left out), ``rsum`` — the names of ``retrieval_metrics``; with ``n_resamples`` > 0 each with its 95%
    bootstrap interval over the queries (``…_ci_low``, ``…_ci_high``, see ``rank_metrics``). ``images`` (N, 3, H, W)
    in [0, 1], captions ``ids``/``mask`` (M, L), ``txt_to_img`` (M,). Runs in eval mode without gradients."""
    if k < max(ks):
        raise ValueError(f"k={k} candidates cannot give R@{max(ks)}: use k >= {max(ks)}")
    device = model_device(model)
    txt_to_img = txt_to_img.to(device).long()
    with inference(model):
        v = torch.cat([model.image_encoder(images[s : s + batch_size].to(device))
                       for s in range(0, images.shape[0], batch_size)])  # (N, 1+P, Dv)
        length = max(int(mask.sum(1).max()), 1)  # one width for all captions: padding columns cut once
        ids, mask = ids[:, :length].to(device), mask[:, :length].to(device)
        w = torch.cat([model.text_encoder(ids[s : s + batch_size], mask[s : s + batch_size])
                       for s in range(0, ids.shape[0], batch_size)])  # (M, L, D)
        img_emb = torch.cat([model.image_proj(v[s : s + batch_size]) for s in range(0, v.shape[0], batch_size)])
        txt_emb = torch.cat([model.text_proj(w[s : s + batch_size], mask[s : s + batch_size])
                             for s in range(0, w.shape[0], batch_size)])
        t2i, i2t = itm_rerank_ranks(model, v, w, mask, img_emb, txt_emb, txt_to_img, k, batch_size, chunk_size, add_itc)
    captioned = torch.unique(txt_to_img)
    return rank_metrics({"t2i": t2i, "i2t": i2t[captioned]}, ks, n_resamples=n_resamples, tag="retrieval_itm/")


def evaluate_rerank(model, tokenizer, dataset, k: int = 16, max_captions: int = 5, batch_size: int = 128,
                    add_itc: bool = False, bootstrap: int = 1000) -> dict[str, float]:
    """``retrieval_itm/*`` metrics of ``itm_rerank_metrics`` on a dataset's images and (up to ``max_captions``)
    captions per item, with ``bootstrap`` resamples for their intervals (0 = none)."""
    from polyalign.eval.run import caption_table

    images = torch.stack([dataset.image(i) for i in range(len(dataset))]).float() / 255  # (N, 3, H, W)
    texts, txt_to_img = caption_table(dataset, max_captions)
    ids, mask = tokenizer(texts)
    metrics = itm_rerank_metrics(model, images, ids, mask, txt_to_img, k, batch_size=batch_size, add_itc=add_itc,
                                 n_resamples=bootstrap)
    return {f"retrieval_itm/{name}": value for name, value in metrics.items()}
