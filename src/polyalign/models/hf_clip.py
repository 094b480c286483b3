"""Our image–text dual encoder ↔ ``transformers.CLIPModel``: the weight names both ways, and what must hold for the
mapping to be exact (``polyalign export --hf``, ``model.init_from=hf:DIR``).

The layers are the same (pre-LN blocks; HF's q, k, v are the rows of our fused ``qkv``; our final LayerNorm is HF's
``post_layernorm`` / ``final_layer_norm``). HF's patch convolution has no bias: ours is folded into the patches'
position embeddings on export (a constant per patch token) and set to 0 on import. HF's text tower is causal and pools
at the first ``eos_token_id`` ([SEP]), so only a ``model.text.causal=true model.text.pool=eos`` tower maps. Both use
``hidden_act="gelu"`` (exact GELU; OpenAI's checkpoints use quick_gelu, which our blocks do not have).
"""
from __future__ import annotations

from pathlib import Path

import torch

from polyalign.errors import ConfigError


def clip_mismatch(model) -> str:
    """Why ``model`` does not map exactly onto ``CLIPModel`` ("" when it does)."""
    from polyalign.models.dual import DualEncoder
    from polyalign.models.encoders.text import TextTransformer

    if not isinstance(model, DualEncoder) or tuple(model.modalities) != ("image", "text"):
        towers = ", ".join(getattr(model, "modalities", ()))
        return (f"transformers has no dual-encoder class for the towers {towers} (only image–text dual encoders map) "
                f"or for the fusion model")
    if not isinstance(model.text_encoder, TextTransformer):
        return "a pretrained HF text tower (model.text.kind=hf) maps onto VisionTextDualEncoderModel, not CLIPModel"
    if why := _image_side_mismatch(model, "CLIPModel"):
        return why
    if not model.text_encoder.causal or model.text_head.pool != "eos":
        return ("CLIPTextModel is causal and pools at [SEP]: train with model.text.causal=true model.text.pool=eos "
                "to map onto CLIPModel")
    return ""


def _image_side_mismatch(model, target: str) -> str:
    """What keeps a dual encoder's image tower, heads or FDT from mapping onto ``target`` ("" when nothing does)."""
    from polyalign.models.encoders.image import ViT

    if not isinstance(model.image_encoder, ViT):
        return (f"transformers has no class for the image tower {type(model.image_encoder).__name__} (only "
                f"model.image.kind=vit maps onto CLIPVisionModel)")
    if model.fdt is not None:
        return f"the run embeds with its FDT head, which {target} has no place for"
    if not isinstance(model.image_head.proj, torch.nn.Linear):
        return f"model.inter_head=mlp (or max): {target}'s projections are single linear maps"
    if model.image_head.pool != "cls":
        return "CLIPVisionModel pools [CLS]: this image tower pools by the mean"
    return ""


def _layers(prefix: str, transformer, sd: dict) -> None:
    """Our ``Transformer.blocks`` → HF ``{prefix}.encoder.layers.*`` (views of our tensors: q, k, v split)."""
    for i, b in enumerate(transformer.blocks):
        p = f"{prefix}.encoder.layers.{i}."
        for name, w, bias in zip("qkv", b.qkv.weight.chunk(3), b.qkv.bias.chunk(3)):
            sd[f"{p}self_attn.{name}_proj.weight"], sd[f"{p}self_attn.{name}_proj.bias"] = w, bias
        pairs = {"self_attn.out_proj": b.proj, "layer_norm1": b.ln1, "layer_norm2": b.ln2, "mlp.fc1": b.mlp[0],
                 "mlp.fc2": b.mlp[2]}
        for name, module in pairs.items():
            sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = module.weight, module.bias


def _vision_aliases(vit) -> dict:
    """HF name → a view of our tensor, for every CLIPVisionModel weight but the positions (``vision_model.*``)."""
    sd = {"vision_model.embeddings.class_embedding": vit.cls.view(-1),
          "vision_model.embeddings.patch_embedding.weight": vit.patch.weight,
          "vision_model.pre_layrnorm.weight": vit.ln_pre.weight, "vision_model.pre_layrnorm.bias": vit.ln_pre.bias,
          "vision_model.post_layernorm.weight": vit.transformer.ln.weight,
          "vision_model.post_layernorm.bias": vit.transformer.ln.bias}
    _layers("vision_model", vit.transformer, sd)
    return sd


def _vision_positions(vit) -> torch.Tensor:
    pos = vit.pos[0].detach().clone()  # (1 + N, W)
    pos[1:] += vit.patch.bias.detach()  # HF's patch convolution has no bias: ours joins every patch's position
    return pos


def _aliases(model) -> dict:
    """HF name → a view of our tensor, for every CLIPModel weight but the vision positions and the logit scale."""
    text = model.text_encoder
    sd = {**_vision_aliases(model.image_encoder),
          "text_model.embeddings.token_embedding.weight": text.embed.weight,
          "text_model.embeddings.position_embedding.weight": text.pos[0],
          "text_model.final_layer_norm.weight": text.transformer.ln.weight,
          "text_model.final_layer_norm.bias": text.transformer.ln.bias,
          "visual_projection.weight": model.image_head.proj.weight,
          "text_projection.weight": model.text_head.proj.weight}
    _layers("text_model", text.transformer, sd)
    return sd


POSITIONS = "vision_model.embeddings.position_embedding.weight"


def clip_state_dict(model) -> dict[str, torch.Tensor]:
    """``model``'s weights under CLIPModel's names (copies); the logit scale as clamped in training."""
    sd = {k: v.detach().clone() for k, v in _aliases(model).items()}
    sd[POSITIONS] = _vision_positions(model.image_encoder)
    sd["logit_scale"] = model.logit_scale.detach().clamp(0.0, model.max_log_scale).clone()
    return sd


@torch.no_grad()
def load_clip_state_dict(model, hf: dict[str, torch.Tensor]) -> None:
    """Set ``model``'s towers, projections and logit scale from CLIPModel weights ``hf`` (a ``ConfigError`` naming the
    first weight whose shape differs: the run's model.* settings must match the checkpoint's config)."""
    targets = {**_aliases(model), POSITIONS: model.image_encoder.pos[0], "logit_scale": model.logit_scale}
    for name, ours in targets.items():
        if name not in hf:
            raise ConfigError(f"model.init_from: the checkpoint has no weight {name}")
        if tuple(hf[name].shape) != tuple(ours.shape):
            raise ConfigError(f"model.init_from: {name} is {tuple(hf[name].shape)} in the checkpoint but "
                              f"{tuple(ours.shape)} here: set the model.* sizes to the checkpoint's config.json")
        ours.copy_(hf[name])
    model.image_encoder.patch.bias.zero_()  # folded into the positions


def load_clip_dir(model, path: str | Path) -> None:
    """Initialise ``model`` from a local ``CLIPModel`` folder (``save_pretrained``; read offline)."""
    from transformers import CLIPModel

    why = clip_mismatch(model)
    if why:
        raise ConfigError(f"model.init_from=hf:{path}: {why}")
    clip = CLIPModel.from_pretrained(str(path), local_files_only=True)
    acts = {clip.config.text_config.hidden_act, clip.config.vision_config.hidden_act}
    if acts != {"gelu"}:
        raise ConfigError(f"model.init_from=hf:{path}: hidden_act {sorted(acts)}; our blocks use exact GELU only")
    load_clip_state_dict(model, clip.state_dict())
    if hasattr(model, "sync_momentum"):  # MoCo's key encoder, the momentum text tower: copies of the loaded towers
        model.sync_momentum()


POOLER_EPS = 1e-4  # VisionTextDualEncoderModel pools text by tanh(dense([CLS])): dense = ε·I makes it ε·[CLS] to ~1e-8


def dual_mismatch(model) -> str:
    """Why ``model`` does not map onto ``VisionTextDualEncoderModel`` (a ViT + a pretrained BERT-like text tower
    pooled at [CLS]); "" when it does."""
    from polyalign.models.dual import DualEncoder
    from polyalign.models.encoders.text import HFTextEncoder

    if not isinstance(model, DualEncoder) or not isinstance(model.text_encoder, HFTextEncoder):
        return "not a dual encoder with a pretrained HF text tower"
    if why := _image_side_mismatch(model, "VisionTextDualEncoderModel"):
        return why
    if model.text_head.pool != "cls" or getattr(model.text_encoder.model, "pooler", None) is None:
        return ("VisionTextDualEncoderModel pools the text tower at [CLS] (through BERT's pooler): train with "
                "model.text.pool=cls to export it (a mean-pooled tower cannot be expressed there)")
    return ""


def dual_state_dict(model) -> dict[str, torch.Tensor]:
    """``model``'s weights under VisionTextDualEncoderModel's names (copies): the ViT as its CLIPVisionModel, the
    text tower as it is, its pooler set to dense = ε·I, b = 0 (so tanh(ε·h)/ε = h to (ε·h)²/3) and the text
    projection divided by ε."""
    vit = model.image_encoder
    vision = {k: v.detach().clone() for k, v in _vision_aliases(vit).items()} | {POSITIONS: _vision_positions(vit)}
    sd = dict(vision)  # transformers keeps the CLIPVisionModel's own names (vision_model.*)
    sd |= {f"text_model.{k}": v.detach().clone() for k, v in model.text_encoder.model.state_dict().items()}
    width = model.text_encoder.width
    sd["text_model.pooler.dense.weight"] = torch.eye(width) * POOLER_EPS
    sd["text_model.pooler.dense.bias"] = torch.zeros(width)
    sd["visual_projection.weight"] = model.image_head.proj.weight.detach().clone()
    sd["text_projection.weight"] = model.text_head.proj.weight.detach().clone() / POOLER_EPS
    sd["logit_scale"] = model.logit_scale.detach().clamp(0.0, model.max_log_scale).clone()
    return sd
