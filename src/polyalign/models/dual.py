"""The dual encoder: two towers with projection heads and a learnable temperature (CLIP, arXiv 2103.00020), plus
the optional heads of MCT (arXiv 2104.12836) and FDT (arXiv 2303.14865), all handed in ready-built by
``polyalign.models.build``."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from polyalign import distributed as dist
from polyalign.models.encoders.efficientnet import warm_image_cache
from polyalign.models.encoders.text import trim_padding, warm_cache
from polyalign.models.heads.fdt import FDTHead
from polyalign.models.heads.momentum import MomentumEncoder, MomentumTower, ema_update
from polyalign.models.heads.projection import MLPHead, ProjectionHead
from polyalign.models.outputs import DualOutput


@dataclass
class IntraHeads:
    """MCT's heads, each ``None`` when its loss term is off: ``image`` (image_image), ``momentum`` (its MoCo mode:
    EMA key encoder + queue), ``text`` (text_text), ``text_momentum`` (its EMA text tower, model.text_momentum),
    ``tags`` (a linear classifier over ``tag_names``)."""

    image: MLPHead | None = None
    momentum: MomentumEncoder | None = None
    text: MLPHead | None = None
    text_momentum: MomentumTower | None = None
    tags: nn.Linear | None = None
    tag_names: list[str] = field(default_factory=list)


class DualEncoder(nn.Module):
    """Towers named by their modality, ``modalities = (first, second)``: image–text (CLIP, the default), audio–text
    (CLAP, arXiv 2206.04769), points–image (ULIP, arXiv 2212.05171), ...; tower m is ``<m>_encoder`` + ``<m>_head``
    and reads batch key ``m`` (``text`` with ``text_mask``, ``audio`` with ``audio_mask``). ``forward`` returns a
    :class:`DualOutput`. ``clip_on=False`` (no clip term) skips the image–text embeddings and the text tower."""

    has_itm = False

    def __init__(self, encoders: tuple[nn.Module, nn.Module], heads: tuple[ProjectionHead, ProjectionHead],
                 modalities: tuple[str, str] = ("image", "text"), init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0, intra: IntraHeads | None = None, fdt: FDTHead | None = None,
                 clip_on: bool = True):
        super().__init__()
        self.modalities = tuple(modalities)
        for m, encoder in zip(self.modalities, encoders):  # image–text: image_encoder, text_encoder (checkpoint keys)
            setattr(self, f"{m}_encoder", encoder)
        for m, head in zip(self.modalities, heads):
            setattr(self, f"{m}_head", head)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)
        intra = intra or IntraHeads()
        self.image_intra_head, self.momentum = intra.image, intra.momentum
        self.text_intra_head, self.tag_head, self.tag_names = intra.text, intra.tags, list(intra.tag_names)
        self.text_momentum = intra.text_momentum
        self.fdt, self.clip_on = fdt, clip_on

    # --- what the model declares (polyalign.models.interface.Model) ---
    @property
    def has_tag_head(self) -> bool:
        return self.tag_head is not None

    @property
    def has_fdt(self) -> bool:
        return self.fdt is not None

    @property
    def all_parameters_used(self) -> bool:
        return self.clip_on  # no clip term: the projection heads (and, without text_text, the text tower) idle

    def prepare(self, tokenizer, captions, images=()) -> int:
        """Cache frozen pretrained towers' outputs: a locked text tower's for every training caption, a frozen image
        prefix's for ``images`` (0: nothing to cache)."""
        n = warm_cache(self.text_encoder, tokenizer, captions) if "text" in self.modalities else 0
        return n + (warm_image_cache(self.image_encoder, images) if "image" in self.modalities else 0)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(0.0, self.max_log_scale).exp()

    # --- inference ---
    def _tokens(self, modality: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A tower's tokens (B, N, W) and token mask (B, N) (None: all real) from the batch's inputs."""
        if modality == "text":
            return self.text_tokens(batch["text"], batch["text_mask"])
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
        return self.fdt.image(self.patches(tokens))[0] if self.fdt is not None else self.image_head(tokens)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) and mask (B, L) → normalised embeddings (B, E) (FDT's when the FDT head exists)."""
        tokens, mask = self.text_tokens(ids, mask)
        return self.fdt.text(tokens, mask)[0] if self.fdt is not None else self.text_head(tokens, mask)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image backbone features (B, W) before projection, for linear probes."""
        return self.image_head.features(self.image_encoder(images)).float()

    def tag_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) → tag scores (B, T) over ``tag_names`` (needs the tags term)."""
        return self.tag_head(self.image_features(images))

    def text_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = trim_padding(ids, mask)
        return self.text_encoder(ids, mask), mask

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image tokens FDT grounds: the patches, without a ViT's [CLS] at token 0 (the CNN has none)."""
        return tokens[:, 1:] if self.image_encoder.has_cls else tokens

    @torch.no_grad()
    def fdt_queries(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The FDT queries of a training batch's un-augmented images and captions: (B, N, D), (B', L', D) and the
        caption mask (B', L') (captioned rows only), for ``FDTHead.calibrate``."""
        rows = self._text_rows(batch.get("captioned"))
        pick = (lambda x: x) if rows is None else (lambda x: x[rows])
        q_image = self.fdt.image_query(self.patches(self.image_encoder(batch["image"])))
        tokens, mask = self.text_tokens(pick(batch["text"]), pick(batch["text_mask"]))
        return q_image, self.fdt.text_query(tokens), mask

    # --- FDT inspection (polyalign inspect fdt) ---
    def fdt_image_weights(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) → FDT weights (B, C) over the codebook (sparse with sparsemax)."""
        return self.fdt.image(self.patches(self.image_encoder(images)))[1]

    def fdt_text_weights(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask (B, L) → FDT weights (B, C) over the codebook."""
        return self.fdt.text(*self.text_tokens(ids, mask))[1]

    def fdt_image_relevance(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels → relevance (B, N, C) of each patch to each entry: ``[:, :, c].view(B, h, w)`` is a heat map."""
        return self.fdt.image_relevance(self.patches(self.image_encoder(images)))

    def fdt_text_relevance(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask → relevance (B, L', C) of each word to each entry (padding −inf)."""
        return self.fdt.text_relevance(*self.text_tokens(ids, mask))

    # --- training ---
    def forward(self, batch: dict) -> DualOutput:
        """The active terms' fields of :class:`DualOutput`; a model of other modalities fills the clip term's."""
        if self.modalities != ("image", "text"):  # CLAP, ULIP, ...: the clip term only (config validation)
            first, second = (self.encode(m, batch) for m in self.modalities)
            return DualOutput(first_emb=first, second_emb=second, logit_scale=self.scale())
        out, b = DualOutput(caption_mask=batch.get("captioned")), batch["image"].shape[0]
        views, separate = self.image_intra_head is not None, "image_view1" in batch  # separate: data.intra_augment
        paired = self.clip_on or self.fdt is not None or self.tag_head is not None  # terms on the caption-paired image
        images = torch.cat(([batch["image"]] if paired or not separate else []) + (
            [batch["image_view1"]] if views and separate else []) + ([batch["image_view2"]] if views else []))
        with self._bn_groups(images.shape[0] // b, b, keys=False):
            tokens = self.image_encoder(images)  # (V·B, N, W): [caption-paired image,] [view 1,] view 2
        rows = self._text_rows(batch.get("captioned"))  # the text tower reads captioned rows only
        pick = (lambda x: x) if rows is None else (lambda x: x[rows])
        put = (lambda x: x) if rows is None else (lambda x: x.new_zeros((b, *x.shape[1:])).index_copy(0, rows, x))
        if self.clip_on or self.fdt is not None or self.text_intra_head is not None:
            text_tokens, mask = self.text_tokens(pick(batch["text"]), pick(batch["text_mask"]))  # (B', L', W)
        if self.clip_on:
            out.first_emb, out.second_emb = self.image_head(tokens[:b]), put(self.text_head(text_tokens, mask))
            out.logit_scale = self.scale()
        if self.fdt is not None:
            (zi, wi), (zt, wt) = self.fdt.image(self.patches(tokens[:b])), self.fdt.text(text_tokens, mask)
            out.fdt_image_emb, out.fdt_text_emb, out.fdt_logit_scale = zi, put(zt), self.fdt.scale()
            ai, at = (wi > 0).float().mean(1), (wt > 0).float().mean(1)  # per row, fraction of C; (w > 0): no grad
            out.stats.update({"fdt_image_active": ai.mean() * wi.shape[1], "fdt_text_active": at.mean() * wt.shape[1],
                              "fdt_image_active_frac": ai.mean(), "fdt_text_active_frac": at.mean(),
                              "fdt_t": torch.tensor(self.fdt.temperature(), device=zi.device),  # NCCL: on device
                              "fdt_logit_scale": out.fdt_logit_scale.detach()})
        if views:
            with self._bn_groups(2, b, keys=False):
                z = self.image_intra_head(tokens[-2 * b:])  # both views through one BatchNorm (or its groups)
            out.image_view1_emb, out.image_view2_emb = z[:b], z[b:]
            if self.momentum is not None:
                with self._bn_groups(2, b, keys=True):
                    k = self.momentum.keys(images[-2 * b:])
                out.moco_key1_emb, out.moco_key2_emb, out.moco_queue = k[:b], k[b:], self.momentum.queue.clone()
        if self.text_intra_head is not None:
            ids2, m2 = pick(batch["text_view2"]), pick(batch["text_view2_mask"])
            out.text_view1_emb = put(self.text_intra_head(text_tokens, mask))
            out.text_view2_emb = put(self.text_momentum(*trim_padding(ids2, m2)) if self.text_momentum is not None
                                     else self.text_intra_head(*self.text_tokens(ids2, m2)))
        if self.tag_head is not None:
            out.tag_logits = self.tag_head(self.image_head.features(tokens[:b]).float())
            out.tag_targets = batch["tags"]
        return out

    @staticmethod
    def _text_rows(captioned: torch.Tensor | None) -> torch.Tensor | None:
        """Indices of the captioned rows (data.caption_fraction < 1), whose captions the text tower reads; None (all
        rows) without a mask. One process with fewer than 2 captioned rows reads all rows (BatchNorm needs 2; no
        inter term has a pair to compare, the losses ignore the rest). Under DDP a rank reads exactly its captioned
        rows even when it has 1: the text heads' BatchNorm pools its statistics over the ranks, where blank captions
        would shift every rank's normalisation (two processes would no longer equal one). A rank with none still
        reads all its rows (an empty text batch desynchronises DDP's collectives): there, and only there, blank
        captions enter the pooled statistics."""
        if captioned is None or bool(captioned.all()):
            return None
        n = int(captioned.sum())
        if n == 0 or (n == 1 and dist.world_size() == 1):
            return None
        return captioned.nonzero().squeeze(1)

    def _bn_groups(self, n_views: int, b: int, keys: bool):
        """MoCo's shuffle-BN (``model.moco.shuffle_bn``), as BatchNorm groups over the global batch of N samples: the
        queries' groups are runs of m = ⌈√N⌉ samples, the keys' groups take one sample of each run, so a query and
        its positive key share their BatchNorm statistics with no other sample. A no-op when off."""
        if self.momentum is None or not self.momentum.shuffle_bn or not self.training:
            return contextlib.nullcontext()
        n = dist.world_size() * b
        m, s = math.isqrt(n - 1) + 1, dist.rank() * b + torch.arange(b)  # s: global index of this rank's samples
        ids, groups = (s % m, m) if keys else (s // m, (n + m - 1) // m)
        return dist.batch_norm_groups(ids.repeat(n_views), groups)

    @torch.no_grad()
    @torch.no_grad()
    def sync_momentum(self) -> None:
        """The momentum copies (MoCo's key encoder, the momentum text tower) ← the online towers, as at construction:
        after weights were loaded into the online towers (``model.init_from``), the copies would be random."""
        if self.momentum is not None:
            ema_update(self.image_encoder, self.momentum.encoder, 0.0)
            ema_update(self.image_intra_head, self.momentum.head, 0.0)
        if self.text_momentum is not None:
            ema_update(self.text_encoder, self.text_momentum.encoder, 0.0)
            ema_update(self.text_intra_head, self.text_momentum.head, 0.0)

    def after_step(self, out: DualOutput) -> None:
        """After the optimiser step: the FDT logit scale back into its range; the momentum text tower's EMA update;
        MoCo's EMA update of the key encoder, then the step's keys (every rank's, when gathered) enter the queue."""
        if self.fdt is not None:
            self.fdt.clamp_logit_scale()
            self.fdt.advance()
        if self.text_momentum is not None:
            self.text_momentum.update(self.text_encoder, self.text_intra_head)
        if self.momentum is None:
            return
        self.momentum.update(self.image_encoder, self.image_intra_head)
        self.momentum.enqueue(torch.cat([out.all_rows("moco_key1_emb"), out.all_rows("moco_key2_emb")]))
