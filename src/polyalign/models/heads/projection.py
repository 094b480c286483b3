"""Projection head: pool tokens → project → L2-normalise."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from polyalign.distributed import GlobalBatchNorm2d
from polyalign.models.heads.fdt import query_mlp


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


class TokenMaxHead(nn.Module):
    """FDT's pooling without its codebook (the control of arXiv 2303.14865's claim): every token through FDT's query
    MLP (LayerNorm → Linear → GELU → LayerNorm → Linear), the max over the real tokens (``mask``; a ViT's [CLS] is
    left out with ``skip_first``, as FDT grounds patches only), L2-normalised. ``features`` (what probes read) pools
    the encoder's tokens as the linear head would (``pool``), so probes compare like with like."""

    def __init__(self, in_dim: int, embed_dim: int, pool: str, skip_first: bool = False):
        super().__init__()
        self.pool, self.skip_first = pool, skip_first
        self.proj = query_mlp(in_dim, embed_dim)  # FDT's own query MLP: the two differ by the codebook only

    def features(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return pool_tokens(tokens, mask, self.pool)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_first:
            tokens, mask = tokens[:, 1:], None if mask is None else mask[:, 1:]
        q = self.proj(tokens)  # (B, N, E)
        if mask is not None:
            q = q.masked_fill(~mask[..., None], -math.inf)
        z = q.max(1).values
        if mask is not None:
            z = z.masked_fill(~mask.any(1, keepdim=True), 0.0)  # a row without real tokens: 0 (normalize keeps it 0)
        return F.normalize(z.float(), dim=-1)  # (B, E)
