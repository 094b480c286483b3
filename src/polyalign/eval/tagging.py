"""Multi-label image tagging: per-tag average precision, mAP, and a linear tagging probe on frozen features.

The protocol of "Multimodal Contrastive Training for Visual Representation Learning" (Yuan et al., CVPR 2021,
arXiv 2104.12836): a linear multi-label classifier on frozen image features, scored by mean average precision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from polyalign.eval.embed import inference, model_device


class TaggingDataError(ValueError):
    """The tag targets cannot support a tagging score (no tag with a positive where one is needed)."""


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(T,) AP per tag of ``scores`` (N, T) against 0/1 ``targets`` (N, T); NaN for a tag without positives.

    AP = mean over the positives of the precision at the positive's rank (items sorted by descending score).
    Tied scores count as one threshold, as in ``sklearn.metrics.average_precision_score``: every positive of a
    group of ties gets the precision at the group's end, so the result does not depend on the items' order.
    """
    if scores.shape != targets.shape or scores.dim() != 2:
        raise ValueError(f"average_precision: scores {tuple(scores.shape)} and targets {tuple(targets.shape)} "
                         "must both be (N, T)")
    if torch.isnan(scores).any():
        raise ValueError("average_precision: scores contain NaN")
    n = scores.shape[0]
    sorted_scores, order = torch.sort(scores.detach().cpu().double(), dim=0, descending=True, stable=True)
    hits = (targets.detach().cpu().double().gather(0, order) > 0).double()  # (N, T) in rank order
    pos_so_far = hits.cumsum(dim=0)  # (N, T)
    rank = torch.arange(n).unsqueeze(1).expand_as(hits)  # (N, T), 0-based
    group_end = torch.ones_like(hits, dtype=torch.bool)  # last row of each run of tied scores
    group_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    end = torch.where(group_end, rank, n).flip(0).cummin(dim=0).values.flip(0)  # (N, T): row where the group ends
    precision = pos_so_far.gather(0, end) / (end + 1).double()  # (N, T)
    n_pos = hits.sum(dim=0)  # (T,)
    ap = (hits * precision).sum(dim=0) / n_pos.clamp(min=1)
    return torch.where(n_pos > 0, ap, torch.full_like(ap, float("nan")))


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean of ``average_precision`` over the tags with at least one positive target."""
    ap = average_precision(scores, targets)
    has_pos = ~torch.isnan(ap)
    if not has_pos.any():
        raise TaggingDataError(f"mean_average_precision: none of the {targets.shape[1]} tags has a positive "
                               f"target among the {targets.shape[0]} items")
    return float(ap[has_pos].mean())


def scored_tags(train_y: torch.Tensor, test_y: torch.Tensor) -> torch.Tensor:
    """(T,) bool: the tags ``tagging_probe`` scores (at least one positive in train and one in test)."""
    return (train_y > 0).any(dim=0) & (test_y > 0).any(dim=0)


def _cpu32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float32)


def tagging_probe(train_x, train_y, test_x, test_y, weight_decay: float = 1e-3, steps: int = 100,
                  lr: float = 1.0) -> float:
    """Test mAP of a linear multi-label classifier (D → T) on standardised frozen features.

    Features are standardised with the train mean and std (each std floored at 1e-6 of the largest: the result does
    not depend on the features' scale). The tags with a positive in ``train_y`` are fitted
    jointly, full batch, float32 on CPU, by L-BFGS (strong Wolfe line search, ``steps`` iterations, step ``lr``)
    from a zero weight and the log-odds of each tag's train frequency as bias (deterministic). The objective,
    mean BCE over items and tags + ``weight_decay``/2 · mean over tags of ‖w_t‖², is the mean over tags of
    independent L2 logistic regressions (sklearn's C = 1 / (weight_decay · N)); biases are not decayed.
    mAP is over the fitted tags with a positive in ``test_y`` (``scored_tags``).
    """
    train_x, train_y, test_x, test_y = map(_cpu32, (train_x, train_y, test_x, test_y))
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"tagging_probe: {len(train_x)} train features vs {len(train_y)} targets, "
                         f"{len(test_x)} test features vs {len(test_y)} targets")
    fitted = (train_y > 0).any(dim=0)  # (T,)
    if not scored_tags(train_y, test_y).any():
        raise TaggingDataError(f"tagging probe: none of the {train_y.shape[1]} tags has a positive in both the "
                               f"{len(train_y)} train and the {len(test_y)} test items")
    # the floor on a dimension's std is relative to the largest one, so the probe does not depend on the features'
    # scale (an absolute 1e-6 floor flattened a random EfficientNet's tiny eval-mode features to chance mAP)
    mean, std = train_x.mean(dim=0), train_x.std(dim=0, unbiased=False)
    top = float(std.max()) if std.numel() else 0.0
    std = std.clamp(min=1e-6 * top) if top > 0 else torch.ones_like(std)
    xs, ys = (train_x - mean) / std, train_y[:, fitted]  # (N, D), (N, T')
    freq = ys.mean(dim=0).clamp(1e-6, 1 - 1e-6)
    weight = torch.zeros(xs.shape[1], ys.shape[1], requires_grad=True)  # (D, T')
    bias = torch.log(freq / (1 - freq)).requires_grad_()  # (T',)
    opt = torch.optim.LBFGS([weight, bias], lr=lr, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xs @ weight + bias, ys)
        loss = loss + 0.5 * weight_decay * weight.square().sum(dim=0).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        scores = (test_x - mean) / std @ weight + bias  # (M, T')
    return mean_average_precision(scores, test_y[:, fitted])


def head_scores(model, dataset, indices: list[int], batch_size: int = 256) -> torch.Tensor:
    """(n, T) ``model.tag_logits`` of the dataset's items ``indices``, on CPU, in eval mode without gradients."""
    device, out = model_device(model), []
    with inference(model):
        for start in range(0, len(indices), batch_size):
            batch = torch.stack([dataset.image(int(i)) for i in indices[start : start + batch_size]])  # (B, 3, H, W)
            out.append(model.tag_logits(batch.to(device).float() / 255).float().cpu())
    return torch.cat(out)
