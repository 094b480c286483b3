"""View augmentation: determinism, each op against its closed form, colour preservation, config errors."""
import dataclasses

import numpy as np
import pytest
import torch

from polyalign.config import AugmentConfig, check_augment_config
from polyalign.data.augment import LUMA, augment_image
from polyalign.errors import ConfigError

FIXED = {"enabled": True, "crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "flip": 0.0}  # no crop, no flip
SIMCLR = AugmentConfig(enabled=True, blur=0.5, grayscale=0.2, color_jitter=0.5)


def _image(size=48, seed=0):
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _rng(seed=0):
    return np.random.default_rng(seed)


def _tv(x):
    x = x.float()
    return (x[:, 1:] - x[:, :-1]).abs().sum() + (x[:, :, 1:] - x[:, :, :-1]).abs().sum()


def test_disabled_returns_the_image_unchanged():
    img = _image()
    out = augment_image(img, _rng(), AugmentConfig())
    assert torch.equal(out, img)


@pytest.mark.parametrize("shape", [(3, 48, 48), (3, 32, 32), (3, 40, 56)])
def test_shape_and_dtype_preserved(shape):
    img = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for seed in range(5):
        out = augment_image(img, _rng(seed), SIMCLR)
        assert out.shape == img.shape and out.dtype == torch.uint8


def test_same_seed_same_view_different_seeds_differ():
    img = _image()
    a, b = augment_image(img, _rng(7), SIMCLR), augment_image(img, _rng(7), SIMCLR)
    assert torch.equal(a, b)
    views = [augment_image(img, _rng(s), SIMCLR) for s in range(4)]
    assert all(not torch.equal(views[i], views[j]) for i in range(4) for j in range(i + 1, 4))


def test_flip_only_is_exact_flip():
    img = _image()
    out = augment_image(img, _rng(), AugmentConfig(**{**FIXED, "flip": 1.0}))
    assert torch.equal(out, img.flip(-1))


def test_full_crop_without_flip_is_identity():
    img = _image(32)
    assert torch.equal(augment_image(img, _rng(3), AugmentConfig(**FIXED)), img)


def test_crop_changes_the_image():
    img = _image()
    out = augment_image(img, _rng(0), AugmentConfig(**{**FIXED, "crop_scale": (0.3, 0.5)}))
    assert not torch.equal(out, img)


def test_grayscale_is_luma_on_all_channels():
    img = _image()
    out = augment_image(img, _rng(), AugmentConfig(**FIXED, grayscale=1.0)).float()
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    luma = sum(w * c for w, c in zip(LUMA, img.float()))
    assert (out[0] - luma).abs().max() <= 1


def test_blur_reduces_total_variation_of_noise():
    img = _image()
    tvs = [_tv(augment_image(img, _rng(s), AugmentConfig(**FIXED, blur=1.0))) for s in range(8)]
    assert all(t <= _tv(img) for t in tvs)
    assert sum(tvs) / len(tvs) < 0.9 * _tv(img)


def test_color_jitter_changes_colours():
    img = _image()
    out = augment_image(img, _rng(), AugmentConfig(**FIXED, color_jitter=0.5, color_jitter_p=1.0))
    assert (out.float() - img.float()).abs().mean() > 2


def test_colour_preserved_when_colour_ops_are_off():
    colour = torch.tensor([200, 30, 90], dtype=torch.uint8)
    img = colour.view(3, 1, 1).expand(3, 48, 48).contiguous()
    cfg = AugmentConfig(enabled=True, blur=1.0)  # crop, flip and blur, but colour ops at their defaults (off)
    for seed in range(5):
        out = augment_image(img, _rng(seed), cfg)
        assert torch.equal(out, img)


def test_torch_global_rng_untouched():
    img = _image()
    state = torch.get_rng_state()
    for seed in range(3):
        augment_image(img, _rng(seed), SIMCLR)
    assert torch.equal(torch.get_rng_state(), state)


def test_default_config_is_valid_and_colour_ops_off():
    cfg = AugmentConfig()
    check_augment_config(cfg)
    assert cfg.grayscale == 0 and cfg.color_jitter == 0 and not cfg.enabled


@pytest.mark.parametrize("field,value", [
    ("flip", 1.5), ("blur", -0.1), ("grayscale", 2.0), ("color_jitter_p", -1.0),
    ("crop_scale", (0.0, 1.0)), ("crop_scale", (0.8, 0.5)), ("crop_scale", (0.5, 1.2)), ("crop_scale", (0.5,)),
    ("crop_ratio", (0.0, 1.0)), ("crop_ratio", (2.0, 1.0)), ("color_jitter", -0.5), ("noise", 1.1), ("cutout", -0.2),
])
def test_bad_config_names_the_key(field, value):
    cfg = dataclasses.replace(AugmentConfig(), **{field: value})
    with pytest.raises(ConfigError, match=rf"data\.augment\.{field}\b"):
        check_augment_config(cfg)


def test_hsv_round_trip_matches_colorsys():
    import colorsys

    from polyalign.data.augment import _hsv_to_rgb, _rgb_to_hsv

    x = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0] = 0.5  # a grey pixel: hue and saturation 0
    h, s, v = _rgb_to_hsv(x)
    ref = torch.tensor([colorsys.rgb_to_hsv(*x[:, i, j].tolist()) for i in range(4) for j in range(5)])
    assert torch.allclose(torch.stack([h, s, v]).flatten(1).T, ref.float(), atol=1e-5)
    assert torch.allclose(_hsv_to_rgb(h, s, v), x, atol=1e-5)


def test_one_thread_gives_the_same_views_and_restores_the_thread_count():
    from polyalign.data.augment import one_thread

    cfg = AugmentConfig(enabled=True, blur=1.0, crop_scale=(0.3, 1.0))
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    plain = augment_image(img, np.random.default_rng(3), cfg)
    with one_thread():
        assert torch.get_num_threads() == 1
        single = augment_image(img, np.random.default_rng(3), cfg)
    assert torch.get_num_threads() == before and torch.equal(plain, single)


def test_noise_and_cutout_keep_the_mean_colour_and_change_the_image():
    colour = torch.tensor([200, 30, 90], dtype=torch.uint8)
    img = colour.view(3, 1, 1).expand(3, 48, 48).contiguous()
    assert torch.equal(augment_image(img, _rng(0), AugmentConfig(**FIXED, cutout=1.0)), img)  # erased with its mean
    textured = _image()
    out = augment_image(textured, _rng(0), AugmentConfig(**FIXED, cutout=1.0))
    changed = (out != textured).any(0)
    rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 0.02 * 48 * 48 * 0.5 <= changed.sum() <= box <= 0.15 * 48 * 48 * 1.2  # one rectangle of the stated size
    noisy = augment_image(img, _rng(1), AugmentConfig(**FIXED, noise=1.0)).float()
    assert (noisy.mean((1, 2)) - colour.float()).abs().max() < 3  # zero-mean noise keeps the colour
    assert 2 < noisy.std((1, 2)).mean() < 25

