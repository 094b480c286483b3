"""ALBEF's multimodal (fusion) encoder and its ITM and MLM heads ("Align before Fuse: Vision and Language
Representation Learning with Momentum Distillation", Li et al., arXiv 2107.07651).

The text encoder is the first half of ALBEF's BERT; this is the second half. Every layer (pre-LN here):

    x = x + SelfAttn(LN(x); text mask)              (B, L, D)   text tokens attend to text tokens
    x = x + CrossAttn(q = LN(x), k = v = image)     (B, L, D)   text tokens attend to image tokens (B, 1+N, Dv)
    x = x + MLP(LN(x))

The keys and values of the cross-attention are projected from the image width ``Dv`` to ``D``, so the image and
text towers may differ in width (BERT's ``encoder_width``). The cross-attention probabilities of one chosen layer can
be returned (before dropout, inside the graph) for Grad-CAM; hook them with ``Tensor.register_hook``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossBlock(nn.Module):
    """Self-attention over text, cross-attention text→image, MLP; ``mask`` (B, L) is True on real text tokens."""

    def __init__(self, width: int, image_width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.ln1, self.qkv, self.proj = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.ln2, self.q, self.kv = nn.LayerNorm(width), nn.Linear(width, width), nn.Linear(image_width, 2 * width)
        self.cross_proj = nn.Linear(width, width)
        self.ln3 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) → (B, H, T, D/H)
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, image: torch.Tensor,
                keep_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, D) text, (B, 1+N, Dv) image → (B, L, D) and, if ``keep_attention``, the cross-attention
        probabilities (B, H, L, 1+N) (else None)."""
        B, L, D = x.shape
        p = self.dropout if self.training else 0.0
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L): keys that may be attended
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, L, D)))

        q = self._heads(self.q(self.ln2(x)))  # (B, H, L, D/H)
        k, v = (self._heads(t) for t in self.kv(image).chunk(2, dim=-1))  # (B, H, 1+N, D/H) each
        attn = None
        if keep_attention:  # explicit probabilities, saved before dropout (the fused kernel never forms them)
            attn = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, L, 1+N)
            y = F.dropout(attn, p, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        x = x + self.drop(self.cross_proj(y.transpose(1, 2).reshape(B, L, D)))
        return x + self.drop(self.mlp(self.ln3(x))), attn


class FusionEncoder(nn.Module):
    """A stack of :class:`CrossBlock` and a final LayerNorm: text tokens fused with image tokens."""

    def __init__(self, width: int, image_width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(CrossBlock(width, image_width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(width)

    def forward(self, text: torch.Tensor, mask: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor:
        """Text tokens (B, L, D) + mask (B, L), image tokens (B, 1+N, Dv) → fused tokens (B, L, D)."""
        return self.forward_with_attention(text, mask, image, None)[0]

    def forward_with_attention(self, text: torch.Tensor, mask: torch.Tensor | None, image: torch.Tensor,
                               layer: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``forward``, plus the cross-attention probabilities (B, H, L, 1+N) of block ``layer`` (None: none)."""
        if layer is not None:
            layer = range(len(self.blocks))[layer]  # negative indices allowed; IndexError when out of range
        x, kept = text, None
        for i, block in enumerate(self.blocks):
            x, attn = block(x, mask, image, keep_attention=i == layer)
            kept = attn if attn is not None else kept
        return self.ln(x), kept


class MLMHead(nn.Module):
    """BERT's prediction head: Linear → GELU → LayerNorm → Linear(vocab)."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., D) fused tokens → (..., vocab) logits."""
        return self.decoder(self.transform(tokens))


def itm_head(width: int) -> nn.Linear:
    """ITM classifier on the fused [CLS] token: logits (B, 2), class 1 = the image and text match."""
    return nn.Linear(width, 2)
