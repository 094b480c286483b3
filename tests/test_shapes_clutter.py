"""The granularity task of issue 22: shapes_clutter scenes (determinism, cache, object counts, captions that name a
present object, the distractor rule, the rendering) and the containment metrics (against scikit-learn, perfect and
shuffled embeddings, an oracle model through the embedding path, a tiny training run's metrics.json)."""
import hashlib
import itertools
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

from polyalign.config import load_config
from polyalign.data.build import build_datasets
from polyalign.data.shapes import COLOURS, SHAPES, ShapesDataset
from polyalign.data.shapes_clutter import VERSION, ShapesClutterDataset
from polyalign.errors import ConfigError, DataError
from polyalign.eval.containment import attribute_baselines, containment_metrics, evaluate_containment, object_classes

torch.set_num_threads(1)
PAIR = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")


@pytest.fixture(scope="module")
def scenes():
    return ShapesClutterDataset("train", 400, 64, seed=0)


# --- the data ---
def test_items_do_not_depend_on_size_or_order():
    small, big = ShapesClutterDataset("val", 40, 32, seed=2), ShapesClutterDataset("val", 1100, 32, seed=2)
    assert np.array_equal(small.images, big.images[:40])
    assert [small.captions(i) for i in reversed(range(40))] == [big.captions(i) for i in reversed(range(40))]
    tail = ShapesClutterDataset("val", 1030, 32, seed=2)  # the second block, cut short
    assert np.array_equal(tail.images[1024:], big.images[1024:1030])
    other = ShapesClutterDataset("test", 40, 32, seed=2)
    assert not np.array_equal(small.images, other.images) and small.captions(0) != other.captions(0)


def test_cache_round_trip(tmp_path):
    a = ShapesClutterDataset("test", 50, 32, seed=1, cache_dir=tmp_path, objects=(2, 4))
    (path,) = tmp_path.glob("*.npy")
    assert path.name.startswith(VERSION) and "obj2to4-share0.5-seed1" in path.name
    np.save(path, np.zeros_like(a.images))  # the second construction must read the file, not render
    b = ShapesClutterDataset("test", 50, 32, seed=1, cache_dir=tmp_path, objects=(2, 4))
    assert not b.images.any() and a.images.any()


@pytest.mark.parametrize("lo, hi", [(3, 6), (1, 2), (7, 8)])
def test_object_counts_cover_the_range(lo, hi):
    ds = ShapesClutterDataset("train", 300, 32, objects=(lo, hi))
    counts = [len(ds.objects(i)) for i in range(len(ds))]
    assert set(counts) == set(range(lo, hi + 1))
    assert all(len(ds.captions(i)) == counts[i] for i in range(len(ds)))
    assert [ds.labels(i)["count"] for i in range(5)] == [c - lo for c in counts[:5]]


def test_every_caption_names_one_object_of_its_scene(scenes):
    for i in range(len(scenes)):
        pairs = [(o["colour"], o["shape"]) for o in scenes.objects(i)]
        named = [PAIR.findall(c) for c in scenes.captions(i)]
        assert all(len(n) == 1 for n in named), scenes.captions(i)
        assert sorted(n[0] for n in named) == sorted(pairs)  # each object once
        assert not any(re.search(r"\ba [aeiou]", c) for c in scenes.captions(i))  # "an orange"


def _distractors(ds):
    """Per object of every scene: whether another object of its scene shares its colour or its shape (never both:
    the pairs of a scene are distinct), and the counts of objects sharing a colour and a shape."""
    has, shared = [], {"colour": 0, "shape": 0}
    for i in range(len(ds)):
        pairs = [(o["colour"], o["shape"]) for o in ds.objects(i)]
        assert len(set(pairs)) == len(pairs) and len({o["cell"] for o in ds.objects(i)}) == len(pairs)
        for k, (c, s) in enumerate(pairs):
            others = pairs[:k] + pairs[k + 1:]
            has.append(any(c == c2 or s == s2 for c2, s2 in others))
            shared["colour"] += any(c == c2 for c2, _ in others)
            shared["shape"] += any(s == s2 for _, s2 in others)
    return np.array(has), shared


def test_every_object_is_a_distractor_at_share_one():
    has, shared = _distractors(ShapesClutterDataset("train", 300, 32, share=1.0, objects=(2, 8)))
    assert has.all()  # colour alone or shape alone never singles an object out of its scene
    assert min(shared.values()) > 0.3 * max(shared.values())  # both kinds of distractor are common


def test_share_zero_gives_new_colours_and_shapes_and_the_default_mixes():
    ds = ShapesClutterDataset("train", 300, 32, share=0.0)
    for i in range(len(ds)):
        objs = ds.objects(i)
        assert len({o["colour"] for o in objs}) == len({o["shape"] for o in objs}) == len(objs)
    has, _ = _distractors(ShapesClutterDataset("train", 300, 32, share=0.0, objects=(7, 8)))
    assert 0 < has.mean() < 1  # past 6 objects the colours run out: some pair repeats one, the pairs stay distinct
    has, _ = _distractors(ShapesClutterDataset("train", 300, 32))
    assert 0.4 < has.mean() < 0.85


def test_attribute_baselines_order_and_binding_headroom():
    bound = {share: attribute_baselines(ShapesClutterDataset("test", 600, 32, seed=1, share=share))
             for share in (0.0, 1.0)}
    for b in bound.values():
        assert b["chance"] < b["colour"] < b["bag"] < 1 and b["chance"] < b["shape"] < b["bag"]
    assert bound[0.0]["bag"] < 0.3 < 0.55 < bound[1.0]["bag"]  # distractors of one's own scene share attributes


def test_objects_are_drawn_in_their_colour_without_heavy_overlap(scenes):
    colours = np.array(list(COLOURS.values()), float)
    for i in range(len(scenes)):
        boxes = np.array(scenes.boxes(i))
        for a, b in itertools.combinations(boxes, 2):
            h = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
            assert h <= 0.05 * (a[2] - a[0]) ** 2
        for k, o in enumerate(scenes.objects(i)):
            if o["shape"] == "ring":  # its centre is the hole
                continue
            top, left, bottom, right = boxes[k].astype(int)
            pixel = scenes.images[i, (top + bottom) // 2, (left + right) // 2].astype(float)
            tint = scenes.scenes["tint"][i, k]
            assert np.abs(pixel - colours[list(COLOURS).index(o["colour"])] - tint).max() <= 2, (i, o, pixel)


def test_shapes_images_are_unchanged():
    """shapes-v1 renders exactly as before shapes_clutter generalised its renderer (hashes taken before)."""
    want = {("train", 1100, 48): "31e37d86802def0f", ("test", 300, 32): "793850c505474224",
            ("val", 200, 64): "6f692794b1f19f78"}
    for (split, n, px), digest in want.items():
        images = ShapesDataset(split, n, px, seed=3).images
        assert hashlib.sha256(images.tobytes()).hexdigest()[:16] == digest, (split, n, px)


@pytest.mark.parametrize("override, match", [
    ("data.clutter_objects=[0,4]", "data.clutter_objects"), ("data.clutter_objects=[2,9]", "data.clutter_objects"),
    ("data.clutter_objects=[5,3]", "data.clutter_objects must be"), ("data.image_size=24", "data.image_size"),
    ("data.clutter_share=1.5", "data.clutter_share"),
])
def test_bad_settings_name_their_key(override, match):
    with pytest.raises(ConfigError, match=match):
        cfg = load_config(None, ["data.name=shapes_clutter", "data.train_size=8", "data.val_size=0",
                                 "data.test_size=0", "train.batch_size=8", "data.cache_dir=", override])
        build_datasets(cfg.data, 0)
    with pytest.raises(DataError, match="min <= max"):
        ShapesClutterDataset("train", 4, objects=(4, 3))


# --- the containment metrics ---
def _case(seed, n=120, c=10, ties=False):
    g = torch.Generator().manual_seed(seed)
    targets = torch.rand(n, c, generator=g) < 0.2
    targets[0, :] = False  # an image with no class, and a class with no image
    targets[:, -1] = False
    img = F.normalize(targets.float() + torch.randn(n, c, generator=g), dim=1)
    queries, classes = torch.eye(c) + 0.3 * torch.randn(c, c, generator=g), torch.eye(c)
    if ties:
        img = (img * 2).round() / 2
    return img, queries, classes, targets


@pytest.mark.parametrize("seed, ties", [(0, False), (1, True), (2, True)])
def test_containment_matches_scikit_learn(seed, ties):
    img, queries, classes, targets = _case(seed, ties=ties)
    got = containment_metrics(img, queries, classes, targets)
    t2i = (img @ queries.T).numpy()
    zs = (img @ classes.T).numpy()
    y = targets.numpy()
    cols = [q for q in range(y.shape[1]) if y[:, q].any()]
    rows = [i for i in range(y.shape[0]) if y[i].any()]
    assert got["containment/n_queries"] == len(cols) == y.shape[1] - 1
    assert got["containment/t2i_mAP"] == pytest.approx(np.mean([average_precision_score(y[:, q], t2i[:, q])
                                                                 for q in cols]), abs=1e-9)
    assert got["containment/zeroshot_mAP"] == pytest.approx(np.mean([average_precision_score(y[:, q], zs[:, q])
                                                                      for q in cols]), abs=1e-9)
    assert got["containment/zeroshot_image_mAP"] == pytest.approx(
        np.mean([average_precision_score(y[i], zs[i]) for i in rows]), abs=1e-9)
    assert got["containment/t2i_R@1"] == pytest.approx(np.mean([y[np.argmax(t2i[:, q]), q] for q in cols]))


def test_perfect_embeddings_score_one_and_shuffled_ones_chance():
    img, queries, classes, targets = _case(3, n=600, c=48)
    perfect = containment_metrics(targets.float(), classes, classes, targets, bootstrap=200)
    for key in ("t2i_mAP", "t2i_R@1", "zeroshot_mAP", "zeroshot_image_mAP"):
        assert perfect[f"containment/{key}"] == 1.0, key
    shuffled = containment_metrics(targets.float()[torch.randperm(600, generator=torch.Generator().manual_seed(0))],
                                   classes, classes, targets, bootstrap=200)
    prevalence = targets[:, targets.any(0)].float().mean().item()  # ~0.2: a random ranking's AP
    assert abs(shuffled["containment/t2i_mAP"] - prevalence) < 0.04
    assert shuffled["containment/t2i_mAP_ci_low"] < shuffled["containment/t2i_mAP"] < shuffled["containment/t2i_mAP_ci_high"]


class OracleModel(torch.nn.Module):
    """Images → the sum of one-hots of the classes they contain (looked up by pixels); texts → the one-hot of the
    "colour shape" they name. A perfect model of containment, read through the real embedding path."""

    def __init__(self, dataset, names):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        names, targets = object_classes(dataset)
        self.names, self.texts = names, []
        self.by_pixels = {dataset.images[i].tobytes(): targets[i].float() for i in range(len(dataset))}

    def encode_image(self, x):  # (B, 3, H, W) in [0, 1]
        pixels = (x * 255).round().byte().permute(0, 2, 3, 1)
        return torch.stack([self.by_pixels[p.numpy().tobytes()] for p in pixels])

    def encode_text(self, ids, mask):
        out = torch.zeros(len(ids), len(self.names))
        for row, j in enumerate(ids[:, 0].tolist()):
            (pair,) = PAIR.findall(self.texts[j])
            out[row, self.names.index(" ".join(pair))] = 1
        return out


def test_oracle_model_scores_one_through_the_embedding_path():
    ds = ShapesClutterDataset("test", 200, 32, seed=4)
    model = OracleModel(ds, None)

    def tokenizer(texts):
        model.texts += texts
        ids = torch.arange(len(model.texts) - len(texts), len(model.texts))[:, None]
        return ids, torch.ones_like(ids)

    from polyalign.eval.embed import embed_images
    got = evaluate_containment(model, tokenizer, ds, embed_images(model, ds, batch_size=64), batch_size=16)
    assert got["containment/t2i_mAP"] == got["containment/zeroshot_mAP"] == got["containment/t2i_R@1"] == 1.0
    assert got["containment/n_queries"] == 48 and "an orange star" in model.texts  # articles as the captions have


def test_plain_shapes_scenes_list_their_classes():
    ds = ShapesDataset("test", 300, 32)
    names, targets = object_classes(ds)
    assert len(names) == 48 and targets.sum(1).tolist() == [len(ds.objects(i)) for i in range(len(ds))]
    assert all(names[c] in ds.tags(i) for i, c in torch.nonzero(targets).tolist())


def test_tiny_training_writes_containment_metrics(tmp_path, tiny_overrides, capsys):
    from polyalign.app.training import train
    from polyalign.cli import main

    cfg = load_config(None, tiny_overrides + ["data.name=shapes_clutter", "train.max_steps=2", "train.threads=1",
                                              "eval.bootstrap_resamples=50", "eval.probe_field=count"])
    train(cfg, tmp_path / "run", show_progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("t2i_mAP", "t2i_R@1", "zeroshot_mAP", "zeroshot_image_mAP"):
        assert 0 < metrics[f"containment/{key}"] <= 1 and f"containment/{key}_ci_low" in metrics, key
    assert metrics["containment/n_queries"] == 48
    assert {"retrieval/t2i_R@1", "retrieval_any/t2i_R@1", "probe/count_acc", "tagging/probe_mAP"} <= set(metrics)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 0  # `polyalign eval` rebuilds the data from the saved config
    again = json.loads(capsys.readouterr().out)
    assert again["containment/t2i_mAP"] == pytest.approx(metrics["containment/t2i_mAP"], abs=1e-6)
