"""ALBEF's RandAugment (data/randaugment.py): the photometric ops against PIL (which ALBEF's ops wrap), the geometric
ops' displacement and fill, the draw (N ops with replacement, each with probability 0.5), determinism, and the
config wiring (data.augment.randaugment)."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from polyalign.config import load_config
from polyalign.config.schema import AugmentConfig
from polyalign.data.augment import augment_image
from polyalign.data.randaugment import OPS, _op, randaugment
from polyalign.errors import ConfigError


def _photo(seed=0, size=40):
    g = np.random.default_rng(seed)
    base = g.integers(40, 200, (size, size, 3)).astype(np.uint8)
    base[:10] = 230  # some structure: a bright band and a dark square
    base[20:30, 5:15] = 15
    return base


def _t(a):
    return torch.from_numpy(a).permute(2, 0, 1).float() / 255


def _pil(x):
    return np.asarray(x).astype(np.float32)


@pytest.mark.parametrize("name,pil,tol", [
    ("equalize", lambda im, f: ImageOps.equalize(im), 0.5),
    ("autocontrast", lambda im, f: ImageOps.autocontrast(im), 1.01),
    ("brightness", lambda im, f: ImageEnhance.Brightness(im).enhance(f), 1.01),
    ("sharpness", lambda im, f: ImageEnhance.Sharpness(im).enhance(f), 1.51)])
def test_photometric_ops_match_pil(name, pil, tol):
    a = _photo()
    level = 7
    ours = (_op(_t(a), name, level, np.random.default_rng(0)) * 255).permute(1, 2, 0).numpy()
    ref = _pil(pil(Image.fromarray(a), level / 10 * 1.8 + 0.1))
    assert np.abs(ours - ref).max() <= tol, name


def test_geometric_ops_move_content_and_fill_gray():
    a = np.zeros((256, 256, 3), np.uint8)
    a[100:140, 100:140] = 255
    x = _t(a)
    for name in ("translate_x", "translate_y"):
        for seed in range(4):
            y = _op(x, name, 10, np.random.default_rng(seed))  # level 10: 10 px of 256, either direction
            ys, xs = np.nonzero(y[0].numpy() > 0.9)
            dy, dx = ys.min() - 100, xs.min() - 100
            assert (abs(dx), dy) == (10, 0) if name == "translate_x" else (dx, abs(dy)) == (0, 10)
            gray = (y[0] - 128 / 255).abs() < 1e-4  # the uncovered strip is ALBEF's gray fill
            assert gray.sum() == 10 * 256
    r = _op(x, "rotate", 10, np.random.default_rng(0))  # 30°: the corners leave the image and are filled gray
    assert abs(float(r[0, 0, 0]) - 128 / 255) < 1e-4 and float(r[0, 120, 120]) > 0.99
    s = _op(x, "shear_x", 0, np.random.default_rng(0))
    assert torch.allclose(s, x, atol=1e-5)  # level 0: no shear


def test_draw_is_n_ops_each_with_probability_half_and_deterministic():
    x = _t(_photo())
    a = randaugment(x, np.random.default_rng(5), 2, 7)
    b = randaugment(x, np.random.default_rng(5), 2, 7)
    assert torch.equal(a, b)
    # how often the image is left unchanged: P(no op applied or only identity) with 2 draws
    unchanged = sum(torch.equal(randaugment(x, np.random.default_rng(s), 2, 7), x) for s in range(400)) / 400
    p_keep = 0.5 + 0.5 / len(OPS)  # one draw leaves it: not applied, or identity
    assert abs(unchanged - p_keep ** 2) < 0.08


def test_config_wiring_and_ranges():
    cfg = AugmentConfig(enabled=True, crop_scale=(1.0, 1.0), flip=0.0, randaugment=2, randaugment_magnitude=7)
    img = torch.from_numpy(_photo(size=32)).permute(2, 0, 1).contiguous()
    outs = {augment_image(img, np.random.default_rng(s), cfg).numpy().tobytes() for s in range(20)}
    assert len(outs) > 5  # RandAugment varies the view
    off = AugmentConfig(enabled=True, crop_scale=(1.0, 1.0), flip=0.0)
    assert torch.equal(augment_image(img, np.random.default_rng(0), off), img)  # off: the view is the image
    assert load_config(None, ["data.augment.randaugment=2"]).data.augment.randaugment == 2
    with pytest.raises(ConfigError, match="randaugment_magnitude"):
        load_config(None, ["data.augment.randaugment_magnitude=11"])
