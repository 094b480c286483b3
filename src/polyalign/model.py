"""The dual-encoder contrastive model and its builder from config."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import FdtConfig, LossConfig, ModelConfig
from .encoders.image import ConvNet, ViT
from .encoders.text import HFTextEncoder, TextTransformer
from .errors import ConfigError
from .heads.fdt import FDTHead
from .heads.momentum import MomentumEncoder
from .heads.projection import MLPHead, ProjectionHead


class ContrastiveModel(nn.Module):
    """Image and text towers with projection heads and a learnable temperature (CLIP, arXiv 2103.00020).

    ``forward(batch)`` returns a flat dict whose keys the loss terms consume:
    ``image_emb`` (B, E), ``text_emb`` (B, E), ``logit_scale`` (scalar, clamped at ``max_logit_scale``).
    Keys starting with ``stat/`` are scalars for the training log, read by no loss.
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 image_pool: str = "", text_pool: str = ""):
        super().__init__()
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.image_head = ProjectionHead(image_encoder.width, embed_dim, image_pool or image_encoder.pool)
        self.text_head = ProjectionHead(text_encoder.width, embed_dim, text_pool or text_encoder.pool)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)
        # MCT parts (arXiv 2104.12836), present only when their loss term is on (see ``add_intra_modal``)
        self.image_intra_head = self.text_intra_head = self.momentum = self.tag_head = None
        self.tag_names: list[str] = []
        self.clip_on = True
        self.fdt: FDTHead | None = None  # FDT (arXiv 2303.14865), present only when its loss term is on

    def add_intra_modal(self, terms: set[str], intra_dim: int, image_image: str = "simclr",
                        queue_size: int = 4096, momentum: float = 0.999, tag_names: list[str] = ()) -> None:
        """Add the heads the active intra-modal terms need: ``image_image`` (MLP head; ``moco``: plus a momentum
        encoder and queue), ``text_text`` (MLP head), ``tags`` (linear tag classifier over ``tag_names``).
        ``clip`` absent from ``terms`` skips the image–text embeddings (and the text tower) in ``forward``."""
        self.clip_on = "clip" in terms
        iw, tw = self.image_encoder.width, self.text_encoder.width
        if "image_image" in terms:
            self.image_intra_head = MLPHead(iw, intra_dim, self.image_head.pool)
            if image_image == "moco":
                self.momentum = MomentumEncoder(self.image_encoder, self.image_intra_head, intra_dim, queue_size, momentum)
        if "text_text" in terms:
            self.text_intra_head = MLPHead(tw, intra_dim, self.text_head.pool)
        if "tags" in terms:
            if not tag_names:
                raise ConfigError("loss.weights.tags > 0 but the training data has no tag seen on at least "
                                  "data.tag_min_count items: lower data.tag_min_count or drop the term")
            self.tag_names = list(tag_names)
            self.tag_head = nn.Linear(iw, len(tag_names))

    def add_fdt(self, cfg: FdtConfig, embed_dim: int) -> None:
        """Add the FDT head: a codebook shared by both modalities and a query MLP per modality. From then on
        ``encode_image``/``encode_text`` return the FDT embeddings (the paper evaluates with them)."""
        self.fdt = FDTHead(self.image_encoder.width, self.text_encoder.width, cfg.codebook_size,
                           cfg.dim or embed_dim, cfg.t_fdt, cfg.norm, cfg.pool, cfg.chunk,
                           math.exp(self.logit_scale.item()), cfg.logit_scale_range)  # CLIP's initial scale, clamped

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(0.0, self.max_log_scale).exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [0, 1] → normalised embeddings (B, E): the FDT ones when the FDT head exists
        (also next to the clip term: FDT is the method under study), else the projection head's."""
        tokens = self.image_encoder(images)
        return self.fdt.image(self._patches(tokens))[0] if self.fdt is not None else self.image_head(tokens)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) and mask (B, L) → normalised embeddings (B, E).

        Columns past the batch's longest caption hold only padding, which attention and pooling ignore:
        they are cut off first, so short captions cost what their length does, not the context length.
        """
        tokens, mask = self._text_tokens(ids, mask)
        return self.fdt.text(tokens, mask)[0] if self.fdt is not None else self.text_head(tokens, mask)

    def fdt_image_weights(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) → FDT weights (B, C) over the codebook (sparse with sparsemax)."""
        return self.fdt.image(self._patches(self.image_encoder(images)))[1]

    def fdt_text_weights(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask (B, L) → FDT weights (B, C) over the codebook."""
        return self.fdt.text(*self._text_tokens(ids, mask))[1]

    def fdt_image_relevance(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) → relevance (B, N, C) of each patch to each codebook entry (before pooling):
        ``[:, :, c].view(B, h, w)`` is entry c's heat map over an h×w patch grid."""
        return self.fdt.image_relevance(self._patches(self.image_encoder(images)))

    def fdt_text_relevance(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask (B, L) → relevance (B, L', C) of each word to each entry (padding −inf; L' = the
        longest caption)."""
        return self.fdt.text_relevance(*self._text_tokens(ids, mask))

    def _patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image tokens FDT grounds: the patches, without the ViT's CLS at token 0 (the CNN has none)."""
        return tokens[:, 1:] if isinstance(self.image_encoder, ViT) else tokens

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image backbone features (B, W) before projection, for linear probes."""
        return self.image_head.features(self.image_encoder(images)).float()

    def tag_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) → tag scores (B, T) over ``tag_names`` (needs the tags term)."""
        return self.tag_head(self.image_features(images))

    def _text_tokens(self, ids: torch.Tensor, mask: torch.Tensor):
        longest = max(int(mask.sum(dim=1).max()) if mask.shape[1] else 0, 1)
        ids, mask = ids[:, :longest], mask[:, :longest]
        return self.text_encoder(ids, mask), mask

    def forward(self, batch: dict) -> dict:
        """Outputs the active loss terms read: ``image_emb``/``text_emb``/``logit_scale`` (clip),
        ``fdt_image_emb``/``fdt_text_emb``/``fdt_logit_scale`` (fdt; plus the mean number of active codebook
        entries, ``stat/fdt_{image,text}_active``), ``image_view{1,2}_emb`` and, with MoCo,
        ``moco_key{1,2}_emb`` + ``moco_queue`` (image_image), ``text_view{1,2}_emb`` (text_text),
        ``tag_logits`` + ``tag_targets`` (tags)."""
        out, b = {}, batch["image"].shape[0]
        views = self.image_intra_head is not None
        tokens = self.image_encoder(torch.cat([batch["image"], batch["image_view2"]]) if views else batch["image"])
        if self.clip_on or self.fdt is not None or self.text_intra_head is not None:
            text_tokens, mask = self._text_tokens(batch["text"], batch["text_mask"])
        if self.clip_on:
            out.update(image_emb=self.image_head(tokens[:b]), text_emb=self.text_head(text_tokens, mask),
                       logit_scale=self.scale())
        if self.fdt is not None:
            (zi, wi), (zt, wt) = self.fdt.image(self._patches(tokens[:b])), self.fdt.text(text_tokens, mask)
            out.update(fdt_image_emb=zi, fdt_text_emb=zt, fdt_logit_scale=self.fdt.scale())
            out.update({"stat/fdt_image_active": (wi > 0).sum(1).float().mean(),  # (w > 0): no gradient
                        "stat/fdt_text_active": (wt > 0).sum(1).float().mean(),
                        "stat/fdt_logit_scale": out["fdt_logit_scale"].detach()})
        if views:
            z = self.image_intra_head(tokens)  # both views through one BatchNorm
            out.update(image_view1_emb=z[:b], image_view2_emb=z[b:])
            if self.momentum is not None:
                k = self.momentum.keys(torch.cat([batch["image"], batch["image_view2"]]))
                out.update(moco_key1_emb=k[:b], moco_key2_emb=k[b:], moco_queue=self.momentum.queue.clone())
        if self.text_intra_head is not None:
            t2, m2 = self._text_tokens(batch["text_view2"], batch["text_view2_mask"])
            out.update(text_view1_emb=self.text_intra_head(text_tokens, mask),
                       text_view2_emb=self.text_intra_head(t2, m2))
        if self.tag_head is not None:
            out.update(tag_logits=self.tag_head(self.image_head.features(tokens[:b]).float()),
                       tag_targets=batch["tags"])
        return out

    @torch.no_grad()
    def after_step(self, out: dict) -> None:
        """After the optimiser step: the FDT logit scale is put back into its range; MoCo's EMA update of the
        key encoder, then the step's keys (every rank's, when gathered) enter the queue."""
        if self.fdt is not None:
            self.fdt.clamp_logit_scale()
        if self.momentum is None:
            return
        self.momentum.update(self.image_encoder, self.image_intra_head)
        keys = [out.get("moco_key1_emb_all", out["moco_key1_emb"]), out.get("moco_key2_emb_all", out["moco_key2_emb"])]
        self.momentum.enqueue(torch.cat(keys))


def build_model(cfg: ModelConfig, image_size: int, vocab_size: int, loss: LossConfig | None = None,
                tag_names: list[str] = ()) -> ContrastiveModel:
    """Encoders and heads from the config (a literal choice, no registry); the heads of the intra-modal and FDT
    terms with nonzero weight in ``loss`` are added (tags need the training data's ``tag_names``)."""
    ic, tc = cfg.image, cfg.text
    if ic.kind == "vit":
        image = ViT(image_size, ic.patch_size, ic.width, ic.layers, ic.heads, ic.mlp_ratio, ic.dropout)
    else:
        image = ConvNet(ic.width, ic.layers)
    if tc.kind == "hf":
        text = HFTextEncoder(tc.hf_path, tc.lock, tc.cache)
    else:
        text = TextTransformer(vocab_size, tc.context_length, tc.width, tc.layers, tc.heads, tc.mlp_ratio, tc.dropout)
    model = ContrastiveModel(image, text, cfg.embed_dim, cfg.init_temperature, cfg.max_logit_scale, ic.pool, tc.pool)
    terms = loss.active() if loss else set()
    if terms - {"clip"} or (loss and "clip" not in terms):
        model.add_intra_modal(terms, cfg.intra_dim, loss.image_image, cfg.moco.queue_size, cfg.moco.momentum, tag_names)
    if "fdt" in terms:
        model.add_fdt(cfg.fdt, cfg.embed_dim)
    return model
