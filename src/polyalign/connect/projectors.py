"""Projectors that connect two frozen contrastive spaces: one per space, shared by both modalities of that space.

C-MCR: Wang et al., "Connecting Multi-modal Contrastive Representations", arXiv 2305.14381.
The anchor_x mode (ResidualProjector, FixedSpace) is inspired by Ex-MCR, "Extending Multi-modal Contrastive
Representations", arXiv 2310.08884, not its released recipe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polyalign.config.connect import PROJECTOR_KINDS


class CMCRProjector(nn.Module):
    """Maps one space's normalised embeddings (B, in_dim) into the common space (B, out_dim), L2-normalised.

    ``mlp`` (the audio–visual setting): Linear(d→2d) → BatchNorm → ReLU → Linear(2d→out) → BatchNorm;
    ``linear`` (the 3D setting): Linear(d→out) → BatchNorm → ReLU. Xavier-uniform weights, zero biases.
    BatchNorm follows the module's mode: batch statistics in ``train()``, running statistics in ``eval()``.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp"):
        super().__init__()
        if kind == "mlp":
            hidden = 2 * in_dim
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                     nn.Linear(hidden, out_dim), nn.BatchNorm1d(out_dim))
        elif kind == "linear":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim), nn.ReLU())
        else:
            raise ValueError(f"unknown projector kind {kind!r} ({' | '.join(PROJECTOR_KINDS)})")
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)  # (B, out_dim)


class ResidualProjector(nn.Module):
    """Map of a space *into* a fixed base space (anchor_x, inspired by Ex-MCR): ``h = W x`` (W identity-initialised,
    or the leading identity block when the dims differ), ``normalize(h + MLP(h))`` with the MLP's last layer
    zero-initialised, so training starts from the identity map."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(out_dim, in_dim))
            self.linear.bias.zero_()
        self.mlp = nn.Sequential(nn.Linear(out_dim, 2 * out_dim), nn.ReLU(), nn.Linear(2 * out_dim, out_dim))
        nn.init.xavier_uniform_(self.mlp[0].weight)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)  # (B, out_dim)
        return F.normalize(h + self.mlp(h), dim=-1)


class FixedSpace(nn.Module):
    """The fixed base space of anchor_x: no parameters, embeddings pass through (re-normalised)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)
