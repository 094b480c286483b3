"""An ALBEF-style fusion model ("Align before Fuse: Vision and Language Representation Learning with Momentum
Distillation", Li et al., arXiv 2107.07651) with the three additions of "Improving Visual-Language Matching with
Text-Driven Soft Masks and Multimodal Data Augmentation" (Park & Han, CVPR 2023, arXiv 2304.00719):

1. ``soft_mask``: for each positive pair, the Grad-CAM map of one random caption token (ITM score, cross-attention
   of fusion layer ``gradcam_layer``) softly masks the image tokens; (masked image, caption) is an extra positive
   ITM pair (one more fusion pass and one partial backward per step).
2. ``focal_gamma`` > 0: ITC in the focal form ``−Σ_j y_ij (1 − p_ij)^γ log p_ij`` (γ = 0: plain ITC).
3. ``text_mask_aug``: the MLM-masked caption is what the student's encoders see for ITC and ITM too (one text
   pass serves all three losses); the momentum teacher's ITC features come from the clean caption.

``forward(batch)`` returns a flat dict read by ``polyalign.losses.albef.{itc,itm,mlm}_term``; ``after_step(out)``
(after the optimiser step) clamps the temperature, moves the momentum (EMA) copies and enqueues the step's momentum
features. The momentum copies, queues, queue pointer and step counter are module state: checkpoints carry them and a
resumed run continues exactly. ``encode_image``/``encode_text`` give the normalised ITC embeddings the retrieval and
zero-shot evaluations read; ``itm_scores`` scores pairs for ITM re-ranking (``polyalign.eval.rerank``).
Gradient caching (``train.grad_cache_chunk``) is not supported: ITM and MLM outputs are not per-sample.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist
from .errors import ConfigError
from .heads.fusion import FusionEncoder, MLMHead, itm_head
from .heads.gradcam import apply_soft_mask, gradcam, pick_words, word_masks
from .heads.projection import ProjectionHead
from .losses.albef import IGNORE, mask_tokens, sample_hard_negatives

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass
class FusionConfig:
    """The fusion model's settings; ALBEF's values unless marked (ours: CPU-sized, or the spec's reconstruction)."""

    fusion_layers: int = 2  # ours (ALBEF: 6, the second half of BERT-base)
    fusion_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    embed_dim: int = 256  # ITC space
    image_pool: str = ""  # cls | mean for the ITC projection; "" = the encoder's own
    text_pool: str = ""
    queue_size: int = 4096  # ours (ALBEF: 65,536); 0 = in-batch negatives only
    momentum: float = 0.995
    alpha: float = 0.4  # distillation weight of the momentum model's soft targets (ITC and MLM)
    alpha_ramp_steps: int = 200  # α grows linearly from 0 over these steps (ALBEF: the first epoch); 0 = no ramp
    init_temperature: float = 0.07
    temperature_range: tuple[float, float] = (0.001, 0.5)
    itc_weight: float = 1.0  # a loss with weight 0 is neither built nor computed
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    soft_mask: bool = False
    soft_mask_lambda: float = 1.0  # ṽ = v·(1 − λ·g)
    gradcam_layer: int = 0  # fusion block whose cross-attention drives the soft mask (ALBEF: the 3rd of 6); not the last
    focal_gamma: float = 0.0  # 0 = plain ITC; the paper's default when on: 2
    mlm_prob: float = 0.15
    text_mask_aug: bool = False


def check_fusion_config(cfg: FusionConfig, prefix: str = "model.fusion") -> None:
    """Raise ``ConfigError`` naming the ``<prefix>.<field>`` that holds an impossible value."""
    def bad(name, why):
        return ConfigError(f"{prefix}.{name} {why}, got {getattr(cfg, name)!r}")

    if not (cfg.itc_weight or cfg.itm_weight or cfg.mlm_weight):
        raise ConfigError(f"{prefix}: itc_weight, itm_weight and mlm_weight are all 0; nothing to train")
    if cfg.fusion_layers < 1:
        raise bad("fusion_layers", "must be >= 1")
    if cfg.queue_size < 0:
        raise bad("queue_size", "must be >= 0")
    if not 0.0 <= cfg.momentum <= 1.0:
        raise bad("momentum", "must lie in [0, 1]")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise bad("alpha", "must lie in [0, 1]")
    if cfg.alpha_ramp_steps < 0:
        raise bad("alpha_ramp_steps", "must be >= 0")
    lo, hi = cfg.temperature_range
    if not 0.0 < lo <= cfg.init_temperature <= hi:
        raise ConfigError(f"{prefix}: need 0 < temperature_range[0] <= init_temperature <= temperature_range[1], "
                          f"got {cfg.temperature_range!r} and {cfg.init_temperature!r}")
    if not 0.0 < cfg.mlm_prob < 1.0:
        raise bad("mlm_prob", "must lie in (0, 1)")
    if cfg.focal_gamma < 0:
        raise bad("focal_gamma", "must be >= 0")
    if not 0.0 <= cfg.soft_mask_lambda <= 1.0:
        raise bad("soft_mask_lambda", "must lie in [0, 1]")
    if cfg.soft_mask:
        if not cfg.itm_weight:
            raise ConfigError(f"{prefix}.soft_mask needs the ITM loss (itm_weight > 0): soft masks make ITM pairs")
        if not -cfg.fusion_layers <= cfg.gradcam_layer < cfg.fusion_layers:
            raise bad("gradcam_layer", f"must index one of the {cfg.fusion_layers} fusion layers")
        if cfg.gradcam_layer % cfg.fusion_layers == cfg.fusion_layers - 1:
            raise bad("gradcam_layer", "must not be the last fusion layer (there only the [CLS] token's attention "
                      "reaches the ITM score, so every word's Grad-CAM map is 0)")


def special_ids_of(tokenizer) -> dict[str, int]:
    """``{"[PAD]": id, ...}`` for the special tokens the tokenizer (ours: ``polyalign.tokenizer.Tokenizer``) has."""
    found = {t: tokenizer.tok.token_to_id(t) for t in SPECIAL_TOKENS}
    return {t: i for t, i in found.items() if i is not None}


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher ← m·teacher + (1 − m)·student for parameters; buffers (BatchNorm statistics) are copied."""
    for s, t in zip(student.parameters(), teacher.parameters()):
        t.lerp_(s.detach(), 1.0 - momentum)
    for s, t in zip(student.buffers(), teacher.buffers()):
        t.copy_(s)


@torch.no_grad()
def enqueue(queues: list[torch.Tensor], ptr: torch.Tensor, rows: list[torch.Tensor]) -> None:
    """Write ``rows[i]`` (n, ...) over the oldest entries of ``queues[i]`` (Q, ...) from ``ptr``, wrapping around
    (only the last Q rows when n > Q); then advance ``ptr`` (a 0-d long buffer)."""
    size = queues[0].shape[0]
    if size == 0:
        return
    n = min(rows[0].shape[0], size)
    idx = (int(ptr) + torch.arange(n, device=queues[0].device)) % size
    for q, r in zip(queues, rows):
        q[idx] = r[-n:].detach().to(q.dtype)
    ptr.fill_((int(ptr) + n) % size)


class FusionModel(nn.Module):
    """Image encoder + text encoder (ALBEF's first half of BERT) + fusion encoder (the second half), ITC projections,
    ITM and MLM heads, a learnable temperature and momentum copies with feature queues (see the module docstring).

    ``forward(batch)`` reads ``image`` (B, 3, H, W) in [0, 1], ``text``/``text_mask`` (B, L) and, when present,
    ``index`` (B,) item ids (captions of one item are never negatives of each other, in the batch or the queue).
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, cfg: FusionConfig, vocab_size: int,
                 special_ids: dict[str, int]):
        super().__init__()
        check_fusion_config(cfg)
        self.cfg, self.vocab_size = cfg, vocab_size
        self.special_ids = sorted(set(special_ids.values()))
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
            self.fusion = FusionEncoder(tw, iw, cfg.fusion_layers, cfg.fusion_heads, cfg.mlp_ratio, cfg.dropout)
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

    # --- inference API (retrieval, zero-shot, probes, re-ranking) ---
    def scale(self) -> torch.Tensor:
        """1 / temperature (the loop logs it as ``logit_scale``)."""
        return 1.0 / self.temperature()

    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(*self.cfg.temperature_range)

    def alpha(self) -> float:
        """The distillation weight now: ``alpha`` · min(1, step / alpha_ramp_steps)."""
        ramp = self.cfg.alpha_ramp_steps
        return self.cfg.alpha * (min(1.0, int(self.step) / ramp) if ramp else 1.0)

    def text_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text encoder tokens (B, L', D) and mask (B, L'), columns past the longest caption (padding) cut off."""
        ids, mask = self._trim(ids, mask)
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
    @staticmethod
    def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(int(mask.sum(dim=1).max()) if mask.shape[1] else 0, 1)
        return ids[:, :longest], mask[:, :longest]

    def forward(self, batch: dict) -> dict:
        """The loss terms' inputs (E: ITC width, Q: queue size, R: ITM pairs, n: masked tokens, V: vocabulary):

        - ITC: ``itc_image``/``itc_text`` (B, E) student features, ``momentum_image_emb``/``momentum_text_emb``
          (B, E) the teacher's (gathered under DDP), ``image_queue``/``text_queue`` (Q, E), ``index_queue`` (Q,),
          ``index`` (B,) if the batch has it, ``temp``, ``itc_alpha``, ``focal_gamma``;
        - ITM: ``itm_logits`` (R, 2), ``itm_labels`` (R,): B positives, B hard-negative images, B hard-negative
          texts, then (``soft_mask``) B soft-masked positives;
        - MLM: ``mlm_logits`` (n, V), ``mlm_labels`` (n,), ``mlm_soft`` (n, V) the teacher's probabilities, ``mlm_alpha``.
        Also ``logit_scale`` (1 / temperature).
        """
        cfg, out = self.cfg, {}
        images, index = batch["image"], batch.get("index")
        ids, mask = self._trim(batch["text"], batch["text_mask"])
        # training draws from the global RNG (the loop checkpoints it); evaluation from a fixed generator, so a
        # validation pass neither moves the training's random stream nor varies from one checkpoint to the next
        gen = None if self.training else torch.Generator(device=images.device).manual_seed(0)
        masked, labels = (mask_tokens(ids, mask, self.vocab_size, self.mask_id, self.special_ids, cfg.mlm_prob, gen)
                          if self.masking else (None, None))
        student_ids = masked if cfg.text_mask_aug else ids  # multimodal augmentation: the student sees the masked text
        v = self.image_encoder(images)  # (B, 1+N, Dv)
        w = self.text_encoder(student_ids, mask)  # (B, L, D)
        temp, alpha = self.temperature(), self.alpha()
        out.update(temp=temp, logit_scale=1.0 / temp)
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
                out.update(itc_image=image_feat, itc_text=text_feat, momentum_image_emb=image_m,
                           momentum_text_emb=text_m, image_queue=self.image_queue.clone(),
                           text_queue=self.text_queue.clone(), index_queue=queue_ids, itc_alpha=alpha,
                           focal_gamma=cfg.focal_gamma)
                if index is not None:
                    out["index"] = index
        fused_pos = None
        if cfg.itm_weight:
            with torch.no_grad():  # ALBEF: the student's features against the teacher's, local batch
                sim_i2t, sim_t2i = image_feat @ text_m.T / temp, text_feat @ image_m.T / temp  # (B, B)
            itm, fused_pos = self._itm(v, w, mask, student_ids, sim_i2t, sim_t2i, index, gen)
            out.update(itm)
        if cfg.mlm_weight:
            out.update(self._mlm(images, v, v_m, w, mask, masked, labels, fused_pos, alpha))
        return out

    def _itm(self, v, w, mask, ids, sim_i2t, sim_t2i, index, gen) -> tuple[dict, torch.Tensor]:
        """ITM logits and labels over positives, hard negatives and soft-masked positives; and the positives' fused
        tokens (B, L, D) (the MLM predictions under ``text_mask_aug``)."""
        cfg, b = self.cfg, v.shape[0]
        neg_image = sample_hard_negatives(sim_t2i, index, gen)  # (B,): an image for each text
        neg_text = sample_hard_negatives(sim_i2t, index, gen)  # (B,): a text for each image
        # one fusion pass over the 3B pairs: (w, v) positives, (w, v[neg]) and (w[neg], v) negatives
        texts, masks = torch.cat([w, w, w[neg_text]]), torch.cat([mask, mask, mask[neg_text]])
        images = torch.cat([v, v[neg_image], v])
        keep = cfg.gradcam_layer if cfg.soft_mask and torch.is_grad_enabled() else None
        fused, attn = self.fusion.forward_with_attention(texts, masks, images, keep)  # (3B, L, D)
        logits = self.itm_head(fused[:, 0])  # (3B, 2)
        labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(v.device)
        if cfg.soft_mask:
            if attn is not None:  # the partial backward: from the positives' match logits to layer k's attention
                maps = gradcam(attn, logits[:b, 1].sum(), self.has_cls)[:b]  # (B, L, N)
            else:  # no graph (validation): a separate pass
                maps = self.gradcam_maps(v, w, mask)
            g = word_masks(maps, pick_words(ids, mask, self.special_ids, gen))  # (B, N) in [0, 1], no gradient
            soft = self.fusion(w, mask, apply_soft_mask(v, g, cfg.soft_mask_lambda, self.has_cls))
            logits = torch.cat([logits, self.itm_head(soft[:, 0])])
            labels = torch.cat([labels, torch.ones_like(labels[:b])])
        return {"itm_logits": logits, "itm_labels": labels}, fused[:b]

    def _mlm(self, images, v, v_m, w, mask, masked, labels, fused_pos, alpha) -> dict:
        """MLM predictions at the masked tokens and the momentum model's (distillation) probabilities."""
        if fused_pos is None or not self.cfg.text_mask_aug:  # the ITM positives' pass saw the clean text
            w_masked = w if self.cfg.text_mask_aug else self.text_encoder(masked, mask)
            fused_pos = self.fusion(w_masked, mask, v)
        chosen = labels != IGNORE  # (B, L)
        out = {"mlm_logits": self.mlm_head(fused_pos[chosen]), "mlm_labels": labels[chosen], "mlm_alpha": alpha}
        if alpha > 0:
            with torch.no_grad():
                m = self.momentum
                v_m = m.image_encoder(images) if v_m is None else v_m
                fused_m = m.fusion(m.text_encoder(masked, mask), mask, v_m)
                out["mlm_soft"] = F.softmax(m.mlm_head(fused_m[chosen]).float(), dim=-1)
        return out

    @torch.no_grad()
    def after_step(self, out: dict) -> None:
        """After the optimiser step: clamp the temperature, EMA-update the momentum copies, enqueue the step's
        momentum features (every rank's, when gathered) with their item ids, count the step."""
        self.temp.clamp_(*self.cfg.temperature_range)
        for name, teacher in self.momentum.items():
            ema_update(getattr(self, name), teacher, self.cfg.momentum)
        if "momentum_image_emb" in out:
            image_keys = out.get("momentum_image_emb_all", out["momentum_image_emb"])
            text_keys = out.get("momentum_text_emb_all", out["momentum_text_emb"])
            index = out.get("index")
            if index is None:
                index = torch.full((image_keys.shape[0],), -1, dtype=torch.long, device=image_keys.device)
            elif index.shape[0] != image_keys.shape[0]:
                index = dist.all_gather_with_grad(index)  # every rank's ids, in rank order (a collective)
            enqueue([self.image_queue, self.text_queue, self.index_queue], self.queue_ptr,
                    [image_keys, text_keys, index])
        self.step += 1


def build_fusion_model(image_encoder: nn.Module, text_encoder: nn.Module, cfg: FusionConfig, vocab_size: int,
                       special_ids: dict[str, int]) -> FusionModel:
    """A ``FusionModel`` on ready-built encoders (``special_ids``: e.g. ``special_ids_of(tokenizer)``)."""
    return FusionModel(image_encoder, text_encoder, cfg, vocab_size, special_ids)
