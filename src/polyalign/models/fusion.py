"""An ALBEF-style fusion model ("Align before Fuse: Vision and Language Representation Learning with Momentum
Distillation", Li et al., arXiv 2107.07651) with the three additions of "Improving Visual-Language Matching with
Text-Driven Soft Masks and Multimodal Data Augmentation" (Park & Han, CVPR 2023, arXiv 2304.00719):

1. ``soft_mask``: for each positive pair, the Grad-CAM map of one random caption token (ITM score, cross-attention
   of fusion layer ``gradcam_layer``) softly masks the image tokens; (masked image, caption) is an extra positive
   ITM pair (one more fusion pass and one partial backward per step).
2. ``focal_gamma`` > 0: ITC in the focal form ``−Σ_j y_ij (1 − p_ij)^γ log p_ij`` (γ = 0: plain ITC).
3. ``text_mask_aug``: the MLM-masked caption is what the student's encoders see for ITC and ITM too (one text
   pass serves all three losses); the momentum teacher's ITC features come from the clean caption.

``forward(batch)`` returns a ``FusionOutput`` (``polyalign.models.outputs``) read by the itc, itm and mlm terms of
``polyalign.losses.objective``; ``after_step(out)``
(after the optimiser step) clamps the temperature, moves the momentum (EMA) copies and enqueues the step's momentum
features. The momentum copies, queues, queue pointer and step counter are module state: checkpoints carry them and a
resumed run continues exactly. ``encode_image``/``encode_text`` give the normalised ITC embeddings the retrieval and
zero-shot evaluations read; ``itm_scores`` scores pairs for ITM re-ranking (``polyalign.eval.rerank``).
Gradient caching (``train.grad_cache_chunk``) is not supported: ITM and MLM outputs are not per-sample.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from polyalign import distributed as dist
from polyalign.config import FusionConfig, check_fusion_config
from polyalign.errors import ConfigError
from polyalign.models.encoders.efficientnet import warm_image_cache
from polyalign.models.encoders.text import trim_padding, warm_cache
from polyalign.models.heads.fusion import FusionEncoder, MLMHead, itm_head
from polyalign.models.heads.gradcam import apply_soft_mask, gradcam, pick_words, word_masks
from polyalign.models.heads.projection import ProjectionHead
from polyalign.models.heads.momentum import ema_update, enqueue
from polyalign.models.outputs import FusionOutput
from polyalign.models.sampling import IGNORE, mask_tokens, sample_hard_negatives


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for an index (K,) with repeats, with a backward that sums the repeats in a fixed order. On CPU
    ``x[index]``'s backward (``index_put_`` with accumulate) adds with parallel atomics on 2+ threads from 32768
    elements, so two runs differed in the last bits; ``index_select``'s (``index_add_``) adds in index order, as
    one thread does. On CUDA it is the other way round (PyTorch's ``use_deterministic_algorithms`` lists both)."""
    return x.index_select(0, index) if x.device.type == "cpu" else x[index]


class FusionModel(nn.Module):
    """Image encoder + text encoder (ALBEF's first half of BERT) + fusion encoder (the second half), ITC projections,
    ITM and MLM heads, a learnable temperature and momentum copies with feature queues (see the module docstring).

    ``forward(batch)`` reads ``image`` (B, 3, H, W) in [0, 1], ``text``/``text_mask`` (B, L) and, when present,
    ``index`` (B,) item ids (captions of one item are never negatives of each other, in the batch or the queue).
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, cfg: FusionConfig, vocab_size: int,
                 special_ids: dict[str, int], fusion_encoder: nn.Module | None = None, function_ids=()):
        super().__init__()
        check_fusion_config(cfg)
        self.cfg, self.vocab_size = cfg, vocab_size
        self.special_ids = sorted(set(special_ids.values()))
        self.not_content = sorted(set(self.special_ids) | set(function_ids))  # what the soft mask's word is never
        self.mask_id = special_ids.get("[MASK]")
        self.masking = bool(cfg.mlm_weight) or cfg.text_mask_aug
        if self.masking and self.mask_id is None:
            raise ConfigError("the MLM loss and text_mask_aug need a [MASK] token, which the tokenizer lacks")
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        # ViT: token 0 is [CLS] (kept out of the Grad-CAM maps and the soft mask); the ConvNet has none
        self.has_cls = getattr(image_encoder, "has_cls", getattr(image_encoder, "pool", "cls") == "cls")
        iw, tw = image_encoder.width, text_encoder.width
        self.image_proj = ProjectionHead(iw, cfg.embed_dim, cfg.image_pool or image_encoder.pool)
        self.text_proj = ProjectionHead(tw, cfg.embed_dim, cfg.text_pool or text_encoder.pool)
        self.temp = nn.Parameter(torch.tensor(float(cfg.init_temperature)))
        self.fusion = self.itm_head = self.mlm_head = None
        if cfg.itm_weight or cfg.mlm_weight:
            self.fusion = fusion_encoder or FusionEncoder(tw, iw, cfg.fusion_layers, cfg.fusion_heads, cfg.mlp_ratio,
                                                          cfg.dropout)  # given: a pretrained BERT's upper layers
        if cfg.itm_weight:
            self.itm_head = itm_head(tw)
        if cfg.mlm_weight:
            self.mlm_head = MLMHead(tw, vocab_size)
        # momentum (EMA) copies: the teacher of ITC (and of MLM: then with its own fusion encoder and MLM head)
        names = ["image_encoder", "text_encoder", "image_proj", "text_proj"]
        names += ["fusion", "mlm_head"] if cfg.mlm_weight and cfg.alpha > 0 else []
        self.momentum = nn.ModuleDict({n: copy.deepcopy(getattr(self, n)) for n in names})
        self.momentum.requires_grad_(False)
        g = torch.Generator().manual_seed(0)  # the initial queue must not move the global RNG
        q, e = cfg.queue_size, cfg.embed_dim
        self.register_buffer("image_queue", F.normalize(torch.randn(q, e, generator=g), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(q, e, generator=g), dim=1))
        self.register_buffer("index_queue", torch.full((q,), -1, dtype=torch.long))  # −1: no item id
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # completed optimiser steps (α ramp)
        # the training loop asks DDP to look for unused parameters when this is False: without ITC the projections
        # and the temperature get no gradient
        self.clip_on = bool(cfg.itc_weight)

    # --- what the model declares (polyalign.models.interface.Model) ---
    has_tag_head, has_fdt = False, False
    modalities = ("image", "text")  # the Model protocol: an image tower and a text tower

    @property
    def has_itm(self) -> bool:
        return self.itm_head is not None  # itm weight 0: no match score (no ITM re-ranking, no Grad-CAM)

    @property
    def all_parameters_used(self) -> bool:
        return self.clip_on  # without ITC the projections and the temperature get no gradient

    def prepare(self, tokenizer, captions, images=()) -> int:
        """Cache frozen pretrained towers' outputs: a locked text tower's for every training caption, a frozen image
        prefix's for ``images`` (0: nothing to cache)."""
        return warm_cache(self.text_encoder, tokenizer, captions) + warm_image_cache(self.image_encoder, images)

    # --- inference API (retrieval, zero-shot, probes, re-ranking) ---
    def scale(self) -> torch.Tensor:
        """1 / temperature (the loop logs it as ``logit_scale``)."""
        return 1.0 / self.temperature()

    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(*self.cfg.temperature_range)

    def alpha(self) -> float:
        """The distillation weight now: ``alpha`` · min(1, step / alpha_ramp_steps)."""
        ramp = self.cfg.alpha_ramp_steps  # (< 0: not resolved for a run, as for a model built to evaluate: no ramp)
        return self.cfg.alpha * (min(1.0, int(self.step) / ramp) if ramp > 0 else 1.0)

    def text_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text encoder tokens (B, L', D) and mask (B, L'), columns past the longest caption (padding) cut off."""
        ids, mask = trim_padding(ids, mask)
        return self.text_encoder(ids, mask), mask

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [0, 1] → normalised ITC embeddings (B, E)."""
        return self.image_proj(self.image_encoder(images))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) and mask (B, L) → normalised ITC embeddings (B, E)."""
        return self.text_proj(*self.text_tokens(ids, mask))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image backbone features (B, W) before projection, for linear probes."""
        return self.image_proj.features(self.image_encoder(images)).float()

    def match_logits(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ITM match logit (class 1) (B,) of the pairs (image_tokens[b], text_tokens[b]) from encoder tokens."""
        return self.itm_head(self.fusion(text_tokens, mask, image_tokens)[:, 0])[:, 1]

    def itm_scores(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ITM match logit (B,) of the pairs (images[b], caption b): higher = the model believes they match."""
        return self.match_logits(self.image_encoder(images), *self.text_tokens(ids, mask))

    def gradcam_maps(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, mask: torch.Tensor,
                     layer: int | None = None) -> torch.Tensor:
        """Per-token Grad-CAM maps (B, L, N) of the ITM match score for the pairs, from a separate fusion pass on
        detached tokens (works under ``torch.no_grad``; no parameter's ``.grad`` changes)."""
        layer = self.cfg.gradcam_layer if layer is None else layer
        with torch.enable_grad():
            v = image_tokens.detach().requires_grad_()  # the graph exists even with frozen weights
            fused, attn = self.fusion.forward_with_attention(text_tokens.detach(), mask, v, layer)
            score = self.itm_head(fused[:, 0])[:, 1].sum()
            return gradcam(attn, score, self.has_cls, retain_graph=False)

    # --- training ---
    def forward(self, batch: dict) -> FusionOutput:
        """The ITC, ITM and MLM fields of :class:`FusionOutput` for the terms with a weight (ITM rows: B positives,
        B hard-negative images, B hard-negative texts, then with ``soft_mask`` B soft-masked positives)."""
        cfg, out = self.cfg, FusionOutput()
        images, index = batch["image"], batch.get("index")
        ids, mask = trim_padding(batch["text"], batch["text_mask"])
        # training draws from the global RNG (the loop checkpoints it); evaluation from a fixed generator, so a
        # validation pass neither moves the training's random stream nor varies from one checkpoint to the next
        gen = None if self.training else torch.Generator(device=images.device).manual_seed(0)
        masked, labels = (mask_tokens(ids, mask, self.vocab_size, self.mask_id, self.special_ids, cfg.mlm_prob, gen)
                          if self.masking else (None, None))
        student_ids = masked if cfg.text_mask_aug else ids  # multimodal augmentation: the student sees the masked text
        v = self.image_encoder(images)  # (B, 1+N, Dv)
        w = self.text_encoder(student_ids, mask)  # (B, L, D)
        temp, alpha = self.temperature(), self.alpha()
        out.temp, out.logit_scale = temp, 1.0 / temp
        v_m = None
        if cfg.itc_weight or cfg.itm_weight:
            image_feat, text_feat = self.image_proj(v), self.text_proj(w, mask)  # (B, E)
            with torch.no_grad():
                v_m = self.momentum.image_encoder(images)
                image_m = self.momentum.image_proj(v_m)
                text_m = self.momentum.text_proj(self.momentum.text_encoder(ids, mask), mask)  # the clean caption
            if cfg.itc_weight:
                # the queue's ids are training items': in evaluation (another split) they name other items
                queue_ids = self.index_queue.clone() if self.training else torch.full_like(self.index_queue, -1)
                out.itc_image, out.itc_text, out.momentum_image_emb, out.momentum_text_emb = \
                    image_feat, text_feat, image_m, text_m
                out.image_queue, out.text_queue = self.image_queue.clone(), self.text_queue.clone()
                out.index_queue, out.index, out.itc_alpha, out.focal_gamma = queue_ids, index, alpha, cfg.focal_gamma
        fused_pos = None
        if cfg.itm_weight:
            with torch.no_grad():  # ALBEF: the student's features against the teacher's, local batch
                sim_i2t, sim_t2i = image_feat @ text_m.T / temp, text_feat @ image_m.T / temp  # (B, B)
            out.itm_logits, out.itm_labels, fused_pos = self._itm(v, w, mask, student_ids, sim_i2t, sim_t2i, index, gen)
        if cfg.mlm_weight:
            out.mlm_logits, out.mlm_labels, out.mlm_soft = self._mlm(images, v, v_m, w, mask, masked, labels, fused_pos, alpha)
            out.mlm_alpha = alpha
        return out

    def _itm(self, v, w, mask, ids, sim_i2t, sim_t2i, index, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITM logits and labels over positives, hard negatives and soft-masked positives; and the positives' fused
        tokens (B, L, D) (the MLM predictions under ``text_mask_aug``)."""
        cfg, b = self.cfg, v.shape[0]
        neg_image = sample_hard_negatives(sim_t2i, index, gen)  # (B,): an image for each text
        neg_text = sample_hard_negatives(sim_i2t, index, gen)  # (B,): a text for each image
        # one fusion pass over the 3B pairs: (w, v) positives, (w, v[neg]) and (w[neg], v) negatives
        texts, masks = torch.cat([w, w, take_rows(w, neg_text)]), torch.cat([mask, mask, mask[neg_text]])
        images = torch.cat([v, take_rows(v, neg_image), v])
        keep = cfg.gradcam_layer if cfg.soft_mask and torch.is_grad_enabled() else None
        fused, attn = self.fusion.forward_with_attention(texts, masks, images, keep)  # (3B, L, D)
        logits = self.itm_head(fused[:, 0])  # (3B, 2)
        labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(v.device)
        if cfg.soft_mask:
            if attn is not None:  # the partial backward: from the positives' match logits to layer k's attention
                maps = gradcam(attn, logits[:b, 1].sum(), self.has_cls)[:b]  # (B, L, N)
            else:  # no graph (validation): a separate pass
                maps = self.gradcam_maps(v, w, mask)
            g = word_masks(maps, pick_words(ids, mask, self.not_content, gen))  # (B, N) in [0, 1], no gradient
            soft = self.fusion(w, mask, apply_soft_mask(v, g, cfg.soft_mask_lambda, self.has_cls))
            logits = torch.cat([logits, self.itm_head(soft[:, 0])])
            labels = torch.cat([labels, torch.ones_like(labels[:b])])
        return logits, labels, fused[:b]

    def _mlm(self, images, v, v_m, w, mask, masked, labels, fused_pos, alpha) -> tuple[torch.Tensor, ...]:
        """MLM predictions at the masked tokens and the momentum model's (distillation) probabilities."""
        if fused_pos is None or not self.cfg.text_mask_aug:  # the ITM positives' pass saw the clean text
            w_masked = w if self.cfg.text_mask_aug else self.text_encoder(masked, mask)
            fused_pos = self.fusion(w_masked, mask, v)
        chosen = labels != IGNORE  # (B, L)
        logits, soft = self.mlm_head(fused_pos[chosen]), None
        if alpha > 0:
            with torch.no_grad():
                m = self.momentum
                v_m = m.image_encoder(images) if v_m is None else v_m
                fused_m = m.fusion(m.text_encoder(masked, mask), mask, v_m)
                soft = F.softmax(m.mlm_head(fused_m[chosen]).float(), dim=-1)
        return logits, labels[chosen], soft

    @torch.no_grad()
    def after_step(self, out: FusionOutput) -> None:
        """After the optimiser step: clamp the temperature, EMA-update the momentum copies, enqueue the step's
        momentum features (every rank's, when gathered) with their item ids, count the step."""
        self.temp.clamp_(*self.cfg.temperature_range)
        for name, teacher in self.momentum.items():
            ema_update(getattr(self, name), teacher, self.cfg.momentum)
        if out.momentum_image_emb is not None:
            image_keys, text_keys = out.all_rows("momentum_image_emb"), out.all_rows("momentum_text_emb")
            index = out.index
            if index is None:
                index = torch.full((image_keys.shape[0],), -1, dtype=torch.long, device=image_keys.device)
            elif index.shape[0] != image_keys.shape[0]:
                index = dist.all_gather_with_grad(index)  # every rank's ids, in rank order (a collective)
            enqueue([self.image_queue, self.text_queue, self.index_queue], self.queue_ptr,
                    [image_keys, text_keys, index])
        self.step += 1
