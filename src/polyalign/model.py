"""The dual-encoder contrastive model and its builder from config."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig
from .encoders.image import ConvNet, ViT
from .encoders.text import HFTextEncoder, TextTransformer
from .heads.projection import ProjectionHead


class ContrastiveModel(nn.Module):
    """Image and text towers with projection heads and a learnable temperature (CLIP, arXiv 2103.00020).

    ``forward(batch)`` returns a flat dict whose keys the loss terms consume:
    ``image_emb`` (B, E), ``text_emb`` (B, E), ``logit_scale`` (scalar, clamped at ``max_logit_scale``).
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 image_pool: str = "", text_pool: str = ""):
        super().__init__()
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.image_head = ProjectionHead(image_encoder.width, embed_dim, image_pool or image_encoder.pool)
        self.text_head = ProjectionHead(text_encoder.width, embed_dim, text_pool or text_encoder.pool)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(0.0, self.max_log_scale).exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [0, 1] → normalised embeddings (B, E)."""
        return self.image_head(self.image_encoder(images))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) and mask (B, L) → normalised embeddings (B, E).

        Columns past the batch's longest caption hold only padding, which attention and pooling ignore:
        they are cut off first, so short captions cost what their length does, not the context length.
        """
        longest = int(mask.sum(dim=1).max()) if mask.shape[1] else 0
        ids, mask = ids[:, : max(longest, 1)], mask[:, : max(longest, 1)]
        return self.text_head(self.text_encoder(ids, mask), mask)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image backbone features (B, W) before projection, for linear probes."""
        return self.image_head.features(self.image_encoder(images)).float()

    def forward(self, batch: dict) -> dict:
        return {"image_emb": self.encode_image(batch["image"]),
                "text_emb": self.encode_text(batch["text"], batch["text_mask"]),
                "logit_scale": self.scale()}


def build_model(cfg: ModelConfig, image_size: int, vocab_size: int) -> ContrastiveModel:
    """Encoders and heads from the config (a literal choice, no registry)."""
    ic, tc = cfg.image, cfg.text
    if ic.kind == "vit":
        image = ViT(image_size, ic.patch_size, ic.width, ic.layers, ic.heads, ic.mlp_ratio, ic.dropout)
    else:
        image = ConvNet(ic.width, ic.layers)
    if tc.kind == "hf":
        text = HFTextEncoder(tc.hf_path, tc.lock, tc.cache)
    else:
        text = TextTransformer(vocab_size, tc.context_length, tc.width, tc.layers, tc.heads, tc.mlp_ratio, tc.dropout)
    return ContrastiveModel(image, text, cfg.embed_dim, cfg.init_temperature, cfg.max_logit_scale, ic.pool, tc.pool)
