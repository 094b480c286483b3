"""Point-cloud encoders: points (B, N, 3) → tokens (B, G, D). Pooling is the head's job.

``PointNet`` follows PointNet (Qi et al., arXiv 1612.00593) per point and PointNet++'s set abstraction (Qi et al.,
arXiv 1706.02413) for tokens: a shared per-point MLP, then G centres by farthest-point sampling, each token the
max over its k nearest points of an MLP of (point feature, offset from the centre). Every step is a function of the
point *set*: the sampling starts from the point farthest from the centroid (not from index 0), and a max ignores
order, so tokens do not depend on the order of the points (up to float rounding of the centroid).
"""
from __future__ import annotations

import torch
from torch import nn


def farthest_points(points: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (B, n) of n points spread by farthest-point sampling of (B, N, 3), starting from the point farthest
    from the centroid."""
    far = (points - points.mean(1, keepdim=True)).square().sum(-1).argmax(1)  # (B,)
    dist = torch.full(points.shape[:2], float("inf"), device=points.device)
    chosen = []
    for _ in range(n):
        chosen.append(far)
        centre = points[torch.arange(len(points)), far]  # (B, 3)
        dist = torch.minimum(dist, (points - centre[:, None]).square().sum(-1))
        far = dist.argmax(1)
    return torch.stack(chosen, 1)


def _mlp(*dims: int) -> nn.Sequential:
    """Linear → LayerNorm → GELU per layer (applied to the last axis: shared over points)."""
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.GELU()]
    return nn.Sequential(*layers)


class PointNet(nn.Module):
    """Per-point MLP (3 → hidden → hidden), then ``groups`` tokens, each max-pooled over its ``k`` nearest points of
    MLP(feature, offset) → (B, groups, width). ``forward(points (B, N, 3), mask=None)``: all clouds of a batch have
    N points (the datasets sample a fixed number; point dropout repeats points instead of removing them)."""

    pool = "mean"  # a mean over tokens that are themselves local max-pools

    def __init__(self, width: int, groups: int = 32, k: int = 32, hidden: int = 64, **_):
        super().__init__()
        self.width, self.groups, self.k = width, groups, k
        self.point_mlp = _mlp(3, hidden, hidden)
        self.group_mlp = _mlp(hidden + 3, width, width)

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            raise ValueError("PointNet takes no mask: every cloud of a batch has the same number of points")
        b, n, _ = points.shape
        feats = self.point_mlp(points)  # (B, N, hidden)
        idx = farthest_points(points, min(self.groups, n))  # (B, G)
        centres = points.gather(1, idx[..., None].expand(-1, -1, 3))  # (B, G, 3)
        near = torch.cdist(centres, points).topk(min(self.k, n), dim=-1, largest=False).indices  # (B, G, k)
        rows = torch.arange(b, device=points.device)[:, None, None]
        local = torch.cat([feats[rows, near], points[rows, near] - centres[:, :, None]], -1)  # (B, G, k, hidden + 3)
        return self.group_mlp(local).amax(2)  # (B, G, width)
