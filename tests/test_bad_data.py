"""Bad input data (issue 17): each case is a counted skip with a reason that says what to do, or a clear error."""
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from polyalign.data.audio import SpeechManifest
from polyalign.data.speech import write_wav
from polyalign.data.manifest import ManifestDataset, load_image
from polyalign.errors import DataError

GOOD = {"image": "red.png", "caption": "a red box"}


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 20), (20, 30, 200)).save(tmp_path / "images" / "blue.png")
    return tmp_path


def _jsonl(folder, rows, name="data.jsonl"):
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(path, **kw):
    return ManifestDataset(path, image_size=8, show_progress=False, max_bad_fraction=kw.pop("max_bad_fraction", 0.5),
                           **kw)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png16(path, pixels: np.ndarray, colour_type: int, trns: bytes = b""):
    """A 16-bit PNG written by hand (PIL cannot write all of them): pixels (H, W, C) uint16."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + (_chunk(b"tRNS", trns) if trns else b"") + _chunk(b"IDAT", zlib.compress(raw))
                     + _chunk(b"IEND", b""))
    return path


# --- manifests that are not UTF-8 ---

def test_a_non_utf8_jsonl_line_is_a_counted_skip(folder):
    path = folder / "data.jsonl"
    good = json.dumps(GOOD).encode()
    path.write_bytes(b"\n".join([good, b'{"image": "red.png", "caption": "caf\xe9"}', good]) + b"\n")
    ds = _load(path)
    assert len(ds) == 2 and ds.skip_report.skipped == {"not UTF-8 text": 1}
    assert ds.skip_report.examples == ["data.jsonl:2: not UTF-8 text (byte 0xe9 at character 37: save the "
                                       "manifest as UTF-8)"]


def test_a_non_utf8_csv_row_is_a_counted_skip_with_its_line(folder):
    path = folder / "data.csv"
    path.write_bytes(b"image,caption\nred.png,red\nred.png,\"two\nlines \xff\"\nred.png,red\n")
    ds = _load(path)
    assert len(ds) == 2 and ds.skip_report.skipped == {"not UTF-8 text": 1}
    assert ds.skip_report.examples[0].startswith("data.csv:4: not UTF-8 text (byte 0xff in column 'caption'")


def test_non_utf8_lines_count_against_max_bad_fraction(folder):
    path = folder / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"caption": "\xe9"}\n')
    with pytest.raises(DataError, match=r"1 of 2 rows are bad .*data.jsonl:2: not UTF-8 text"):
        _load(path, max_bad_fraction=0.1)


def test_a_utf16_manifest_is_named_as_such(folder):
    path = folder / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n", encoding="utf-16")
    with pytest.raises(DataError, match="is UTF-16 text: save it as UTF-8"):
        _load(path)


def test_a_csv_field_over_the_size_limit_is_a_clear_error(folder):
    path = folder / "data.csv"
    path.write_text("image,caption\nred.png,red\nred.png," + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"data.csv:\d+: not readable as CSV \(field larger than field limit"):
        _load(path)


def test_a_non_utf8_speech_manifest_row_is_a_counted_skip(tmp_path):
    (tmp_path / "audio").mkdir()
    write_wav(tmp_path / "audio" / "a.wav", np.zeros(1600, np.float32), 16000)
    good = json.dumps({"audio": "audio/a.wav", "caption": "a red box"}).encode()
    path = tmp_path / "speech.jsonl"
    path.write_bytes(good + b"\n" + b'{"audio": "audio/a.wav", "caption": "\xe9"}\n' + good + b"\n")
    ds = SpeechManifest(path, max_bad_fraction=0.5)
    assert len(ds) == 2 and ds.skip_report.skipped == {"not UTF-8 text": 1}


# --- images with more than 8 bits, other modes ---

RAMP = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 … 65472: mean 127.4 in 8 bits


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_grey_is_rescaled_like_16_bit_colour(tmp_path, mode):
    grey = Image.fromarray(RAMP).convert(mode) if mode == "I" else Image.fromarray(RAMP)
    assert grey.mode == mode
    grey.save(tmp_path / "grey.tif")
    _png16(tmp_path / "rgb.png", np.stack([RAMP] * 3, -1), colour_type=2)  # PIL reads it as 8-bit RGB
    reference = load_image(tmp_path / "rgb.png", 16)
    assert abs(reference.mean() - 127.4) < 1
    assert np.array_equal(load_image(tmp_path / "grey.tif", 16), reference)


def test_16_bit_png_variants(tmp_path):
    opaque = np.full_like(RAMP, 65535)
    reference = load_image(_png16(tmp_path / "rgb.png", np.stack([RAMP] * 3, -1), 2), 16)
    for name, pixels, colour_type in [("grey", RAMP[..., None], 0), ("grey_alpha", np.stack([RAMP, opaque], -1), 4),
                                      ("rgba", np.stack([RAMP] * 3 + [opaque], -1), 6)]:
        assert np.array_equal(load_image(_png16(tmp_path / f"{name}.png", pixels, colour_type), 16), reference), name
    keyed = load_image(_png16(tmp_path / "keyed.png", RAMP[..., None], 0, trns=struct.pack(">H", 65472)), 32)
    assert (keyed[-1, -1] == 255).all() and (keyed[0, 0] == 0).all()  # the tRNS grey value is white after flattening


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "1"])
def test_8_bit_modes_keep_their_grey_levels(tmp_path, mode):
    grey = Image.fromarray((RAMP >> 8).astype(np.uint8))
    im = grey.convert(mode)
    im.save(tmp_path / ("x.tif" if mode == "CMYK" else "x.png"))
    got = load_image(tmp_path / ("x.tif" if mode == "CMYK" else "x.png"), 16)
    want = np.asarray(im.convert("RGB").resize((16, 16), Image.Resampling.BICUBIC))
    assert np.abs(got.astype(int) - want).max() <= 1


# --- PIL's size limit ---

def test_an_image_over_pils_size_limit_names_the_limit(folder):
    (folder / "huge.png").write_bytes(  # a 14000 × 14000 header (196 megapixels): PIL refuses it on opening
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 14000, 14000, 8, 0, 0, 0, 0))
        + _chunk(b"IEND", b""))
    ds = _load(_jsonl(folder, [{"image": "huge.png", "caption": "x"}, GOOD]))
    assert ds.skip_report.skipped == {"image too large": 1}
    assert ds.skip_report.examples == ["data.jsonl:1: image too large (196,000,000 pixels, over PIL's limit of "
                                       "178,956,970 (2 × PIL.Image.MAX_IMAGE_PIXELS, its guard against decompression "
                                       "bombs): shrink the image)"]


def test_a_lowered_pil_limit_is_the_one_named(folder, monkeypatch):
    Image.new("RGB", (10, 10)).save(folder / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # red.png: 400 pixels, over 2 × 100; small.png: 100
    ds = _load(_jsonl(folder, [GOOD, {"image": "small.png", "caption": "x"}]))
    assert len(ds) == 1 and ds.skip_report.skipped == {"image too large": 1}
    assert ds.skip_report.examples[0].startswith("data.jsonl:1: image too large (400 pixels, over PIL's limit of 200 ")


# --- image paths that are not local paths ---

def _skip_of(folder, image):
    ds = _load(_jsonl(folder, [{"image": image, "caption": "x"}, GOOD]))
    assert len(ds) == 1 and ds.skip_report.n_skipped == 1
    return ds.skip_report.examples[0].removeprefix("data.jsonl:1: ")


@pytest.mark.parametrize("url", ["https://example.com/a.png", "http://x/a.png", "s3://bucket/a.png"])
def test_urls_say_images_must_be_local(folder, url):
    assert _skip_of(folder, url) == (f"URL image ({url}: images must be local files, named relative to the "
                                     f"manifest's folder or absolute; download them first)")


def test_file_urls_are_read_as_paths(folder):
    rows = [{"image": (folder / "red.png").as_uri(), "caption": "x"},
            {"image": "file://localhost" + str(folder / "images" / "blue.png"), "caption": "x"}]
    ds = _load(_jsonl(folder, rows))
    assert len(ds) == 2 and ds.skip_report.n_skipped == 0
    skip = _skip_of(folder, "file://server/share/a.png")
    assert skip.startswith("URL image (file://server/share/a.png is on another host")


def test_tilde_is_the_home_folder(folder, monkeypatch):
    monkeypatch.setenv("HOME", str(folder / "images"))
    ds = _load(_jsonl(folder, [{"image": "~/blue.png", "caption": "x"}]))
    assert len(ds) == 1 and tuple(ds.images[0, 4, 4]) == (20, 30, 200)
    skip = _skip_of(folder, "~/gone.png")
    assert skip == f"missing image (no file {folder}/images/gone.png ('~' is the home folder))"


def test_a_folder_named_tilde_next_to_the_manifest_still_wins(folder, monkeypatch):
    monkeypatch.setenv("HOME", str(folder / "images"))
    (folder / "~").mkdir()
    Image.new("RGB", (20, 20), (0, 200, 0)).save(folder / "~" / "blue.png")
    assert tuple(_load(_jsonl(folder, [{"image": "~/blue.png", "caption": "x"}])).images[0, 4, 4]) == (0, 200, 0)


def test_windows_separators_are_read_as_slashes_and_said(folder):
    with pytest.warns(UserWarning, match=r"read 1 image path\(s\) with Windows '\\' separators as '/', "
                                         r"e.g. images\\blue.png → images/blue.png"):
        ds = _load(_jsonl(folder, [{"image": "images\\blue.png", "caption": "x"}, GOOD]))
    assert len(ds) == 2 and tuple(ds.images[0, 4, 4]) == (20, 30, 200)
    assert _skip_of(folder, "images\\gone.png") == "missing image (tried images/gone.png too: '\\' is read as '/')"


def test_windows_drive_paths_say_what_is_supported(folder):
    assert _skip_of(folder, "C:\\data\\a.png") == ("missing image (C:\\data\\a.png is a Windows drive path, not found "
                                                  "here; images must be local files, named relative to the "
                                                  "manifest's folder or absolute)")


def test_a_plain_missing_image_is_unchanged(folder):
    assert _skip_of(folder, "gone.png") == "missing image"
