"""3D shapes: unit-ball point clouds, area-weighted sampling, deterministic items, renders that show the object from
different viewpoints, point augmentation, and a permutation-invariant PointNet."""
import numpy as np
import pytest
import torch

from polyalign.data.points import (CLASSES, PointAugment, Shapes3D, augment_points, item_mesh, render,
                                   sample_surface, view_rotation)
from polyalign.models.encoders.points import PointNet
from polyalign.errors import DataError


@pytest.fixture(scope="module")
def ds():
    return Shapes3D("train", 200, seed=1, n_points=256, image_size=24, views=2)


def test_point_clouds_fill_the_unit_ball(ds):
    for i in range(0, 200, 7):
        p = ds.points(i)
        assert p.shape == (256, 3) and p.dtype == torch.float32
        r = p.norm(dim=1)
        assert r.max() <= 1 + 1e-5 and r.max() > 0.85  # the farthest vertex is on the sphere; samples come close


def test_every_class_appears(ds):
    assert len(CLASSES) == 10 and len(set(CLASSES)) == 10
    assert {ds.labels(i)["shape"] for i in range(200)} == set(range(10))
    assert ds.captions(0)[0] == f"a {CLASSES[ds.labels(0)['shape']]}" and len(ds.captions(0)) == 5


def test_items_depend_on_seed_split_and_index_only(ds):
    small = Shapes3D("train", 20, seed=1, n_points=256, image_size=24, views=2)
    assert all(torch.equal(small.points(i), ds.points(i)) for i in range(20))
    assert np.array_equal(small.images, ds.images[:20])
    for split, seed in (("train", 2), ("val", 1)):
        other = Shapes3D(split, 20, seed=seed, image_size=16, views=1)
        assert [other.labels(i) for i in range(20)] != [ds.labels(i) for i in range(20)]


def test_surface_sampling_is_area_weighted():
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 1], [0, 2, 1]], float)  # areas 0.5 and 3
    tris = np.array([[0, 1, 2], [3, 4, 5]])
    points, normals = sample_surface(verts, tris, 7000, np.random.default_rng(0))
    on_top = points[:, 2] > 0.5
    assert on_top.mean() == pytest.approx(3 / 3.5, abs=0.015)
    assert np.allclose(np.abs(normals[:, 2]), 1)
    top = points[on_top]
    assert (top[:, 0] / 3 + top[:, 1] / 2 <= 1 + 1e-6).all() and (top[:, :2] >= 0).all()  # inside the triangle


def test_a_rendered_sphere_is_a_solid_disk():
    verts, tris = item_mesh(CLASSES.index("sphere"), np.ones(3), 0.0)
    p, n = sample_surface(verts, tris, 2 * 48**2, np.random.default_rng(0))
    rot = torch.from_numpy(view_rotation(0.3, 0.4)).float()[None]
    img = render(torch.from_numpy(p)[None], torch.from_numpy(n)[None], rot, torch.tensor([[200.0, 40, 40]]),
                 torch.tensor([100.0]), 48)[0]
    assert img.shape == (3, 48, 48) and img.dtype == torch.uint8
    covered = (img != 100).any(0)
    yy, xx = torch.meshgrid(torch.arange(48) + 0.5, torch.arange(48) + 0.5, indexing="ij")
    r = ((yy - 24) ** 2 + (xx - 24) ** 2).sqrt()
    assert covered[r < 20].all()  # no holes inside (radius 0.92 · 24 ≈ 22 px)
    assert not covered[r > 24].any()
    assert img[0, 14, 14] > img[0, 34, 34]  # lit from the upper left


def test_renders_show_the_object_and_change_with_the_view(ds):
    for i in range(10):
        a, b = ds.image(i, 0), ds.image(i, 1)
        background = a[:, :1, :1]  # a corner pixel
        assert (a != background).any(0).float().mean() > 0.1
        assert not torch.equal(a, b)


def test_getitem_draws_a_view_and_a_caption_per_epoch(ds):
    item = ds[(0, 3)]
    assert item["points"].shape == (256, 3) and item["image"].shape == (3, 24, 24) and item["index"] == 3
    assert item["labels"] == ds.labels(3) and item["caption"] in ds.captions(3)
    views = {bytes(ds[(e, 3)]["image"].numpy()) for e in range(12)}
    assert len(views) == 2
    with pytest.raises(DataError, match="unknown shapes3d split"):
        Shapes3D("dev", 4)


def test_point_augmentation(ds):
    p = ds.points(0)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    cfg = PointAugment()
    assert torch.equal(augment_points(p, g(0), cfg), augment_points(p, g(0), cfg))
    assert not torch.equal(augment_points(p, g(0), cfg), augment_points(p, g(1), cfg))
    still = dict(scale=(1.0, 1.0), jitter=0.0, dropout=0.0)
    up = augment_points(p, g(2), PointAugment(rotate="up", **still))
    assert torch.allclose(up[:, 2], p[:, 2], atol=1e-6) and not torch.allclose(up, p, atol=1e-3)
    so3 = augment_points(p, g(3), PointAugment(rotate="so3", **still))
    assert torch.allclose(so3.norm(dim=1), p.norm(dim=1), atol=1e-5)
    assert not torch.allclose(so3[:, 2], p[:, 2], atol=1e-3)
    dropped = augment_points(p, g(4), PointAugment(rotate="none", scale=(1.0, 1.0), jitter=0.0, dropout=0.9))
    repeats = (dropped == dropped[0]).all(1).sum()
    assert dropped.shape == p.shape and 1 < repeats < len(p)


def test_pointnet_tokens_do_not_depend_on_point_order(ds):
    torch.manual_seed(0)
    enc = PointNet(32, groups=8, k=16, hidden=16).eval()
    x = torch.stack([ds.points(i) for i in range(4)])
    with torch.no_grad():
        tokens = enc(x)
        shuffled = enc(x[:, torch.randperm(256)])
    assert tokens.shape == (4, 8, 32) and enc.width == 32 and enc.pool == "mean"
    assert torch.allclose(tokens, shuffled, atol=1e-5)
    assert torch.allclose(tokens.mean(1), shuffled.mean(1), atol=1e-5)
    assert not torch.allclose(tokens[0], tokens[1], atol=1e-3)  # different objects, different tokens
    with pytest.raises(ValueError, match="no mask"):
        enc(x, torch.ones(4, 256, dtype=torch.bool))


def test_renders_are_cached(tmp_path):
    first = Shapes3D("test", 6, image_size=16, views=2, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("shapes3d-v1-test-n6-px16-v2-seed0.npy"))) == 1
    np.save(next(tmp_path.glob("*.npy")), first.images * 0)  # the second construction must read the file
    assert (Shapes3D("test", 6, image_size=16, views=2, cache_dir=tmp_path).images == 0).all()
