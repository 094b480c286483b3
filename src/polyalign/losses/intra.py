"""Intra-modal losses of MCT ("Multimodal Contrastive Training for Visual Representation Learning",
Yuan et al., arXiv 2104.12836): view–view contrast within one modality, and multi-label tag supervision.

- ``nt_xent``: SimCLR's NT-Xent ("A Simple Framework for Contrastive Learning of Visual Representations",
  arXiv 2002.05709) over the 2B×2B similarities of two views, self-similarities masked.
- ``moco_info_nce``: MoCo's query–key InfoNCE against a queue of past keys ("Improved Baselines with Momentum
  Contrastive Learning", arXiv 2003.04297).
- ``tag_bce``: multi-label binary cross-entropy over a tag vocabulary.
All are pure functions; the ``local_*`` forms are one rank's share of the global-batch loss under DDP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_view_logits(rows: torch.Tensor, cols: torch.Tensor, self_cols: torch.Tensor, temperature: float):
    """(R, C) cosine logits / temperature with each row's own column (``self_cols``, (R,)) set to -inf."""
    logits = rows.float() @ cols.float().T / temperature
    return logits.masked_fill(F.one_hot(self_cols, cols.shape[0]).bool(), float("-inf"))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent between two views (B, D) each (L2-normalised): every one of the 2B rows must pick its other view
    among the 2B - 1 others. Mean over the 2B rows."""
    n = z1.shape[0]
    z = torch.cat([z1, z2])  # (2B, D)
    idx = torch.arange(2 * n, device=z.device)
    targets = (idx + n) % (2 * n)  # row i's positive is its other view
    return F.cross_entropy(_masked_view_logits(z, z, idx, temperature), targets)


def local_nt_xent(z1, z2, z1_all, z2_all, temperature: float, offset: int) -> torch.Tensor:
    """This rank's share of ``nt_xent(z1_all, z2_all)``: its 2b rows against all 2N gathered columns.

    ``z1``, ``z2`` (b, D) are this rank's rows, at ``offset`` in the gathered ``z1_all``, ``z2_all`` (N, D).
    The mean over ranks equals the global loss.
    """
    b, n = z1.shape[0], z1_all.shape[0]
    local = offset + torch.arange(b, device=z1.device)
    self_cols = torch.cat([local, local + n])  # where each row sits among the 2N columns
    targets = torch.cat([local + n, local])
    logits = _masked_view_logits(torch.cat([z1, z2]), torch.cat([z1_all, z2_all]), self_cols, temperature)
    return F.cross_entropy(logits, targets)


def moco_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of queries ``q`` (B, D) against their keys ``k`` (B, D, no gradient) as positives and the
    ``queue`` (K, D) of past keys as negatives (all L2-normalised). Mean over the B queries."""
    k = k.detach().float()
    pos = (q.float() * k).sum(-1, keepdim=True)  # (B, 1)
    neg = q.float() @ queue.detach().float().T  # (B, K)
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def tag_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE: mean over items and tags of ``logits`` (B, T) against 0/1 ``targets`` (B, T)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
