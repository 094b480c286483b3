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
