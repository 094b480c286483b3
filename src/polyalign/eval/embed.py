"""Embed a dataset's items (images, audio clips, point clouds) and lists of texts in batches, in eval mode and
without gradients."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from polyalign.data.loader import item_inputs


@contextmanager
def inference(model):
    """Run the block in eval mode under ``torch.no_grad()``; the model's previous training mode is restored."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    first = next(iter(params), None)
    return first.device if first is not None else torch.device("cpu")


def embed_items(model, dataset, modality: str = "image", batch_size: int = 256, indices=None,
                features: bool = False) -> torch.Tensor:
    """(n, D) ``encode_<modality>`` embeddings (or (n, W) ``<modality>_features`` if ``features``) of a dataset's
    items, on the model's device."""
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if not indices:
        raise ValueError(f"embed_items: no {modality} items to embed")
    encode = getattr(model, f"{modality}_features" if features else f"encode_{modality}")
    device = model_device(model)
    out = []
    with inference(model):
        for start in tqdm(range(0, len(indices), batch_size), desc=f"embed {modality}", disable=None, leave=False):
            out.append(encode(*item_inputs(dataset, modality, indices[start : start + batch_size], device)))
    return torch.cat(out)


def embed_images(model, dataset, batch_size: int = 256, indices=None, features: bool = False) -> torch.Tensor:
    """(n, D) ``encode_image`` embeddings (or (n, W) ``image_features`` if ``features``) on the model's device."""
    return embed_items(model, dataset, "image", batch_size, indices, features)


def embed_texts(model, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """(len(texts), D) ``encode_text`` embeddings on the model's device."""
    if not texts:
        raise ValueError("embed_texts: no texts to embed")
    device = model_device(model)
    out = []
    with inference(model):
        for start in tqdm(range(0, len(texts), batch_size), desc="embed texts", disable=None, leave=False):
            ids, mask = tokenizer(list(texts[start : start + batch_size]))  # (B, L), (B, L)
            out.append(model.encode_text(ids.to(device), mask.to(device)))
    return torch.cat(out)
