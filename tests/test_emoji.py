"""The emoji dataset builder on tiny fixture npm packages (folders and .tgz); nothing is downloaded."""
import io
import json
import tarfile

import pytest
from PIL import Image

from polyalign.cli import main
from polyalign.data import emoji
from polyalign.data.base import stable_hash
from polyalign.data.manifest import ManifestDataset
from polyalign.errors import DataError

# (unified, name, short_names, category, subcategory)
ENTRIES = [
    ("1F600", "GRINNING FACE", ["grinning"], "Smileys & Emotion", "face-smiling"),
    ("1F436", "DOG FACE", ["dog"], "Animals & Nature", "animal-mammal"),
    ("2764-FE0F", "HEAVY BLACK HEART", ["heart"], "Smileys & Emotion", "heart"),
    ("1F355", "SLICE OF PIZZA", ["pizza"], "Food & Drink", "food-prepared"),
    ("1F3F3-FE0F-200D-1F308", "RAINBOW FLAG", ["rainbow-flag"], "Flags", "flag"),
    ("1F34E", "RED APPLE", ["apple"], "Food & Drink", "food-fruit"),
]
NO_TWITTER_IMAGE = "1f34e"  # has_img_twitter false
CORRUPT_GOOGLE = "1f355"  # google PNG is garbage
EMOJIBASE = [
    {"hexcode": "1F600", "label": "grinning face", "tags": ["face", "grin"], "emoticon": ":D"},
    {"hexcode": "1F436", "label": "dog face", "tags": ["dog", "face", "pet"]},
    {"hexcode": "2764", "label": "red heart", "tags": ["heart", "love"], "emoticon": "<3"},  # no FE0F here
    {"hexcode": "1F355", "label": "pizza", "tags": ["cheese", "slice"]},
    {"hexcode": "1F3F3-FE0F-200D-1F308", "label": "rainbow flag", "tags": ["pride", "rainbow"]},
]


def _png(colour) -> bytes:
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent, with an opaque square in the middle
    im.paste(Image.new("RGBA", (32, 32), colour), (16, 16))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _datasource_files(style: str) -> dict[str, bytes]:
    entries, files = [], {"package.json": json.dumps({"name": f"emoji-datasource-{style}", "version": "1.0.0"})}
    for k, (unified, name, short, cat, sub) in enumerate(ENTRIES):
        cid = unified.lower()
        has = not (style == "twitter" and cid == NO_TWITTER_IMAGE)
        entries.append({"unified": unified, "name": name, "short_names": short, "category": cat,
                        "subcategory": sub, "image": f"{cid}.png", f"has_img_{style}": has,
                        "skin_variations": {"1F3FB": {"unified": f"{unified}-1F3FB"}} if k == 1 else None})
        if has:
            corrupt = style == "google" and cid == CORRUPT_GOOGLE
            files[f"img/{style}/64/{cid}.png"] = b"not a png at all" if corrupt else _png((40 * k, 200, 50, 255))
    files["emoji.json"] = json.dumps(entries)
    return files


def _emojibase_files() -> dict[str, bytes]:
    return {"package.json": json.dumps({"name": "emojibase-data", "version": "1.0.0"}),
            "en/data.json": json.dumps(EMOJIBASE)}


def _write_folder(root, files):
    for rel, data in files.items():
        path = root / "package" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def _write_tgz(path, files):
    with tarfile.open(path, "w:gz") as tf:
        for rel, data in files.items():
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(f"package/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def sources(tmp_path):
    """google and emojibase as extracted folders, twitter as an npm-style tarball."""
    return [_write_folder(tmp_path / "src-google", _datasource_files("google")),
            _write_tgz(tmp_path / "emoji-datasource-twitter-1.0.0.tgz", _datasource_files("twitter")),
            _write_folder(tmp_path / "src-emojibase", _emojibase_files())]


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_captions_labels_and_skips(tmp_path, sources):
    out = tmp_path / "out"
    info = emoji.build_emoji_dataset(out, ["google", "twitter"], sources, tmp_path / "cache", show_progress=False)
    rows = _read(out / "all.jsonl")
    by_key = {(r["style"], r["concept_id"]): r for r in rows}
    assert len(rows) == 2 * len(ENTRIES) - 2  # one corrupt google PNG, one missing twitter image
    assert ("google", CORRUPT_GOOGLE) not in by_key and ("twitter", NO_TWITTER_IMAGE) not in by_key
    assert info["skipped"]["google"]["skipped"] == {emoji.CORRUPT: 1}
    assert info["skipped"]["twitter"]["skipped"] == {emoji.NO_IMAGE: 1}
    assert info["skipped"]["google"]["total"] == len(ENTRIES)
    heart = by_key[("google", "2764-fe0f")]  # matched to emojibase's "2764" through the FE0F normalisation
    assert heart["captions"][:3] == ["heavy black heart", "an emoji of red heart", "red heart"]
    assert heart["tags"] == ["heart", "love"] and heart["emoticons"] == ["<3"]
    assert heart["label"] == heart["subcategory"] == "heart" and heart["category"] == "Smileys & Emotion"
    assert "rainbow flag" in by_key[("twitter", "1f3f3-fe0f-200d-1f308")]["captions"]
    apple = by_key[("google", "1f34e")]  # not in emojibase: captions from emoji-datasource alone, no tags
    assert apple["captions"] == ["red apple", "an emoji of red apple", "apple"] and apple["tags"] == []
    assert not any("1f3fb" in r["concept_id"] for r in rows)  # skin-tone variations are not used
    image = Image.open(out / heart["image"])
    assert image.mode == "RGB" and image.size == (64, 64)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparency composited onto white
    assert image.getpixel((32, 32)) == (80, 200, 50)


def test_same_concept_ids_across_styles_and_disjoint_splits(tmp_path, sources):
    out = tmp_path / "out"
    emoji.build_emoji_dataset(out, ["google", "twitter"], sources, tmp_path / "cache", show_progress=False)
    rows = _read(out / "all.jsonl")
    ids = {s: {r["concept_id"] for r in rows if r["style"] == s} for s in ("google", "twitter")}
    assert ids["google"] - {NO_TWITTER_IMAGE} == ids["twitter"] - {CORRUPT_GOOGLE}
    assert (out / "images" / "google" / "1f600.png").is_file() and (out / "images" / "twitter" / "1f600.png").is_file()
    style_train, style_test = _read(out / "style_train.jsonl"), _read(out / "style_test.jsonl")
    assert {r["style"] for r in style_train} == {"google"} and {r["style"] for r in style_test} == {"twitter"}
    train, test = _read(out / "concept_train.jsonl"), _read(out / "concept_test.jsonl")
    assert len(train) + len(test) == len(rows)
    assert not {r["concept_id"] for r in train} & {r["concept_id"] for r in test}
    assert all(stable_hash(r["concept_id"]) % 10 < 2 for r in test)
    info = json.loads((out / "info.json").read_text())
    assert info["rows"]["style_test"] == len(style_test) and "CC-BY-4.0" in info["licences"]["twitter"]
    assert "Apache-2.0" in (out / "README.txt").read_text()


def test_single_style_has_no_style_split_and_tarball_sources(tmp_path):
    srcs = [_write_tgz(tmp_path / "g.tgz", _datasource_files("google")),
            _write_tgz(tmp_path / "e.tgz", _emojibase_files())]
    out = tmp_path / "out"
    info = emoji.build_emoji_dataset(out, ["google"], srcs, tmp_path / "cache", show_progress=False)
    assert info["concepts"] == len(ENTRIES) - 1
    assert not (out / "style_test.jsonl").exists()


def test_manifest_loads(tmp_path, sources):
    out = tmp_path / "out"
    emoji.build_emoji_dataset(out, ["google", "twitter"], sources, tmp_path / "cache", show_progress=False)
    ds = ManifestDataset(out / "style_test.jsonl", image_size=48, show_progress=False)
    assert len(ds) == len(ENTRIES) - 1 and ds.image(0).shape == (3, 48, 48)
    assert "heart" in ds.label_names["label"]


def test_missing_npm_without_source_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="npm not found.*--source"):
        emoji.build_emoji_dataset(tmp_path / "out", ["google"], [], tmp_path / "cache", show_progress=False)


def test_cached_tarball_is_reused_without_npm(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    cache = tmp_path / "cache"
    cache.mkdir()
    _write_tgz(cache / "emoji-datasource-google-1.0.0.tgz", _datasource_files("google"))
    _write_tgz(cache / "emojibase-data-1.0.0.tgz", _emojibase_files())
    info = emoji.build_emoji_dataset(tmp_path / "out", ["google"], [], cache, show_progress=False)
    assert info["packages"] == {"emoji-datasource-google": "1.0.0", "emojibase-data": "1.0.0"}


def test_unlicensed_style_needs_flag(tmp_path, sources):
    with pytest.raises(DataError, match="allow-unlicensed"):
        emoji.build_emoji_dataset(tmp_path / "out", ["apple"], sources, tmp_path / "cache", show_progress=False)


def test_cli(tmp_path, sources, capsys):
    argv = ["data", "emoji", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    assert main(argv + sum([["--source", str(s)] for s in sources], [])) == 0
    printed = capsys.readouterr().out
    assert "6 concepts" in printed and "corrupt PNG: 1" in printed and "no image for this style: 1" in printed
    assert main(argv + ["--styles", "facebook"]) == 1
    assert "allow-unlicensed" in capsys.readouterr().err
