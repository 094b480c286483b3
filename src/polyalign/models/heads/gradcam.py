"""Grad-CAM on the fusion encoder's cross-attention (ALBEF, arXiv 2107.07651) and the text-driven soft masks built
from it ("Improving Visual-Language Matching with Text-Driven Soft Masks", Park & Han, arXiv 2304.00719).

    A  = cross-attention probabilities at one fusion layer     (B, H, L, 1+N)
    s  = ITM match logit (class 1), summed over the batch
    dA = ∂s/∂A                                                 torch.autograd.grad: parameter .grad untouched
    G  = mean over heads of A[..., 1:] * relu(dA[..., 1:])     (B, L, N)   one map per text token

For an image encoder without a [CLS] token (our ConvNet: every token is a cell of the feature map) pass
``has_cls=False``: the maps then cover all N tokens and the soft mask scales all of them.
The maps are only informative at a layer before the last: the ITM head reads the fused [CLS] alone, so at the last
layer only the [CLS] query's attention reaches the score and every other token's map is 0.
"""
from __future__ import annotations

import torch


def gradcam(attention: torch.Tensor, score: torch.Tensor, has_cls: bool = True,
            retain_graph: bool = True) -> torch.Tensor:
    """Grad-CAM maps (B, L, N) of the probabilities ``attention`` (B, H, L, 1+N) for the scalar ``score``
    (computed from them); no gradient flows through the result and no parameter's ``.grad`` changes."""
    (grad,) = torch.autograd.grad(score, attention, retain_graph=retain_graph)
    first = 1 if has_cls else 0
    return (attention.detach()[..., first:] * grad[..., first:].clamp_min(0)).mean(1)


def pick_words(ids: torch.Tensor, mask: torch.Tensor, special_ids, generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """One position per row (B,), uniform over the real, non-special tokens (not [CLS]/[SEP]/[PAD]/[MASK]...);
    -1 for a row without any. A "word" is one BPE piece here."""
    specials = torch.as_tensor(list(special_ids), dtype=ids.dtype, device=ids.device)
    valid = mask.bool() & ~torch.isin(ids, specials)  # (B, L)
    draw = torch.rand(ids.shape, generator=generator, device=ids.device).masked_fill(~valid, -1.0)
    return torch.where(valid.any(1), draw.argmax(1), -1)  # argmax of iid uniforms: uniform over valid positions


def word_masks(maps: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """The map of each row's word, ``maps[b, words[b]]`` (B, N), min-max normalised to [0, 1]; rows with
    ``words == -1`` or a constant map give 0 (nothing masked)."""
    g = maps.detach()[torch.arange(maps.shape[0], device=maps.device), words.clamp_min(0)]  # (B, N)
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    g = torch.where(hi > lo, (g - lo) / (hi - lo).clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g))
    return g * (words >= 0)[:, None]


def apply_soft_mask(image: torch.Tensor, g: torch.Tensor, lam: float = 1.0, has_cls: bool = True) -> torch.Tensor:
    """ṽ = [v_cls ; v_patches · (1 − λ·g)]: image tokens (B, 1+N, D) scaled by the mask g (B, N) in [0, 1],
    with no gradient through g; [CLS] untouched (``has_cls=False``: every token is scaled)."""
    scale = (1.0 - lam * g.detach()).to(image.dtype)[..., None]  # (B, N, 1)
    if not has_cls:
        return image * scale
    return torch.cat([image[:, :1], image[:, 1:] * scale], dim=1)


def itm_gradcam(model, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                layer: int | None = None) -> torch.Tensor:
    """Per-token Grad-CAM maps (B, L, N) of a ``FusionModel`` for the pairs (images[b], caption b): what each caption
    token looks at when the model decides that the pair matches (``layer`` defaults to ``cfg.gradcam_layer``). For
    pictures, reshape N to the patch grid; rows past a caption's length are 0."""
    with torch.no_grad():
        v = model.image_encoder(images)
        w, m = model.text_tokens(ids, mask)
    maps = model.gradcam_maps(v, w, m, layer)  # (B, L', N): padding columns were cut
    return torch.nn.functional.pad(maps, (0, 0, 0, ids.shape[1] - maps.shape[1]))
