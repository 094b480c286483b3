"""Text encoders: token ids (B, L) + mask (B, L) → tokens (B, L, D)."""
from __future__ import annotations

import torch
from torch import nn

from polyalign.config.checks import resolve_hf_path
from polyalign.errors import ConfigError
from polyalign.models.encoders.transformer import Transformer


class TextTransformer(nn.Module):
    """A Transformer over BPE ids; position 0 holds [CLS], the last real one [SEP], padding is masked out of attention.
    Bidirectional, or ``causal`` (CLIP's text tower: with ``pool="eos"``, exportable as HF ``CLIPModel``)."""

    pool = "mean"  # measured: mean pooling escapes the early collapse faster than [CLS] on the demo budget

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, causal: bool = False):
        super().__init__()
        self.width, self.causal = width, causal
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, dropout, causal)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        return self.transformer(x, mask)  # (B, L, D)


def trim_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the columns past the batch's longest caption (padding only, which attention and pooling ignore), so
    short captions cost what their length does, not the context length: (B, L) → (B, L')."""
    longest = max(int(mask.sum(dim=1).max()) if mask.shape[1] else 0, 1)
    return ids[:, :longest], mask[:, :longest]


def warm_cache(encoder: nn.Module, tokenizer, captions) -> int:
    """Cache a locked HF tower's outputs for ``captions`` (0 for any other encoder: nothing to cache)."""
    return encoder.warm_cache(tokenizer, captions) if isinstance(encoder, HFTextEncoder) else 0


def _split_layers(model: nn.Module, keep: int, path: str) -> list[nn.Module]:
    """Cut a BERT-like model after layer ``keep``; returns the layers cut off."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is None:
        raise ConfigError(f"model.fusion.text_split: {path!r} has no encoder.layer list (a BERT-like model)")
    if not 0 < keep < len(layers):
        raise ConfigError(f"model.fusion.text_split={keep}: {path!r} has {len(layers)} layers; keep 1 to "
                          f"{len(layers) - 1} of them for the text encoder (the rest become the fusion encoder)")
    upper = list(layers[keep:])
    model.encoder.layer = nn.ModuleList(layers[:keep])
    model.config.num_hidden_layers = keep
    return upper


class HFTextEncoder(nn.Module):
    """A pretrained HF text tower loaded offline from a local directory; ``lock`` freezes it (LiT, arXiv 2111.07991).

    A locked tower is a fixed function of the token ids, so with ``cache`` its outputs are kept per distinct
    token sequence and computed once: ``warm_cache`` fills the cache with the training captions in a fixed order
    (sorted, fixed batches), so the values do not depend on batch composition and a resumed run is exact.
    """

    pool = "mean"
    WARM_BATCH = 256

    def __init__(self, path: str, lock: bool = False, cache: bool = True, train_layers: int = -1,
                 keep_layers: int = 0):
        super().__init__()
        from transformers import AutoModel  # imported lazily: heavy, and only this encoder needs it
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a local load of 103 tensors takes no time: no bar on every command

        self.model = AutoModel.from_pretrained(str(resolve_hf_path(path)), local_files_only=True)
        self.width = self.model.config.hidden_size
        self.lock = lock
        self.cache_enabled = lock and cache
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}  # token ids (unpadded) → (n, D) outputs
        # keep_layers > 0: only the first K layers encode text; the rest are handed over (``upper_layers``, not
        # submodules of this tower) to become ALBEF's fusion encoder (models/heads/bert_fusion.py)
        self.upper_layers: list[nn.Module] = []
        if keep_layers:
            self.upper_layers = _split_layers(self.model, keep_layers, path)
        self._frozen: list[nn.Module] = [self.model] if lock else []
        if not lock and train_layers >= 0:  # fine-tune only the last K Transformer layers (of those kept)
            layers = getattr(getattr(self.model, "encoder", None), "layer", None)
            if layers is None:
                raise ConfigError(f"model.text.train_layers: {path!r} has no encoder.layer list (a BERT-like model)")
            self._frozen = [m for name, m in self.model.named_children() if name != "encoder"]
            self._frozen += list(layers[: max(len(layers) - train_layers, 0)])
        for module in self._frozen:
            module.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen:
            module.eval()  # frozen parts (a locked tower, the layers below train_layers) keep dropout off
        return self

    def _run(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attn = None if mask is None else mask.long()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.lock):
            return self.model(input_ids=ids, attention_mask=attn).last_hidden_state  # (B, L, D)

    @staticmethod
    def _keys(ids: torch.Tensor, mask: torch.Tensor | None) -> list[tuple[int, ...]]:
        rows = ids.tolist()
        if mask is None:
            return [tuple(r) for r in rows]
        return [tuple(t for t, m in zip(r, mr) if m) for r, mr in zip(rows, mask.tolist())]

    def _fill(self, keys: list[tuple[int, ...]]) -> None:
        """Compute and store the outputs of ``keys`` (distinct, not cached) in one padded batch."""
        device = self.model.device
        length = max(len(k) for k in keys)
        ids = torch.zeros(len(keys), length, dtype=torch.long, device=device)
        mask = torch.zeros(len(keys), length, dtype=torch.bool, device=device)
        for row, key in enumerate(keys):
            ids[row, : len(key)] = torch.tensor(key, device=device)
            mask[row, : len(key)] = True
        with torch.no_grad():
            out = self._run(ids, mask)  # (n, length, D)
        for row, key in enumerate(keys):
            self._cache[key] = out[row, : len(key)].clone()

    def warm_cache(self, tokenizer, texts) -> int:
        """Cache the outputs for ``texts`` (deduplicated, sorted, fixed batches); returns the number cached."""
        if not self.cache_enabled:
            return 0
        keys = sorted(set(self._keys(*tokenizer(sorted(set(texts))))) - self._cache.keys())
        for start in range(0, len(keys), self.WARM_BATCH):
            self._fill(keys[start : start + self.WARM_BATCH])
        return len(keys)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.cache_enabled:
            return self._run(ids, mask)
        keys = self._keys(ids, mask)
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if missing:
            self._fill(missing)
        out = torch.zeros(ids.shape[0], ids.shape[1], self.width, device=ids.device)  # padding stays 0
        for row, key in enumerate(keys):
            out[row, : len(key)] = self._cache[key]  # a left-aligned mask, as the tokenizer makes
        return out
