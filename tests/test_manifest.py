import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from polyalign.data.manifest import ManifestDataset
from polyalign.errors import DataError


def _png(path, size=(40, 30), colour=(200, 30, 30), mode="RGB"):
    Image.new(mode, size, colour).save(path)
    return path.name


@pytest.fixture
def folder(tmp_path):
    """Three good images plus a truncated PNG, a text file named .png and a missing file."""
    _png(tmp_path / "red.png")
    _png(tmp_path / "blue.png", size=(30, 60), colour=(20, 40, 220))
    _png(tmp_path / "clear.png", colour=(0, 255, 0, 0), mode="RGBA")  # fully transparent: white after flattening
    noisy = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    return tmp_path


GOOD = [
    {"image": "red.png", "caption": "a red box", "label": "red", "tags": ["red"]},
    {"image": "blue.png", "captions": ["a blue box", "  ", "blue"], "label": "blue"},
    {"image": "clear.png", "caption": "nothing"},
]
BAD = [
    ({"image": "truncated.png", "caption": "half a picture"}, "corrupt image"),
    ({"image": "text.png", "caption": "text"}, "corrupt image"),
    ({"image": "missing.png", "caption": "gone"}, "missing image"),
    ({"image": "red.png", "caption": "   "}, "empty caption"),
]


def _jsonl(folder, rows, extra_lines=()):
    path = folder / "data.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in rows] + list(extra_lines)) + "\n")
    return path


def test_valid_rows_load(folder):
    ds = ManifestDataset(_jsonl(folder, GOOD), image_size=16, show_progress=False)
    assert len(ds) == 3 and ds.skip_report.n_skipped == 0
    assert ds.captions(1) == ["a blue box", "blue"] and ds.tags(0) == ["red"] and ds.tags(2) == []
    item = ds[(0, 0)]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 16, 16)
    assert tuple(ds.images[0, 8, 8]) == (200, 30, 30) and (ds.images[2] == 255).all()


def test_resize_shorter_side_then_centre_crop(folder):
    bands = np.zeros((60, 20, 3), np.uint8)  # 20 wide, 60 tall: red, green, blue thirds
    bands[:20, :, 0], bands[20:40, :, 1], bands[40:, :, 2] = 255, 255, 255
    Image.fromarray(bands).save(folder / "bands.png")
    ds = ManifestDataset(_jsonl(folder, [{"image": "bands.png", "caption": "x"}]), image_size=10, show_progress=False)
    assert ds.images.shape == (1, 10, 10, 3)
    assert (ds.images[0, 1:-1, :, 1] > 200).all() and (ds.images[0, 1:-1, :, [0, 2]] < 50).all()  # the middle third


def test_bad_rows_are_counted_by_reason(folder):
    path = _jsonl(folder, GOOD + [r for r, _ in BAD], extra_lines=["{not json", "[1, 2]"])
    ds = ManifestDataset(path, max_bad_fraction=0.8, show_progress=False)
    assert len(ds) == 3
    assert ds.skip_report.skipped == {"corrupt image": 2, "missing image": 1, "empty caption": 1, "bad row": 2}
    assert ds.skip_report.total == 9 and ds.skip_report.examples[0] == "data.jsonl:4: corrupt image"


def test_truncated_images_are_rejected_even_if_pil_is_lenient(folder):
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        ds = ManifestDataset(_jsonl(folder, GOOD + [BAD[0][0]]), max_bad_fraction=0.5, show_progress=False)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert ds.skip_report.skipped == {"corrupt image": 1}


def test_too_many_bad_rows_raise_naming_them(folder):
    path = _jsonl(folder, GOOD + [r for r, _ in BAD])
    with pytest.raises(DataError) as err:
        ManifestDataset(path, max_bad_fraction=0.5, show_progress=False)
    message = str(err.value)
    for text in ("4 of 7", "57.1%", "50.0%", "data.jsonl:4: corrupt image", "data.jsonl:6: missing image",
                 "data.max_bad_fraction"):
        assert text in message
    assert len(ManifestDataset(path, max_bad_fraction=0.6, show_progress=False)) == 3


def test_csv_manifest(folder):
    path = folder / "data.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "captions", "label", "tags"])
        writer.writerow(["red.png", "a red box|red", "red", "red|box"])
        writer.writerow([str(folder / "blue.png"), "a blue box", "", ""])  # absolute path, no label
        writer.writerow(["missing.png", "gone", "", ""])
    ds = ManifestDataset(path, max_bad_fraction=0.5, show_progress=False)
    assert len(ds) == 2 and ds.captions(0) == ["a red box", "red"] and ds.tags(0) == ["red", "box"]
    assert ds.labels(0) == {"label": 0} and ds.labels(1) == {} and ds.label_names == {"label": ["red"]}
    assert ds.skip_report.examples == ["data.csv:4: missing image"]


def test_label_vocabulary_is_built_or_reused(folder):
    train = ManifestDataset(_jsonl(folder, GOOD), show_progress=False)
    assert train.label_names == {"label": ["blue", "red"]}
    assert [train.labels(i) for i in range(3)] == [{"label": 1}, {"label": 0}, {}]
    rows = [{"image": "red.png", "caption": "x", "label": "red"}, {"image": "blue.png", "caption": "y", "label": "cyan"}]
    test = ManifestDataset(_jsonl(folder, rows), label_names=train.label_names, show_progress=False)
    assert test.label_names == train.label_names and [test.labels(i) for i in range(2)] == [{"label": 1}, {}]
    unlabelled = ManifestDataset(_jsonl(folder, [GOOD[2]]), show_progress=False)
    assert unlabelled.label_names == {} and unlabelled.labels(0) == {}


def test_missing_manifest_and_empty_manifest(folder):
    with pytest.raises(DataError, match="nowhere.jsonl"):
        ManifestDataset(folder / "nowhere.jsonl")
    with pytest.raises(DataError, match="no usable rows"):
        ManifestDataset(_jsonl(folder, [BAD[2][0]]), max_bad_fraction=1.0, show_progress=False)


def test_several_label_fields_each_with_its_vocabulary(folder):
    rows = [{"image": "red.png", "caption": "a", "category": "Symbols", "subcategory": "arrow"},
            {"image": "blue.png", "caption": "b", "category": "Flags", "subcategory": "country-flag"},
            {"image": "clear.png", "caption": "c", "category": "Flags"}]
    ds = ManifestDataset(_jsonl(folder, rows), label_fields=["category", "subcategory"], show_progress=False)
    assert ds.label_names == {"category": ["Flags", "Symbols"], "subcategory": ["arrow", "country-flag"]}
    assert [ds.labels(i) for i in range(3)] == [{"category": 1, "subcategory": 0},
                                                 {"category": 0, "subcategory": 1}, {"category": 0}]
    assert set(ds.prompt_templates) == {"category", "subcategory"}
    test = ManifestDataset(_jsonl(folder, rows[:1]), label_names=ds.label_names,
                           label_fields=["category", "subcategory"], show_progress=False)
    assert test.labels(0) == {"category": 1, "subcategory": 0}
    bad = [{"image": "red.png", "caption": "a", "category": 3}]
    assert ManifestDataset(_jsonl(folder, rows + bad), label_fields=["category"], max_bad_fraction=0.5,
                           show_progress=False).skip_report.skipped == {"bad row": 1}
