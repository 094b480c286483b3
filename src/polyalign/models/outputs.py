"""The typed contract between a model's ``forward`` and the loss terms (TorchMultimodal's ``CLIPOutput``, open_clip's
``CLIPTask`` in spirit): named, documented tensors; a field is ``None`` when the loss term that reads it is off.

Fields marked ``gather`` hold per-sample rows that the contrastive losses compare across the global batch. Under
torchrun :func:`polyalign.distributed.gather` returns a *new* output whose ``gathered`` holds every rank's rows of
those fields (same type, in rank order) and whose ``rank_offset`` is the global index of this rank's first row; in a
single process ``gathered`` stays ``None`` and the losses use the local rows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


def _gather(doc: str):
    return field(default=None, metadata={"gather": True, "doc": doc})


@dataclass
class Output:
    """What every model output carries besides its own fields."""

    logit_scale: Tensor | None = None  # () the contrastive scale the loop logs (1 / temperature)
    stats: dict[str, Tensor] = field(default_factory=dict)  # scalars for the training log, read by no loss
    gathered: Output | None = None  # every rank's rows of the ``gather`` fields (None: single process)
    rank_offset: int = 0  # global index of this rank's first row

    def gather_fields(self) -> list[str]:
        """Names of the set fields that hold per-sample rows compared across the global batch."""
        return [f.name for f in dataclasses.fields(self)
                if f.metadata.get("gather") and getattr(self, f.name) is not None]

    def fields_set(self) -> set[str]:
        """Names of the tensor fields this output carries (not None); the always-set numbers (α, γ) are left out."""
        return {f.name for f in dataclasses.fields(self) if f.name not in ("stats", "gathered", "rank_offset")
                and getattr(self, f.name) is not None and not isinstance(getattr(self, f.name), float)}

    def all_rows(self, name: str) -> Tensor | None:
        """Every rank's rows of field ``name``: the gathered ones under DDP, the local ones in one process."""
        return getattr(self if self.gathered is None else self.gathered, name)


@dataclass
class DualOutput(Output):
    """The dual encoder's outputs (``polyalign.models.dual``). First/second: the towers of ``modalities``
    (image–text: image, text; CLAP: audio, text; ULIP: points, image)."""

    first_emb: Tensor | None = _gather("(B, E) the first tower's normalised embeddings (clip)")
    second_emb: Tensor | None = _gather("(B, E) the second tower's normalised embeddings (clip)")
    fdt_image_emb: Tensor | None = _gather("(B, E') FDT image embeddings (fdt)")
    fdt_text_emb: Tensor | None = _gather("(B, E') FDT text embeddings (fdt)")
    fdt_logit_scale: Tensor | None = None  # () the FDT loss's own scale (fdt)
    image_view1_emb: Tensor | None = _gather("(B, I) first augmented view through the intra head (image_image)")
    image_view2_emb: Tensor | None = _gather("(B, I) second view (image_image)")
    moco_key1_emb: Tensor | None = _gather("(B, I) momentum keys of view 1, no gradient (image_image=moco)")
    moco_key2_emb: Tensor | None = _gather("(B, I) momentum keys of view 2 (image_image=moco)")
    moco_queue: Tensor | None = None  # (Q, I) the MoCo queue before this step's keys enter it
    text_view1_emb: Tensor | None = _gather("(B, I) the caption through the text intra head (text_text)")
    text_view2_emb: Tensor | None = _gather("(B, I) the second caption view (text_text)")
    tag_logits: Tensor | None = None  # (B, T) tag scores (tags)
    tag_targets: Tensor | None = None  # (B, T) multi-hot tags of the batch (tags)
    caption_mask: Tensor | None = _gather("(B,) bool: rows with a caption (data.caption_fraction < 1); the inter-modal "
                                          "terms read only these rows, the text fields of the others are 0")


@dataclass
class FusionOutput(Output):
    """The fusion model's outputs (``polyalign.models.fusion``). E: ITC width, Q: queue size, R: ITM pairs,
    n: masked tokens, V: vocabulary."""

    itc_image: Tensor | None = None  # (B, E) the student's ITC image features (itc)
    itc_text: Tensor | None = None  # (B, E) the student's ITC text features (itc)
    momentum_image_emb: Tensor | None = _gather("(B, E) the teacher's image features: ITC keys (itc)")
    momentum_text_emb: Tensor | None = _gather("(B, E) the teacher's text features of the clean caption (itc)")
    image_queue: Tensor | None = None  # (Q, E) older teacher image features (itc)
    text_queue: Tensor | None = None  # (Q, E)
    index_queue: Tensor | None = None  # (Q,) item ids of the queue rows, −1 = none (itc)
    index: Tensor | None = None  # (B,) item ids of the batch, when it has them
    temp: Tensor | None = None  # () the ITC temperature
    itc_alpha: float = 0.0  # distillation weight now
    focal_gamma: float = 0.0  # 0 = plain ITC
    itm_logits: Tensor | None = None  # (R, 2) positives, hard-negative images, hard-negative texts, soft-masked (itm)
    itm_labels: Tensor | None = None  # (R,) 1 = matching pair
    mlm_logits: Tensor | None = None  # (n, V) predictions at the masked tokens (mlm)
    mlm_labels: Tensor | None = None  # (n,) the original ids
    mlm_soft: Tensor | None = None  # (n, V) the teacher's probabilities (mlm with α > 0)
    mlm_alpha: float = 0.0
