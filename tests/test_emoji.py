"""The emoji dataset builder: on tiny fixture npm packages (folders and .tgz; nothing downloaded), and one full
four-style build of the real packages (about 10 s; they come from the npm cache folder ``cache/npm`` of the
checkout, or $POLYALIGN_NPM_CACHE, fetched with ``npm pack`` when missing; those tests are skipped without npm)."""
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polyalign.cli import main
from polyalign.data import emoji, emoji_packages
from polyalign.data.emoji_groups import concept_group, is_test_group
from polyalign.data.emoji_render import iconify_svg, render_svg
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


YELLOW = '<circle cx="16" cy="16" r="15" fill="#ffc83d"/>'
FLUENT_ICONS = {  # fluent has chars.json: code point -> icon name
    "grinning-face": {"body": YELLOW},
    "dog-face": {"body": '<path d="M0 0L32 32"'},  # not XML: an unrenderable SVG, a counted skip
    "left-half": {"body": '<rect width="16" height="32" fill="#0000ff"/>'},
    "nothing": {"body": "<g/>"},  # draws nothing: a blank image, a counted skip
    "tall": {"body": '<rect width="32" height="64" fill="#00ff00"/>', "height": 64},  # 32 × 64: centred, kept thin
}
FLUENT_ALIASES = {"right-half": {"parent": "left-half", "hFlip": True}, "loop-a": {"parent": "loop-b"},
                  "loop-b": {"parent": "loop-a"}}
FLUENT_CHARS = {"1f600": "grinning-face", "1f436": "dog-face", "2764": "right-half", "1f355": "nothing",
                "1f34e": "tall", "1f3f3-fe0f-200d-1f308": "loop-a"}  # 2764: matched without its FE0F
# emojione has an empty chars.json: icons are found by slugs of the label, the datasource name, the short names
EMOJIONE_ICONS = {"grinning-face": {"body": YELLOW}, "dog-face": {"body": YELLOW.replace("ffc83d", "8b4513")},
                  "flag-for-rainbow-flag": {"body": '<rect width="32" height="20" fill="#ff0000"/>'},
                  "red-apple": {"body": '<circle cx="16" cy="16" r="10" fill="#ff0000"/>'}}
EMOJIONE_ALIASES = {"red-heart": {"parent": "grinning-face"}}  # the grinning face's picture: not a second concept's


def _iconify_files(package: str, icons: dict, aliases: dict, chars: dict) -> dict[str, bytes]:
    return {"package.json": json.dumps({"name": package, "version": "1.2.0"}), "chars.json": json.dumps(chars),
            "icons.json": json.dumps({"prefix": package.split("/")[-1], "icons": icons, "aliases": aliases,
                                      "width": 32, "height": 32})}


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


@pytest.fixture
def svg_sources(tmp_path, sources):
    """The PNG sources, fluent as an npm-style tarball of a scoped package, emojione as a folder."""
    return sources + [
        _write_tgz(tmp_path / "iconify-json-fluent-emoji-flat-1.2.0.tgz",
                   _iconify_files("@iconify-json/fluent-emoji-flat", FLUENT_ICONS, FLUENT_ALIASES, FLUENT_CHARS)),
        _write_folder(tmp_path / "src-emojione", _iconify_files("@iconify-json/emojione", EMOJIONE_ICONS,
                                                                EMOJIONE_ALIASES, {}))]


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
    assert all(is_test_group(r["concept_group"]) for r in test) and not any(is_test_group(r["concept_group"])
                                                                          for r in train)
    assert {r["concept_group"] for r in rows if r["concept_id"] == "1f3f3-fe0f-200d-1f308"} == {"flags"}
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
    monkeypatch.setattr(emoji_packages.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="npm not found.*--source"):
        emoji.build_emoji_dataset(tmp_path / "out", ["google"], [], tmp_path / "cache", show_progress=False)


def test_cached_tarball_is_reused_without_npm(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji_packages.shutil, "which", lambda name: None)
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


def _colour_share(image: Image.Image, rgb, tol=40) -> float:
    a = np.asarray(image.convert("RGB"), dtype=int)
    return float((np.abs(a - np.array(rgb)).max(axis=2) <= tol).mean())


def test_svg_styles_render_match_and_count_skips(tmp_path, svg_sources):
    out = tmp_path / "out"
    info = emoji.build_emoji_dataset(out, ["google", "twitter", "fluent", "emojione"], svg_sources, tmp_path / "c",
                                     show_progress=False)
    rows = _read(out / "all.jsonl")
    by_key = {(r["style"], r["concept_id"]): r for r in rows}
    assert {c for s, c in by_key if s == "fluent"} == {"1f600", "2764-fe0f", "1f34e"}
    assert info["skipped"]["fluent"]["skipped"] == {emoji.CORRUPT_SVG: 2, emoji.BLANK: 1}
    assert any("fluent/1f436: unrenderable SVG (ParseError" in e for e in info["skipped"]["fluent"]["examples"])
    assert {c for s, c in by_key if s == "emojione"} == {"1f600", "1f436", "1f3f3-fe0f-200d-1f308", "1f34e"}
    assert info["skipped"]["emojione"]["skipped"] == {emoji.NO_IMAGE: 2}  # pizza; the heart's alias is the face
    assert info["icon_matches"]["emojione"] == {"code point": 0, "label": 3, "datasource name": 1, "short name": 0}
    assert info["icon_matches"]["fluent"]["code point"] == 6
    face = Image.open(out / by_key[("fluent", "1f600")]["image"])
    assert face.mode == "RGB" and face.size == (64, 64) and face.getpixel((0, 0)) == (255, 255, 255)
    assert _colour_share(face, (0xff, 0xc8, 0x3d)) > 0.6  # a yellow disc on white
    heart = Image.open(out / by_key[("fluent", "2764-fe0f")]["image"])  # alias with hFlip: the right half is blue
    assert heart.getpixel((48, 32)) == (0, 0, 255) and heart.getpixel((16, 32)) == (255, 255, 255)
    tall = Image.open(out / by_key[("fluent", "1f34e")]["image"])  # 32 × 64 viewBox: centred, aspect kept
    assert tall.getpixel((32, 32)) == (0, 255, 0) and tall.getpixel((4, 32)) == (255, 255, 255)
    assert info["licences"]["fluent"].startswith("MIT") and info["licences"]["emojione"].startswith("CC-BY-4.0")
    assert "EmojiOne 2.x by Ranked" in (out / "README.txt").read_text()
    assert info["rows_per_style"] == {"google": 5, "twitter": 5, "fluent": 3, "emojione": 4}
    assert info["concepts_in_all_styles"] == 1  # 1f600: the apple has no twitter image, the heart no emojione one


def test_leave_one_style_out_files(tmp_path, svg_sources):
    out = tmp_path / "out"
    styles = ["google", "twitter", "fluent", "emojione"]
    emoji.build_emoji_dataset(out, styles, svg_sources, tmp_path / "c", show_progress=False)
    rows = _read(out / "all.jsonl")
    for style in styles:
        train, test = _read(out / f"loso_{style}_train.jsonl"), _read(out / f"loso_{style}_test.jsonl")
        assert {r["style"] for r in test} == {style} and style not in {r["style"] for r in train}
        assert len(train) + len(test) == len(rows)
    assert _read(out / "style_test.jsonl") == _read(out / "loso_emojione_test.jsonl")
    assert _read(out / "style_train.jsonl") == _read(out / "loso_emojione_train.jsonl")


def test_size_resizes_png_and_draws_svg_at_that_size(tmp_path, svg_sources):
    out = tmp_path / "out"
    info = emoji.build_emoji_dataset(out, ["google", "fluent"], svg_sources, tmp_path / "c", show_progress=False,
                                     size=32)
    assert info["image_size"] == 32
    assert {Image.open(out / r["image"]).size for r in _read(out / "all.jsonl")} == {(32, 32)}
    with pytest.raises(DataError, match="--size"):
        emoji.build_emoji_dataset(out, ["google"], svg_sources, tmp_path / "c", show_progress=False, size=2)


def test_concepts_filter_and_svg_only_build_reads_concepts_from_google(tmp_path, svg_sources):
    out = tmp_path / "out"
    info = emoji.build_emoji_dataset(out, ["fluent"], svg_sources, tmp_path / "c", show_progress=False,
                                     concepts=["1F600", "1f436"])
    assert {r["concept_id"] for r in _read(out / "all.jsonl")} == {"1f600"}
    assert info["skipped"]["fluent"] == {"total": 2, "skipped": {emoji.CORRUPT_SVG: 1},
                                         "examples": info["skipped"]["fluent"]["examples"]}
    assert "emoji-datasource-google" in info["packages"] and not (out / "style_test.jsonl").exists()


def test_render_svg_errors_are_value_errors_not_tracebacks():
    for bad in (b"", b"<svg", b"\xff\xfe garbage", b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 0 0"/>'):
        with pytest.raises(ValueError) as e:
            render_svg(bad, 16)
        assert e.value.args[0] in (emoji.CORRUPT_SVG, emoji.BLANK)
    assert iconify_svg({"icons": {}, "aliases": {"a": {"parent": "b"}}}, "a") is None
    assert iconify_svg({"icons": {"x": {"body": 3}}}, "x") is None
    assert iconify_svg({"icons": {"x": {"body": "<g/>", "width": "wide"}}}, "x") is None
    assert 'viewBox="0 0 32 32"' in iconify_svg({"icons": {"x": {"body": "<g/>"}}, "width": 32, "height": 32}, "x")


def test_scoped_package_tarball_is_found_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji_packages.shutil, "which", lambda name: None)
    _write_tgz(tmp_path / "iconify-json-emojione-1.2.3.tgz", _iconify_files("@iconify-json/emojione", {}, {}, {}))
    assert emoji_packages.npm_pack("@iconify-json/emojione", tmp_path).name == "iconify-json-emojione-1.2.3.tgz"


@pytest.mark.parametrize("names", [
    ["man artist", "woman artist", "artist"],
    ["man running", "woman running", "person running", "person running: facing right", "man running: facing right"],
    ["couple with heart", "couple with heart: woman, man", "couple with heart: man, man"],
    ["family", "family: man, woman, boy", "family: adult, adult, child", "family: woman, girl"],
    ["woman and man holding hands", "men holding hands", "people holding hands"],
    ["man: red hair", "woman: red hair", "person: red hair", "red hair"],
    ["men’s room", "women’s room"], ["mermaid", "merman", "merperson"], ["prince", "princess", "person with crown"],
    ["man", "woman", "person", "boy", "girl", "child"], ["left arrow", "up arrow", "up-right arrow"],
    ["light skin tone", "dark skin tone"], ["thumbs up", "thumbs down"], ["woman dancing", "man dancing"],
])
def test_variant_names_share_a_group(names):
    assert len({concept_group(n) for n in names}) == 1, {n: concept_group(n) for n in names}


def test_different_concepts_keep_their_own_groups():
    names = ["artist palette", "artist", "running shoe", "running", "kiss mark", "kiss", "baby", "person",
             "manual wheelchair", "in manual wheelchair", "upside-down face", "mango", "cup with straw"]
    assert len({concept_group(n) for n in names}) == len(names)
    assert concept_group("flag: France", "Flags") == concept_group("pirate flag", "Flags") == "flags"


def test_cli_prints_counts_per_style_and_split(tmp_path, svg_sources, capsys):
    argv = ["data", "emoji", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"),
            "--styles", "google,twitter,fluent,emojione", "--size", "48"]
    assert main(argv + sum([["--source", str(s)] for s in svg_sources], [])) == 0
    printed = capsys.readouterr().out
    assert "fluent: 3 images; skipped 3 of 6 (unrenderable SVG: 2, blank image: 1)" in printed
    assert "emojione: 4 images; skipped 2 of 6 (no image for this style: 2)" in printed
    assert "icons matched by code point 0, label 3, datasource name 1, short name 0" in printed
    assert "loso_fluent_test 3" in printed and "groups on both sides 0" in printed and "48 px" in printed


# ---- the real packages: one full four-style build per test session ----

REAL_STYLES = ["google", "twitter", "fluent", "emojione"]


@pytest.fixture(scope="session")
def real_build(tmp_path_factory):
    cache = Path(os.environ.get("POLYALIGN_NPM_CACHE") or Path(__file__).resolve().parents[1] / "cache" / "npm")
    names = [emoji.STYLES[s].package for s in REAL_STYLES] + [emoji.EMOJIBASE]
    try:
        sources = [emoji_packages.npm_pack(n, cache) for n in names]
    except DataError as e:
        pytest.skip(f"real emoji packages not available: {e}")
    out = tmp_path_factory.mktemp("emoji4")
    info = emoji.build_emoji_dataset(out, REAL_STYLES, sources, cache, show_progress=False)
    return out, info, _read(out / "all.jsonl")


def test_real_build_counts(real_build):
    out, info, rows = real_build
    per = info["rows_per_style"]
    assert per["google"] >= 1900 and per["twitter"] >= 1900, per
    assert 1550 <= per["fluent"] <= 1700 and 1300 <= per["emojione"] <= 1450, per  # fluent has no country flags
    assert info["concepts_in_all_styles"] >= 1000
    for style in ("fluent", "emojione"):  # nothing unrenderable in the real sets: all skips are missing icons
        assert set(info["skipped"][style]["skipped"]) == {emoji.NO_IMAGE}, info["skipped"][style]
    assert {Image.open(out / rows[k]["image"]).size for k in range(0, len(rows), 97)} == {(64, 64)}


def test_real_fluent_and_emojione_grinning_faces_are_yellow(real_build):
    out, _, rows = real_build
    by_key = {(r["style"], r["concept_id"]): r for r in rows}
    for style in ("fluent", "emojione", "google"):
        face = np.asarray(Image.open(out / by_key[(style, "1f600")]["image"]), dtype=int)
        r, g, b = face[..., 0], face[..., 1], face[..., 2]
        yellow, white = ((r > 200) & (g > 150) & (b < 120)).mean(), ((r > 245) & (g > 245) & (b > 245)).mean()
        assert yellow > 0.3 and yellow / (1 - white) > 0.55, (style, yellow, white)  # a yellow face, on white
    left = np.asarray(Image.open(out / by_key[("fluent", "1f448")]["image"]), dtype=int)  # 👉: hFlip alias of 👈
    right = np.asarray(Image.open(out / by_key[("fluent", "1f449")]["image"]), dtype=int)
    assert np.abs(left[:, ::-1] - right).mean() < 2 < np.abs(left - right).mean()


def test_real_concept_split_is_grouped(real_build):
    out, info, rows = real_build
    train, test = _read(out / "concept_train.jsonl"), _read(out / "concept_test.jsonl")
    assert not {r["concept_group"] for r in train} & {r["concept_group"] for r in test}
    assert not {r["concept_id"] for r in train} & {r["concept_id"] for r in test}
    assert len(train) + len(test) == len(rows)
    n_test, n_all = info["concepts_per_split"]["concept_test"], info["concepts"]
    assert 0.15 <= n_test / n_all <= 0.25, (n_test, n_all)
    assert info["concept_split"]["grouped_split"]["groups_on_both_sides"] == 0
    assert info["concept_split"]["ungrouped_hash_split"]["groups_on_both_sides"] > 20  # what the groups fix
    group = {r["concept_id"]: r["concept_group"] for r in rows}
    pairs = [("1f468-200d-1f3a8", "1f469-200d-1f3a8"),  # man artist / woman artist
             ("1f3c3-200d-2642-fe0f", "1f3c3-200d-2640-fe0f"),  # man running / woman running
             ("1f3c3-200d-2642-fe0f", "1f3c3-200d-27a1-fe0f"),  # man running / person running facing right
             ("1f469-200d-2764-fe0f-200d-1f468", "1f491"),  # couple with heart: woman, man / couple with heart
             ("1f1eb-1f1f7", "1f1ef-1f1f5"), ("1f1eb-1f1f7", "1f3f4-200d-2620-fe0f")]  # France, Japan, pirate flag
    for a, b in pairs:
        assert group[a] == group[b], (a, b, group[a], group[b])
    assert group["1f468-200d-1f3a8"] != group["1f3a8"]  # the artist is not the palette
