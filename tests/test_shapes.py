import numpy as np
import pytest
import torch

from polyalign.data.shapes import ShapesDataset
from polyalign.data.shapes_captions import SYNONYMS
from polyalign.errors import DataError


@pytest.fixture(scope="module")
def train():
    return ShapesDataset("train", 300, image_size=32, seed=3)


def test_same_arguments_give_same_scenes(train):
    again = ShapesDataset("train", 300, image_size=32, seed=3)
    assert np.array_equal(train.images, again.images)
    assert [train.captions(i) for i in range(300)] == [again.captions(i) for i in range(300)]


def test_splits_and_seeds_differ(train):
    for other in (ShapesDataset("val", 300, image_size=32, seed=3), ShapesDataset("train", 300, image_size=32, seed=4)):
        assert not np.array_equal(train.images, other.images)
        assert [train.captions(i) for i in range(20)] != [other.captions(i) for i in range(20)]


def test_items_do_not_depend_on_size_or_image_size(train):
    longer = ShapesDataset("train", 1500, image_size=32, seed=3)
    assert np.array_equal(longer.images[:300], train.images)
    bigger = ShapesDataset("train", 300, image_size=48, seed=3)
    assert [bigger.captions(i) for i in range(300)] == [train.captions(i) for i in range(300)]


def test_item_shapes_and_dtypes(train):
    item = train[(0, 5)]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 32, 32)
    assert item["index"] == 5 and isinstance(item["caption"], str)
    assert train.images.shape == (300, 32, 32, 3) and len(train) == 300


def test_images_are_not_blank(train):
    per_image_std = train.images.reshape(300, -1, 3).astype(float).std(1).mean(1)
    assert per_image_std.min() > 5  # every scene has a coloured object on a low-saturation background


def test_object_count_mix(train):
    counts = np.bincount(train.scenes["count"], minlength=4)[1:]
    assert counts.min() > 300 / 3 * 0.7


def test_captions_are_distinct_and_nonempty(train):
    for i in range(300):
        caps = train.captions(i)
        assert len(caps) == 5 and len(set(caps)) == 5 and all(c.strip() for c in caps)


def test_single_object_labels_match_captions(train):
    names = train.label_names
    singles = [i for i in range(300) if len(train.objects(i)) == 1]
    assert singles
    for i in singles:
        lab, caps = train.labels(i), " | ".join(train.captions(i))
        assert set(lab) == {"shape", "colour", "size", "position", "count"} and lab["count"] == 0
        assert names["shape"][lab["shape"]] in caps and names["colour"][lab["colour"]] in caps
        assert {names["colour"][lab["colour"]], names["shape"][lab["shape"]]} <= set(train.tags(i))


def test_multi_object_scenes_carry_only_count(train):
    multis = [i for i in range(300) if len(train.objects(i)) > 1]
    assert multis
    for i in multis:
        assert train.labels(i) == {"count": len(train.objects(i)) - 1}
        assert all(o["shape"] in train.tags(i) for o in train.objects(i))


def _object_named_in(text, objs):
    """The one object of the scene whose shape (or a synonym of it) the text names."""
    found = [o for o in objs if any(w in text for w in [o["shape"], *SYNONYMS[o["shape"]]])]
    assert len(found) == 1, (text, objs)
    return found[0]


def test_relations_in_captions_hold(train):
    relations = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "over": (0, -1), "below": (0, 1),
                 "under": (0, 1)}
    checked = 0
    for i in range(300):
        objs = train.objects(i)
        for cap in train.captions(i):
            for word, (axis, sign) in relations.items():
                if f" {word} " in cap:
                    left, right = cap.split(f" {word} ")
                    a, b = _object_named_in(left, objs), _object_named_in(right, objs)
                    assert sign * (divmod(a["cell"], 3)[axis] - divmod(b["cell"], 3)[axis]) > 0, (cap, objs)
                    checked += 1
    assert checked > 100


def test_caption_choice_is_deterministic_and_varies_with_epoch(train):
    assert train[(2, 7)]["caption"] == train[(2, 7)]["caption"]
    assert len({train[(epoch, 7)]["caption"] for epoch in range(30)}) > 1


def test_zero_shot_prompts_are_in_distribution(train):
    captions = {c for i in range(300) for c in train.captions(i)}
    for field in ("shape", "colour", "size", "position", "count"):
        templates = train.prompt_templates[field]
        assert all("{}" in t for t in templates)
        assert any(t.format(name) in captions for t in templates for name in train.label_names[field])


def test_generates_5000_scenes():
    assert len(ShapesDataset("test", 5000, image_size=48)) == 5000


def test_cache_round_trip(tmp_path, train):
    first = ShapesDataset("train", 300, image_size=32, seed=3, cache_dir=tmp_path)
    (cache,) = tmp_path.glob("*.npy")
    assert np.array_equal(first.images, train.images) and not list(tmp_path.glob("*.tmp"))
    mtime = cache.stat().st_mtime_ns
    second = ShapesDataset("train", 300, image_size=32, seed=3, cache_dir=tmp_path)
    assert np.array_equal(second.images, train.images) and cache.stat().st_mtime_ns == mtime


def test_bad_split_names_valid_ones():
    with pytest.raises(DataError, match="train, val, test"):
        ShapesDataset("dev", 10)
