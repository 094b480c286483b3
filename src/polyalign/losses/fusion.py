"""ALBEF's losses as pure functions ("Align before Fuse", Li et al., arXiv 2107.07651) with the focal ITC of
"Improving Visual-Language Matching with Text-Driven Soft Masks" (Park & Han, arXiv 2304.00719).

- ITC: image→text and text→image InfoNCE of the student's features against keys = [momentum features of the
  batch; queue], with momentum-distilled soft targets ``y = α·softmax(s_m) + (1 − α)·positives`` and, optionally,
  the focal form ``−Σ_j y_ij (1 − p_ij)^γ log p_ij`` (γ = 0 is the plain soft cross-entropy).
- ITM: cross-entropy of the match classifier over positive pairs and hard negatives drawn ∝ softmax(ITC sims).
- MLM: cross-entropy at masked tokens (15%, BERT's 80/10/10), distilled from the momentum model with the same α.
The loss terms that read a ``FusionOutput`` are in ``polyalign.losses.objective``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from polyalign.models.sampling import IGNORE



def focal_soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """Mean over rows of ``−Σ_j y_ij (1 − p_ij)^γ log p_ij`` with p = softmax(logits) (R, K) and soft targets
    y (R, K); γ = 0 is exactly the soft-target cross-entropy."""
    logp = F.log_softmax(logits.float(), dim=1)
    weighted = targets * logp
    if gamma:
        # the clamp keeps the gradient of (1 − p)^γ finite where p rounds to 1 (γ < 1)
        weighted = weighted * (1.0 - logp.exp()).clamp_min(1e-6).pow(gamma)
    return -weighted.sum(1).mean()


def itc_positives(n_rows: int, n_keys: int, offset: int = 0, index: torch.Tensor | None = None,
                  key_index: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """(R, K) bool positives of rows against keys: always the row's own key at column ``offset + row``, and the
    keys of the same item id (``index`` (R,), ``key_index`` (K,), −1 = no id)."""
    pos = torch.zeros(n_rows, n_keys, dtype=torch.bool, device=device)
    if index is not None and key_index is not None:
        pos = (index[:, None] == key_index[None, :]) & (index[:, None] >= 0)
    rows = torch.arange(n_rows, device=pos.device)
    pos[rows, offset + rows] = True
    return pos


def itc_loss(image: torch.Tensor, text: torch.Tensor, image_keys: torch.Tensor, text_keys: torch.Tensor,
             temp: torch.Tensor | float, positives: torch.Tensor, image_m: torch.Tensor | None = None,
             text_m: torch.Tensor | None = None, alpha: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    """Symmetric ITC with momentum distillation.

    ``image``, ``text`` (B, E): the student's normalised features; ``image_keys``, ``text_keys`` (K, E): aligned
    keys (column j of both is one item: the momentum features of the batch, then the queue); ``positives`` (B, K)
    bool; ``image_m``, ``text_m`` (B, E): the momentum model's features of the batch, needed when ``alpha`` > 0.
    Targets: ``α·softmax(momentum sims) + (1 − α)·positives/row count``; ``gamma`` > 0: the focal form.
    """
    hard = positives.float() / positives.sum(1, keepdim=True)  # (B, K)
    sim_i2t = image.float() @ text_keys.float().T / temp  # (B, K)
    sim_t2i = text.float() @ image_keys.float().T / temp
    y_i2t = y_t2i = hard
    if alpha > 0:
        with torch.no_grad():
            t = temp.detach() if torch.is_tensor(temp) else temp
            y_i2t = alpha * F.softmax(image_m.float() @ text_keys.float().T / t, dim=1) + (1 - alpha) * hard
            y_t2i = alpha * F.softmax(text_m.float() @ image_keys.float().T / t, dim=1) + (1 - alpha) * hard
    return 0.5 * (focal_soft_cross_entropy(sim_i2t, y_i2t, gamma) + focal_soft_cross_entropy(sim_t2i, y_t2i, gamma))


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the match classifier: ``logits`` (R, 2), ``labels`` (R,) with 1 = matching pair."""
    return F.cross_entropy(logits.float(), labels)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None = None,
             alpha: float = 0.0) -> torch.Tensor:
    """``(1 − α)·CE(logits, labels) + α·CE(logits, soft)`` over the predicted tokens: ``logits`` (n, V), ``labels``
    (n,) (``IGNORE`` rows skipped), ``soft`` (n, V) the momentum model's probabilities. 0 when nothing is masked."""
    keep = labels != IGNORE
    if not keep.any():
        return logits.sum() * 0.0  # a tiny batch may draw no masked token: no signal, but a graph
    logits, labels = logits[keep].float(), labels[keep]
    loss = F.cross_entropy(logits, labels)
    if alpha > 0 and soft is not None:
        loss = (1 - alpha) * loss + alpha * -(soft[keep].float() * F.log_softmax(logits, dim=1)).sum(1).mean()
    return loss
