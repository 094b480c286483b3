"""ALBEF's split of a pretrained BERT: the lower layers encode text, the upper layers become the fusion encoder, each
with a new cross-attention to the image tokens between its self-attention and its feed-forward block (ALBEF's
``xbert``: BERT-base's layers 0–5 text, 6–11 fusion; here e.g. MiniLM-L6's 0–2 and 3–5).

A fusion layer (post-LayerNorm, as BERT):

    x = LN_a(x + SelfAttn(x; text mask))         pretrained (BERT's attention.self + attention.output)
    x = LN_c(x + CrossAttn(q = x, k = v = image)) new (image width Dv → D)
    x = LN_o(x + FFN(x))                          pretrained (BERT's intermediate + output)

The layers are evaluated here from their weights (query/key/value, dense, LayerNorm, intermediate.dense and its
activation), not through ``BertLayer.forward``, whose mask format and keyword arguments change between transformers
versions; ``tests/test_bert_fusion.py`` checks the text path against ``BertLayer`` itself. The cross-attention
probabilities of one layer can be returned inside the graph, for Grad-CAM, as ``FusionEncoder`` does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:  # (B, T, D) → (B, H, T, D/H)
    return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)


def _merge(y: torch.Tensor) -> torch.Tensor:  # (B, H, T, D/H) → (B, T, D)
    return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)


class BertFusionLayer(nn.Module):
    """One pretrained BERT layer (``layer``: a transformers ``BertLayer``) with a new cross-attention to the image."""

    def __init__(self, layer: nn.Module, image_width: int, heads: int, eps: float, dropout: float):
        super().__init__()
        self.layer, self.heads, self.dropout = layer, heads, dropout
        width = layer.attention.self.query.in_features
        self.cross_q, self.cross_kv = nn.Linear(width, width), nn.Linear(image_width, 2 * width)
        self.cross_proj, self.cross_ln = nn.Linear(width, width), nn.LayerNorm(width, eps=eps)
        self.drop = nn.Dropout(dropout)

    def self_attention(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """BERT's self-attention block, residual and LayerNorm included: (B, L, D) → (B, L, D)."""
        att, p = self.layer.attention, self.dropout if self.training else 0.0
        q, k, v = (_heads(lin(x), self.heads) for lin in (att.self.query, att.self.key, att.self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :],
                                           dropout_p=p)
        return att.output.LayerNorm(att.output.dropout(att.output.dense(_merge(y))) + x)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """BERT's feed-forward block, residual and LayerNorm included."""
        out = self.layer.output
        return out.LayerNorm(out.dropout(out.dense(self.layer.intermediate(x))) + x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, image: torch.Tensor,
                keep_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, D) text, (B, N, Dv) image → (B, L, D), and with ``keep_attention`` the cross-attention
        probabilities (B, H, L, N) (else None)."""
        p = self.dropout if self.training else 0.0
        x = self.self_attention(x, mask)
        q = _heads(self.cross_q(x), self.heads)
        k, v = (_heads(t, self.heads) for t in self.cross_kv(image).chunk(2, dim=-1))
        attn = None
        if keep_attention:  # explicit probabilities before dropout, for Grad-CAM
            attn = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
            y = F.dropout(attn, p, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        x = self.cross_ln(x + self.drop(self.cross_proj(_merge(y))))
        return self.feed_forward(x), attn


class BertFusionEncoder(nn.Module):
    """The upper layers of a pretrained BERT as ALBEF's fusion encoder; the interface of ``FusionEncoder``."""

    def __init__(self, layers: list[nn.Module], image_width: int, heads: int, eps: float = 1e-12,
                 dropout: float = 0.0):
        super().__init__()
        self.width = layers[0].attention.self.query.in_features
        self.blocks = nn.ModuleList(BertFusionLayer(layer, image_width, heads, eps, dropout) for layer in layers)

    def forward(self, text: torch.Tensor, mask: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(text, mask, image, None)[0]

    def forward_with_attention(self, text: torch.Tensor, mask: torch.Tensor | None, image: torch.Tensor,
                               layer: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if layer is not None:
            layer = range(len(self.blocks))[layer]
        x, kept = text, None
        for i, block in enumerate(self.blocks):
            x, attn = block(x, mask, image, keep_attention=i == layer)
            kept = attn if attn is not None else kept
        return x, kept  # BERT's layers end in a LayerNorm: no final one


def bert_fusion_encoder(text_encoder: nn.Module, image_width: int, dropout: float = 0.0) -> BertFusionEncoder:
    """The fusion encoder from the layers an ``HFTextEncoder`` built with ``keep_layers`` handed over (trainable)."""
    cfg, layers = text_encoder.model.config, text_encoder.upper_layers
    text_encoder.upper_layers = []  # handed over (a momentum copy of the tower must not copy them again)
    for layer in layers:
        layer.requires_grad_(True)
    return BertFusionEncoder(layers, image_width, cfg.num_attention_heads, cfg.layer_norm_eps, dropout)
