"""The training objective: a weighted sum of named loss terms chosen in the config (``loss.weights``).

Each term reads typed fields of a model output (``polyalign.models.outputs``) and calls a pure loss function.
Adding a method = one function here (or in a sibling module), one entry in ``TERMS``, its name in
``polyalign.config.schema.LOSS_TERMS`` and a weight in a recipe. A term whose weight is 0 is not computed at all.
Under DDP the output is gathered (``out.gathered``): each term then returns this rank's share of the global-batch
loss, whose mean over ranks is the loss of one process on the whole batch.
"""
from __future__ import annotations

import dataclasses

import torch

from polyalign.config import LossConfig, check_loss
from polyalign.losses.contrastive import info_nce, local_info_nce
from polyalign.losses.fusion import itc_loss, itc_positives, itm_loss, mlm_loss
from polyalign.losses.intra import local_nt_xent, moco_info_nce, nt_xent, tag_bce
from polyalign.losses.tiled import tiled_info_nce
from polyalign.models.outputs import DualOutput, FusionOutput, Output


def _pair_info_nce(out: Output, cfg: LossConfig, a_field: str, b_field: str, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between two fields of ``out`` (dense or tiled per ``cfg.contrastive``); gathered: this
    rank's local share of the global-batch loss."""
    a, b, tiled = getattr(out, a_field), getattr(out, b_field), cfg.contrastive == "tiled"
    if out.gathered is not None:
        return local_info_nce(a, b, out.all_rows(a_field), out.all_rows(b_field), scale, out.rank_offset,
                              tiled, cfg.tile)
    return tiled_info_nce(a, b, scale, cfg.tile) if tiled else info_nce(a, b, scale)


def clip_term(out: DualOutput, cfg: LossConfig) -> torch.Tensor:
    """Symmetric InfoNCE between the two towers' projection-head embeddings (image–text, audio–text, ...)."""
    return _pair_info_nce(out, cfg, "first_emb", "second_emb", out.logit_scale)


def fdt_term(out: DualOutput, cfg: LossConfig) -> torch.Tensor:
    """Symmetric image–text InfoNCE on the FDT embeddings with their own logit scale (arXiv 2303.14865)."""
    return _pair_info_nce(out, cfg, "fdt_image_emb", "fdt_text_emb", out.fdt_logit_scale)


def image_image_term(out: DualOutput, cfg: LossConfig) -> torch.Tensor:
    """Two augmented views of each image: SimCLR NT-Xent in-batch, or MoCo (both views as queries, the other
    view's momentum key as positive, the queue as negatives)."""
    t = cfg.temperature("image_image")
    z1, z2 = out.image_view1_emb, out.image_view2_emb
    if out.moco_queue is not None:
        q = out.moco_queue
        return 0.5 * (moco_info_nce(z1, out.moco_key2_emb, q, t) + moco_info_nce(z2, out.moco_key1_emb, q, t))
    if out.gathered is not None:
        return local_nt_xent(z1, z2, out.all_rows("image_view1_emb"), out.all_rows("image_view2_emb"), t,
                             out.rank_offset)
    return nt_xent(z1, z2, t)


def text_text_term(out: DualOutput, cfg: LossConfig) -> torch.Tensor:
    """Two views of each caption (another caption of the item, or word dropout): symmetric in-batch InfoNCE."""
    a, b, scale = out.text_view1_emb, out.text_view2_emb, 1.0 / cfg.temperature("text_text")
    if out.gathered is not None:
        return local_info_nce(a, b, out.all_rows("text_view1_emb"), out.all_rows("text_view2_emb"), scale,
                              out.rank_offset)
    return info_nce(a, b, scale)


def tags_term(out: DualOutput, cfg: LossConfig) -> torch.Tensor:
    """Multi-label BCE of the image's tag scores against its tags (a per-sample mean: DDP averages it exactly)."""
    return tag_bce(out.tag_logits, out.tag_targets)


def itc_term(out: FusionOutput, cfg: LossConfig | None = None) -> torch.Tensor:
    """ITC of the fusion model: keys = [the teacher's features (every rank's under DDP); queue]."""
    image_m, text_m = out.momentum_image_emb, out.momentum_text_emb
    batch_i, batch_t = out.all_rows("momentum_image_emb"), out.all_rows("momentum_text_emb")
    image_keys = torch.cat([batch_i, out.image_queue])  # (K, E)
    text_keys = torch.cat([batch_t, out.text_queue])
    index, b = out.index, image_m.shape[0]
    if out.gathered is not None:  # the batch columns' ids are not gathered: the global batch has distinct items
        key_index = torch.cat([torch.full((batch_t.shape[0],), -1, device=batch_t.device), out.index_queue])
    else:
        key_index = None if index is None else torch.cat([index, out.index_queue])
    positives = itc_positives(b, text_keys.shape[0], out.rank_offset, index, key_index, image_m.device)
    return itc_loss(out.itc_image, out.itc_text, image_keys, text_keys, out.temp, positives,
                    image_m, text_m, out.itc_alpha, out.focal_gamma)


def itm_term(out: FusionOutput, cfg: LossConfig | None = None) -> torch.Tensor:
    """ITM of the fusion model: positives, hard negatives (and soft-masked positives)."""
    return itm_loss(out.itm_logits, out.itm_labels)


def mlm_term(out: FusionOutput, cfg: LossConfig | None = None) -> torch.Tensor:
    """MLM of the fusion model, distilled from the momentum model's predictions."""
    return mlm_loss(out.mlm_logits, out.mlm_labels, out.mlm_soft, out.mlm_alpha)


INTER_FIELDS = {  # the inter-modal terms (they read captions or tags) → the per-row fields they read
    "clip": ("first_emb", "second_emb"), "fdt": ("fdt_image_emb", "fdt_text_emb"),
    "text_text": ("text_view1_emb", "text_view2_emb"), "tags": ("tag_logits", "tag_targets"),
}


def captioned_only(name: str, term):
    """``term`` on the captioned rows alone (``out.caption_mask``, data.caption_fraction < 1): its fields cut to those
    rows, locally and in every rank's gathered rows, rescaled so that the mean over ranks stays the loss of one
    process on the global batch's captioned rows; 0 (with a graph: DDP's collectives still run) when there are none."""
    def restricted(out: DualOutput, cfg: LossConfig) -> torch.Tensor:
        keep = out.caption_mask
        if keep is None:
            return term(out, cfg)
        names, every = INTER_FIELDS[name], out.all_rows("caption_mask")
        n, total = int(keep.sum()), int(every.sum())
        if n == 0:  # no captioned row here: 0, still a function of the gathered rows (DDP's backward collectives)
            return sum(out.all_rows(f).float().sum() for f in names) * 0.0
        local = {f: getattr(out, f)[keep] for f in names}
        if out.gathered is None:
            return term(dataclasses.replace(out, **local), cfg)
        rows = {f: getattr(out.gathered, f)[every] for f in names if f in out.gather_fields()}  # tags: local rows
        cut = dataclasses.replace(out, **local, gathered=dataclasses.replace(out.gathered, **rows),
                                  rank_offset=int(every[:out.rank_offset].sum()))
        return term(cut, cfg) * (n * every.shape[0] / (keep.shape[0] * total))  # n / (total / world)
    restricted.__name__, restricted.__doc__ = term.__name__, term.__doc__
    return restricted


TERMS = {  # name → f(model output, loss config) -> scalar; the names are config.schema.LOSS_TERMS
    "clip": captioned_only("clip", clip_term),  # the inter-modal terms read the captioned rows only
    "image_image": image_image_term,  # every image
    "text_text": captioned_only("text_text", text_text_term),
    "tags": captioned_only("tags", tags_term),
    "fdt": captioned_only("fdt", fdt_term),
    "itc": itc_term,  # the fusion model's terms
    "itm": itm_term,
    "mlm": mlm_term,
}


class Objective:
    """Callable ``out → {"<name>_loss": value for each active term, "loss": weighted total}``."""

    def __init__(self, weights: dict[str, float] | LossConfig, modalities: tuple[str, str] = ("image", "text")):
        self.cfg = weights if isinstance(weights, LossConfig) else LossConfig(weights=dict(weights))
        check_loss(self.cfg)  # names, temperatures, a nonzero weight: the checks load_config runs
        self.modalities = tuple(modalities)
        self.weights = {k: float(w) for k, w in self.cfg.weights.items() if w != 0}

    def __call__(self, out: Output) -> dict[str, torch.Tensor]:
        losses = {f"{name}_loss": TERMS[name](out, self.cfg) for name in self.weights}
        losses["loss"] = sum(self.weights[name] * losses[f"{name}_loss"] for name in self.weights)
        return losses
