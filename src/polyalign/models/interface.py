"""The interface every polyalign model implements (the dual encoder and the fusion model), so that the trainer,
the evaluation and the app never ask ``hasattr``: what a model can do is declared by these members."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from polyalign.models.outputs import Output


@runtime_checkable
class Model(Protocol):
    """A contrastive model: two towers named by ``modalities``, a training ``forward`` and inference encoders."""

    modalities: tuple[str, str]  # (first, second) tower, e.g. ("image", "text"), ("audio", "text")
    has_itm: bool  # an image–text matching head: ``match_logits`` / ``itm_scores`` / ``gradcam_maps`` work (ITM re-ranking)
    has_tag_head: bool  # a tag classifier: ``tag_logits`` / ``tag_names`` work
    has_fdt: bool  # FDT head: the ``fdt_*`` inspection methods work
    all_parameters_used: bool  # False: some parameters get no gradient in a step (DDP must look for them)

    def forward(self, batch: dict[str, torch.Tensor]) -> Output:
        """The loss terms' inputs for a training batch (see ``polyalign.models.outputs``)."""

    def after_step(self, out: Output) -> None:
        """Called after each optimiser step with the (gathered) output: EMA teachers, queues, clamps."""

    def prepare(self, tokenizer, captions: list[str], images=()) -> int:
        """Once before training: cache frozen towers' outputs (a locked text tower's per caption, a frozen image
        prefix's per un-augmented training image, ``images``: (3, H, W) floats in [0, 1]). Returns the number cached."""

    def scale(self) -> torch.Tensor:
        """The contrastive logit scale (1 / temperature), as logged."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [0, 1] → normalised embeddings (B, E)."""

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask (B, L) → normalised embeddings (B, E)."""

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image backbone features (B, W) before projection (linear probes)."""

    def text_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens (B, L', D) and mask (B, L'), padding-only columns cut off."""
