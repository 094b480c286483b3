"""Projection head: pool tokens → project → L2-normalise."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polyalign.distributed import GlobalBatchNorm2d


def pool_tokens(tokens: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, N, D) → (B, D): ``cls`` takes token 0, ``mean`` averages the tokens where ``mask`` is True, ``eos`` takes the
    last real token (``mask`` left-aligned, as the tokenizer makes it: [SEP], where CLIP's text tower pools)."""
    if how == "cls":
        return tokens[:, 0]
    if how == "eos":
        if mask is None:
            return tokens[:, -1]
        last = (mask.sum(1) - 1).clamp_min(0)  # (B,)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]
    if how == "mean":
        if mask is None:
            return tokens.mean(1)
        m = mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ValueError(f"unknown pooling {how!r} (cls | mean | eos)")


class ProjectionHead(nn.Module):
    """Pools encoder tokens and maps them into the shared embedding space: linearly (CLIP), or with ``mlp`` through
    Linear → GELU → Linear (MCT's per-modality MLP heads, arXiv 2104.12836). No BatchNorm: an item's embedding
    depends on that item alone."""

    def __init__(self, in_dim: int, embed_dim: int, pool: str, mlp: bool = False):
        super().__init__()
        self.pool = pool
        self.proj = (nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, embed_dim, bias=False))
                     if mlp else nn.Linear(in_dim, embed_dim, bias=False))

    def features(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled backbone features (B, in_dim), before projection (what a linear probe reads)."""
        return pool_tokens(tokens, mask, self.pool)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.proj(self.features(tokens, mask)).float(), dim=-1)  # (B, embed_dim)


class MLPHead(nn.Module):
    """Pool → Linear → BatchNorm → ReLU → Linear → L2-normalise: the projection of SimCLR/MoCo-v2 (arXiv 2002.05709),
    used by the intra-modal objectives so they do not constrain the shared image–text space directly."""

    def __init__(self, in_dim: int, out_dim: int, pool: str, hidden: int | None = None):
        super().__init__()
        self.pool, hidden = pool, hidden or in_dim
        # BatchNorm over the global batch under DDP (as a 2-d norm over (B, hidden, 1, 1))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.Unflatten(1, (hidden, 1, 1)),
                                 GlobalBatchNorm2d(hidden), nn.Flatten(1), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.net(pool_tokens(tokens, mask, self.pool)).float(), dim=-1)  # (B, out_dim)
