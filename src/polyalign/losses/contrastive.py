"""Contrastive losses as pure functions."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, arXiv 2103.00020) between matched rows of ``a`` (B, D) and ``b`` (B, D).

    Embeddings are expected L2-normalised; ``logit_scale`` is 1/temperature. Returns the mean of the a→b and
    b→a cross-entropies over the B×B similarity matrix with the diagonal as targets.
    """
    logits = logit_scale * a.float() @ b.float().T  # (B, B)
    targets = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def local_info_nce(a: torch.Tensor, b: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
                   logit_scale: torch.Tensor | float, offset: int, tiled: bool = False, tile: int = 256) -> torch.Tensor:
    """This rank's share of the global symmetric InfoNCE (open_clip's local loss with gathered embeddings).

    ``a``, ``b`` (b, D) are this rank's rows; ``a_all``, ``b_all`` (N, D) every rank's, in rank order, with this
    rank's rows at ``offset``. The mean of this value over ranks equals ``info_nce(a_all, b_all)``.
    """
    if tiled:
        from polyalign.losses.tiled import tiled_cross_entropy

        return 0.5 * (tiled_cross_entropy(a, b_all, logit_scale, offset, tile)
                      + tiled_cross_entropy(b, a_all, logit_scale, offset, tile))
    targets = offset + torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logit_scale * a.float() @ b_all.float().T, targets)
                  + F.cross_entropy(logit_scale * b.float() @ a_all.float().T, targets))
