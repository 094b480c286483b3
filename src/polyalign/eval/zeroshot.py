"""Zero-shot classification from prompt templates (CLIP, "Learning Transferable Visual Models From Natural
Language Supervision", arXiv:2103.00020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from polyalign.eval.embed import embed_texts


def prompt_name(classname: str) -> str:
    """A class name as it reads in a prompt: ``face-smiling`` → ``face smiling``, ``golden_retriever`` → ``golden retriever``."""
    return " ".join(classname.replace("-", " ").replace("_", " ").split())


def zeroshot_classifier(model, tokenizer, classnames: list[str], templates: list[str], batch_size: int = 256) -> torch.Tensor:
    """(C, D) class weights: per class, the renormalised mean of its normalised template embeddings."""
    if not classnames or not templates:
        raise ValueError("zeroshot_classifier needs at least one class name and one template")
    texts = [template.format(prompt_name(name)) for name in classnames for template in templates]
    emb = embed_texts(model, tokenizer, texts, batch_size).view(len(classnames), len(templates), -1)  # (C, T, D)
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)


def zeroshot_hits(img_emb: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(N,) bool: whether each image's most similar class weight is its label."""
    if img_emb.shape[0] == 0:
        raise ValueError("zeroshot_accuracy: no images")
    pred = (img_emb @ classifier.to(img_emb).T).argmax(dim=1)  # (N,)
    return pred == labels.to(pred.device)


def zeroshot_accuracy(img_emb: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> float:
    """Fraction of images whose most similar class weight is their label."""
    return zeroshot_hits(img_emb, labels, classifier).float().mean().item()
