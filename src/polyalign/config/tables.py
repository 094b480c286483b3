"""The literal tables the config checks read: the choices of every string key, the modalities each dataset gives,
the loss-term names, and the allowed range of every numeric key."""
from __future__ import annotations

from polyalign.config.tree import Range

CHOICES = {
    "data.name": ("shapes", "shapes_clutter", "manifest", "shards", "shapes_audio", "speech", "shapes3d"),
    "model.image.kind": ("vit", "cnn", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"),
    "model.text.kind": ("transformer", "hf"),
    "model.audio.kind": ("cnn",),
    "model.points.kind": ("pointnet",),
    "model.image.pool": ("", "cls", "mean"),
    "model.text.pool": ("", "cls", "mean", "eos"),
    "model.audio.pool": ("", "mean"),
    "model.points.pool": ("", "mean"),
    "train.precision": ("fp32", "bf16"),
    "train.report_to": ("none", "tensorboard"),
    "loss.contrastive": ("dense", "tiled"),
    "loss.image_image": ("simclr", "moco"),
    "eval.precision": ("fp32", "bf16"),
    "model.fdt.norm": ("sparsemax", "softmax", "sigmoid"),
    "model.fdt.pool": ("max", "mean"),
    "model.inter_head": ("linear", "mlp", "max"),
    "model.fdt.t_fdt_auto": ("", "scaled", "active"),
    "data.intra_positive": ("view", "style"),
}

FIRST_MODALITIES, SECOND_MODALITIES = ("image", "audio", "points"), ("text", "image")
DATA_MODALITIES = {  # what each data.name provides per item
    "shapes": ("image", "text"), "shapes_clutter": ("image", "text"), "manifest": ("image", "text"),
    "shards": ("image", "text"),
    "shapes_audio": ("audio", "text"),
    "speech": ("audio", "text"), "shapes3d": ("points", "image", "text"),
}
LOSS_TERMS = ("clip", "image_image", "text_text", "tags", "fdt", "itc", "itm", "mlm")  # loss.weights.<name>
TEMPERATURE_TERMS = ("image_image", "text_text")  # loss.temperatures.<name>: the terms with a fixed temperature
FUSION_TERMS = ("itc", "itm", "mlm")  # loss terms of the fusion model (model.fusion), image–text only
IMAGE_TEXT_TERMS = ("image_image", "text_text", "tags", "fdt") + FUSION_TERMS  # loss terms that exist for image–text models only

POSITIVE, NON_NEGATIVE = Range(0, lo_open=True), Range(0)
PROBABILITY, BELOW_ONE = Range(0, 1), Range(0, 1, hi_open=True)  # BELOW_ONE: dropout, Adam's betas
SEED = Range(0, 2**32 - 1)  # numpy's seed range (the data seeds are used modulo 2**32: larger ones would repeat)
RANGES = {  # every numeric key → its allowed values (a tuple: each element; a dict: each value); NaN/inf never pass
    **dict.fromkeys((
        "data.image_size", "data.train_size", "data.shuffle_buffer", "data.n_points", "data.views", "data.max_tags", "model.embed_dim",
        "model.image.width", "model.image.layers", "model.image.heads", "model.image.patch_size",
        "model.image.mlp_ratio", "model.text.width", "model.text.layers", "model.text.heads", "model.text.vocab_size",
        "model.text.mlp_ratio", "model.audio.width", "model.audio.layers", "model.audio.n_mels", "model.audio.hop",
        "model.points.width", "model.points.groups", "model.points.k", "model.points.hidden", "model.init_temperature",
        "model.max_logit_scale", "model.intra_dim", "model.moco.queue_size", "model.fdt.codebook_size",
        "model.fdt.t_fdt", "model.fdt.logit_scale_range", "model.fdt.anneal", "model.fusion.fusion_layers", "model.fusion.fusion_heads",
        "model.fusion.mlp_ratio", "model.fusion.embed_dim", "model.fusion.init_temperature",
        "model.fusion.temperature_range", "loss.tile", "loss.temperatures", "train.batch_size", "train.max_steps",
        "train.lr", "train.log_every", "train.checkpoint_every", "eval.batch_size", "eval.probe_max_train",
        "eval.max_captions", "eval.chunk_size"), POSITIVE),
    **dict.fromkeys((
        "data.num_workers", "data.val_size", "data.test_size", "data.tag_min_count", "data.augment.color_jitter",
        "data.intra_augment.color_jitter", "model.fdt.dim", "model.fdt.chunk", "model.fdt.anneal_steps", "model.fusion.text_split", "model.fusion.queue_size",
        "model.fusion.itc_weight", "model.fusion.itm_weight", "model.fusion.mlm_weight", "model.fusion.focal_gamma",
        "loss.weights", "train.min_lr", "train.weight_decay", "train.warmup_steps", "train.threads",
        "train.grad_cache_chunk", "eval.n_examples", "eval.rerank_k", "eval.bootstrap_resamples"), NON_NEGATIVE),
    **dict.fromkeys((
        "data.max_bad_fraction", "data.augment.flip", "data.augment.blur", "data.augment.grayscale",
        "data.augment.color_jitter_p", "data.augment.noise", "data.augment.cutout", "data.text_word_drop",
        "data.intra_augment.flip", "data.intra_augment.blur", "data.intra_augment.grayscale",
        "data.intra_augment.color_jitter_p", "data.intra_augment.noise", "data.intra_augment.cutout", "data.clutter_share",
        "model.moco.momentum", "model.fusion.momentum", "model.fusion.alpha", "model.fusion.soft_mask_lambda"),
        PROBABILITY),
    **dict.fromkeys(("model.image.dropout", "model.text.dropout", "model.fusion.dropout", "train.betas",
                     "model.text_momentum"), BELOW_ONE),
    "data.augment.crop_scale": Range(0, 1, lo_open=True), "data.augment.crop_ratio": POSITIVE,
    "data.intra_augment.crop_scale": Range(0, 1, lo_open=True), "data.intra_augment.crop_ratio": POSITIVE,
    "model.fdt.active_target": Range(0, 1, lo_open=True, why="the fraction of codebook entries active at step 0"),
    **dict.fromkeys(("data.augment.randaugment", "data.intra_augment.randaugment"), Range(0, 4)),
    **dict.fromkeys(("data.augment.randaugment_magnitude", "data.intra_augment.randaugment_magnitude"), Range(0, 10)),
    "data.caption_fraction": Range(0, 1, lo_open=True, why="the fraction of training items that keep captions"),
    "data.captioned_share": Range(0, 1, hi_open=True, why="the share of each batch that is captioned (0 = as it comes)"),
    "model.fusion.alpha_ramp_steps": Range(-1, why="-1 = model.fusion.alpha_ramp of train.max_steps, 0 = no ramp"),
    "model.fusion.momentum_horizon": Range(0, 1, why="a fraction of train.max_steps"),
    "model.fusion.alpha_ramp": Range(0, 1, why="a fraction of train.max_steps"),
    "model.text.context_length": Range(3, why="room for [CLS], one token and [SEP]"),
    "model.fusion.mlm_prob": Range(0, 1, lo_open=True, hi_open=True),
    "train.grad_clip": Range(0, why="0 = no clipping"), "data.seed": SEED, "train.seed": SEED,
    "data.clutter_objects": Range(1, 8, why="objects per shapes_clutter scene: min, max"),
    "model.image.train_blocks": Range(-1, why="-1 = all blocks"), "model.text.train_layers": Range(-1, why="-1 = all"),
}  # not here: train.eval_every (must be 0) and model.fusion.gradcam_layer (an index into the fusion layers)
