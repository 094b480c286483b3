"""A pre-LayerNorm Transformer block on PyTorch's fused scaled-dot-product attention (the layout of HF's CLIP
encoder layers, so a ViT / causal text tower maps onto ``transformers.CLIPModel`` exactly: serve/hf_export.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-LN self-attention + MLP; ``mask`` (B, N) is True for real tokens, False for padding; ``causal``: token i
    attends to tokens ≤ i only (CLIP's text tower)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, causal: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.dropout, self.causal = heads, dropout, causal
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N): keys that may be attended
        if self.causal and attn_mask is not None:  # (B, 1, N, N): real keys at or before the query
            attn_mask = attn_mask & torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal and attn_mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, N, D)))
        return x + self.drop(self.mlp(self.ln2(x)))


class Transformer(nn.Module):
    """A stack of :class:`Block` followed by a final LayerNorm."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 causal: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, causal) for _ in range(layers))
        self.ln = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return self.ln(x)
