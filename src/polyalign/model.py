"""The dual-encoder contrastive model and its builder from config."""
from __future__ import annotations

import math

import torch
from torch import nn

from .albef import build_fusion_model
from .config import FUSION_TERMS, FdtConfig, LossConfig, ModelConfig, fusion_settings
from .encoders.audio import AudioCNN
from .encoders.image import ConvNet, ViT
from .encoders.points import PointNet
from .encoders.text import HFTextEncoder, TextTransformer
from .errors import ConfigError
from .heads.fdt import FDTHead
from .heads.momentum import MomentumEncoder
from .heads.projection import MLPHead, ProjectionHead


class ContrastiveModel(nn.Module):
    """Two towers with projection heads and a learnable temperature (CLIP, arXiv 2103.00020).

    The towers are named by their modality, ``modalities = (first, second)``: image–text (CLIP, the default),
    audio–text (CLAP, arXiv 2206.04769), points–image (ULIP, arXiv 2212.05171), ...; tower m is ``<m>_encoder`` +
    ``<m>_head`` and reads batch key ``m`` (``text`` with ``text_mask``, ``audio`` with ``audio_mask``).
    ``forward(batch)`` returns a flat dict whose keys the loss terms consume: ``<first>_emb`` (B, E),
    ``<second>_emb`` (B, E), ``logit_scale`` (scalar, clamped at ``max_logit_scale``); image–text models add the
    outputs of the MCT and FDT terms. Keys starting with ``stat/`` are scalars for the training log, read by no loss.
    """

    def __init__(self, first_encoder: nn.Module, second_encoder: nn.Module, embed_dim: int,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 first_pool: str = "", second_pool: str = "", modalities: tuple[str, str] = ("image", "text")):
        super().__init__()
        self.modalities = tuple(modalities)
        encoders = (first_encoder, second_encoder)
        for m, encoder in zip(self.modalities, encoders):  # image–text: image_encoder, text_encoder (checkpoint keys)
            setattr(self, f"{m}_encoder", encoder)
        for m, encoder, pool in zip(self.modalities, encoders, (first_pool, second_pool)):
            setattr(self, f"{m}_head", ProjectionHead(encoder.width, embed_dim, pool or encoder.pool))
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

    def _tokens(self, modality: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A tower's tokens (B, N, W) and token mask (B, N) (None: all real) from the batch's inputs."""
        if modality == "text":
            return self._text_tokens(batch["text"], batch["text_mask"])
        if modality == "audio":
            mask = batch.get("audio_mask")
            tokens = self.audio_encoder(batch["audio"], mask)
            return tokens, None if mask is None else self.audio_encoder.token_mask(mask)
        return getattr(self, f"{modality}_encoder")(batch[modality]), None  # image (B, 3, H, W), points (B, N, 3)

    def encode(self, modality: str, batch: dict) -> torch.Tensor:
        """Normalised embeddings (B, E) of one modality's inputs in ``batch`` (keys as in a training batch)."""
        if modality == "image":
            return self.encode_image(batch["image"])
        if modality == "text":
            return self.encode_text(batch["text"], batch["text_mask"])
        return getattr(self, f"{modality}_head")(*self._tokens(modality, batch))

    def features(self, modality: str, batch: dict) -> torch.Tensor:
        """Pooled backbone features (B, W) of one modality, before projection (for linear probes)."""
        return getattr(self, f"{modality}_head").features(*self._tokens(modality, batch)).float()

    def encode_audio(self, audio: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Waveforms (B, T) and sample mask (B, T) (None: all real) → normalised embeddings (B, E)."""
        return self.encode("audio", {"audio": audio, "audio_mask": mask})

    def encode_points(self, points: torch.Tensor) -> torch.Tensor:
        """Point clouds (B, N, 3) → normalised embeddings (B, E)."""
        return self.encode("points", {"points": points})

    def audio_features(self, audio: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.features("audio", {"audio": audio, "audio_mask": mask})

    def points_features(self, points: torch.Tensor) -> torch.Tensor:
        return self.features("points", {"points": points})

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
        ``tag_logits`` + ``tag_targets`` (tags). A model of other modalities returns ``<m>_emb`` of both towers."""
        if self.modalities != ("image", "text"):  # CLAP, ULIP, ...: the clip term only (config validation)
            return {**{f"{m}_emb": self.encode(m, batch) for m in self.modalities}, "logit_scale": self.scale()}
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


def build_encoder(cfg: ModelConfig, modality: str, image_size: int, vocab_size: int) -> nn.Module:
    """One tower's encoder from its config section (a literal choice, no registry)."""
    if modality == "image":
        ic = cfg.image
        if ic.kind == "vit":
            return ViT(image_size, ic.patch_size, ic.width, ic.layers, ic.heads, ic.mlp_ratio, ic.dropout)
        return ConvNet(ic.width, ic.layers)
    if modality == "text":
        tc = cfg.text
        if tc.kind == "hf":
            return HFTextEncoder(tc.hf_path, tc.lock, tc.cache)
        return TextTransformer(vocab_size, tc.context_length, tc.width, tc.layers, tc.heads, tc.mlp_ratio, tc.dropout)
    if modality == "audio":
        return AudioCNN(cfg.audio.width, cfg.audio.layers, n_mels=cfg.audio.n_mels, hop=cfg.audio.hop)
    if modality == "points":
        pc = cfg.points
        return PointNet(pc.width, pc.groups, pc.k, pc.hidden)
    raise ConfigError(f"unknown modality {modality!r} (image | text | audio | points)")


def build_model(cfg: ModelConfig, image_size: int, vocab_size: int, loss: LossConfig | None = None,
                tag_names: list[str] = (), special_ids: dict[str, int] | None = None) -> nn.Module:
    """Encoders (of ``cfg.modalities``) and heads from the config; the heads of the intra-modal and FDT terms with
    nonzero weight in ``loss`` are added (tags need the training data's ``tag_names``). The fusion terms (itc, itm,
    mlm) build the ALBEF-style ``FusionModel`` instead, on the same encoders (``special_ids``: the tokenizer's
    ``{"[MASK]": id, ...}``, for MLM)."""
    terms = loss.active() if loss else set()
    if terms & set(FUSION_TERMS):
        if special_ids is None:
            raise ConfigError("the fusion model needs the tokenizer's special token ids (build_model(special_ids=...))")
        return build_fusion_model(build_encoder(cfg, "image", image_size, vocab_size),
                                  build_encoder(cfg, "text", image_size, vocab_size), fusion_settings(cfg, loss),
                                  vocab_size, special_ids)
    first, second = cfg.modalities
    pools = [getattr(cfg, m).pool for m in cfg.modalities]
    model = ContrastiveModel(build_encoder(cfg, first, image_size, vocab_size),
                             build_encoder(cfg, second, image_size, vocab_size), cfg.embed_dim,
                             cfg.init_temperature, cfg.max_logit_scale, *pools, modalities=cfg.modalities)
    if terms - {"clip"} or (loss and "clip" not in terms):
        model.add_intra_modal(terms, cfg.intra_dim, loss.image_image, cfg.moco.queue_size, cfg.moco.momentum, tag_names)
    if "fdt" in terms:
        model.add_fdt(cfg.fdt, cfg.embed_dim)
    return model
