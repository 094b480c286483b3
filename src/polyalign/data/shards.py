"""Webdataset-style tar shards of a manifest, and the streaming reader over them (data bigger than memory).

Writing (``polyalign data shards``, ``write_shards``): every usable manifest row, checked as ``ManifestDataset``
checks it (captions, labels, tags, the image found and decodable), becomes two tar members, ``KEY.<png|jpg|...>``
(the image file's bytes, unchanged) and ``KEY.json`` (``captions``, ``labels`` {field: class name}, ``tags`` and the
row's other fields), in ``OUT/00000.tar, 00001.tar, ...`` of ``shard_size`` samples each. Each shard is written to a
temporary file and renamed; ``OUT/shards.json`` lists the shards with their sample counts, the label vocabulary and
the skipped rows.

Reading (``iter_shards``): the shards in a seeded order per epoch, split disjointly across ranks, then across each
rank's workers; each shard read one member at a time and its samples shuffled through a seeded buffer, so memory is
bounded by the buffer, not by the dataset. A sample whose json or image is bad is skipped and counted.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import ImageFile
from tqdm import tqdm

from polyalign.data.base import SkipReport
from polyalign.data.manifest import BadRow, parse_row, image_path, load_image, read_rows, string_list
from polyalign.errors import DataError

INDEX = "shards.json"
SHARD_NAME = re.compile(r"\d{5,}\.tar")
CHECK_SIZE = 32  # rows' images are decoded at this size to check them while writing
ROW_FIELDS = ("caption", "captions", "tags")  # read into the json's own fields, not copied as they are


def write_shards(manifest: str | Path, out: str | Path, shard_size: int = 1000,
                 label_fields: tuple[str, ...] = ("label",), show_progress: bool = True) -> dict:
    """Shard a manifest's usable rows into ``out``; returns the index written to ``out/shards.json``."""
    manifest, out, label_fields = Path(manifest), Path(out), tuple(label_fields)
    if not manifest.is_file():
        raise DataError(f"manifest not found: {manifest}")
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(manifest)
    report, writer = SkipReport(total=len(rows)), _ShardWriter(out, shard_size)
    classes: dict[str, set[str]] = {name: set() for name in label_fields}
    old_truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        for number, row in tqdm(rows, desc=f"sharding {manifest.name}", unit="row", disable=not show_progress):
            try:
                _, caps, labels, tags = parse_row(row, manifest.parent, CHECK_SIZE, label_fields, [])
                path = image_path(manifest.parent, row["image"].strip(), [])
                data = path.read_bytes()
            except BadRow as e:
                report.skip(e.reason, f"{manifest.name}:{number}", e.detail)
                continue
            except OSError as e:
                report.skip("unreadable image", f"{manifest.name}:{number}", str(e))
                continue
            meta = {k: v for k, v in row.items() if k not in ROW_FIELDS + label_fields}
            writer.add(image_ext(path), data, {**meta, "captions": caps, "labels": labels, "tags": tags})
            for name, c in labels.items():
                classes[name].add(c)
        shards = writer.close()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old_truncated
        writer.discard()  # a shard left unfinished by an error is not renamed into place
    if not shards:
        raise DataError(f"{manifest}: no usable rows. First bad rows: {'; '.join(report.examples)}")
    for stale in out.glob("*.tar"):  # numbered shards of an earlier, larger write
        if SHARD_NAME.fullmatch(stale.name) and stale.name not in {s["name"] for s in shards}:
            stale.unlink()
    index = {"manifest": str(manifest), "shard_size": shard_size, "samples": sum(s["samples"] for s in shards),
             "shards": shards, "label_fields": list(label_fields),
             "label_names": {name: sorted(c) for name, c in classes.items() if c},
             "skipped": {"total": report.total, "skipped": report.skipped, "examples": report.examples}}
    tmp = out / f"{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1, ensure_ascii=False))
    os.replace(tmp, out / INDEX)
    return index


def image_ext(path: Path) -> str:
    """The tar member extension of an image file: its suffix, lower case (``jpeg`` → ``jpg``)."""
    ext = path.suffix.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    return ext if ext.isalnum() and ext != "json" else "img"


class _ShardWriter:
    """Samples → ``00000.tar, 00001.tar, ...`` of ``shard_size`` samples; each written as ``.tmp`` and renamed."""

    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = out, shard_size
        self.shards: list[dict] = []
        self.tar, self.count, self.key = None, 0, 0

    def add(self, ext: str, image: bytes, meta: dict) -> None:
        if self.tar is None:
            self.name = f"{len(self.shards):05d}.tar"
            self.tmp = self.out / f"{self.name}.tmp"
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.GNU_FORMAT)
        key = f"{self.key:08d}"
        _add_member(self.tar, f"{key}.{ext}", image)
        _add_member(self.tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
        self.key, self.count = self.key + 1, self.count + 1
        if self.count == self.shard_size:
            self._finish()

    def _finish(self) -> None:
        self.tar.close()
        os.replace(self.tmp, self.out / self.name)
        self.shards.append({"name": self.name, "samples": self.count})
        self.tar, self.count = None, 0

    def discard(self) -> None:
        """Remove the unfinished shard's temporary file, if any."""
        if self.tar is not None:
            self.tar.close()
            self.tmp.unlink(missing_ok=True)
            self.tar = None

    def close(self) -> list[dict]:
        """Finish the last shard; the list of ``{"name", "samples"}``."""
        if self.tar is not None:
            self._finish()
        return self.shards


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed owner, mode and time: the same manifest gives the same bytes
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def expand_braces(pattern: str) -> list[str]:
    """``a/{00000..00002}.tar`` → ``a/00000.tar, a/00001.tar, a/00002.tar`` (zero padding kept); ``{x,y}`` → both."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, rest = pattern[:m.start()], m[1], expand_braces(pattern[m.end():])
    if r := re.fullmatch(r"(\d+)\.\.(\d+)", body):
        a, b = r[1], r[2]
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        step = 1 if int(b) >= int(a) else -1
        choices = [f"{i:0{width}d}" for i in range(int(a), int(b) + step, step)]
    else:
        choices = body.split(",")
    return [head + c + tail for c in choices for tail in rest]


def read_index(path: str | Path) -> dict:
    """The ``shards.json`` of a shard folder (or that file)."""
    path = Path(path)
    path = path / INDEX if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the shard index {path}: {e}") from e


def shard_paths(shards) -> list[Path]:
    """Shard files from a pattern with braces, a folder or ``shards.json`` (its listing), or a list of these."""
    paths = []
    for item in [shards] if isinstance(shards, (str, Path)) else list(shards):
        p = Path(item)
        if p.is_dir() or p.name == INDEX:
            folder = p if p.is_dir() else p.parent
            paths += [folder / s["name"] for s in read_index(p)["shards"]]
        else:
            paths += [Path(x) for x in expand_braces(str(item))]
    if not paths:
        raise DataError("no shards given")
    if missing := [p for p in paths if not p.is_file()]:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"shard not found: {missing[0]}{more}")
    return paths


def assigned_shards(paths: list[Path], seed: int, epoch: int, rank: int = 0, world: int = 1, worker: int = 0,
                    n_workers: int = 1) -> list[Path]:
    """This (rank, worker)'s shards of an epoch: a permutation drawn from (seed, epoch), dealt round-robin to ranks,
    then each rank's share to its workers. Over all ranks × workers each shard appears exactly once."""
    if not (0 <= rank < world and 0 <= worker < n_workers):
        raise ValueError(f"rank {rank} of {world}, worker {worker} of {n_workers}")
    order = np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0x5AAD]).permutation(len(paths))
    return [paths[i] for i in order[rank::world][worker::n_workers]]


def read_tar(path: Path, report: SkipReport) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of a shard, streamed member by member (a sample's members are
    adjacent, its key the member's base name up to the first dot). An unreadable or cut-short shard's rest (and the
    sample being read) is skipped and counted once ("unreadable shard")."""
    key, parts = None, {}
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                if k != key and key is not None:
                    yield key, parts
                    parts = {}
                data = tar.extractfile(member).read()
                if len(data) != member.size:  # a shard cut short inside a member
                    raise tarfile.ReadError(f"unexpected end of data in {member.name}")
                key, parts[ext.lower()] = k, data
            if tar.offset + 2 * tarfile.BLOCKSIZE > path.stat().st_size:  # no end-of-archive blocks: cut short
                raise tarfile.ReadError("unexpected end of data: the shard is cut short")
    except (tarfile.TarError, OSError, EOFError) as e:
        report.skip("unreadable shard", path.name, str(e), identity=str(path))
        return
    if key is not None:
        yield key, parts


def decode_sample(key: str, parts: dict[str, bytes], image_size: int | None) -> dict:
    """A shard sample → ``{"key", "image" (3, S, S) uint8 (the bytes when image_size is None), "captions",
    "labels" {field: class name}, "tags", "meta" (the whole json)}``, or BadRow with the manifest's reasons."""
    try:
        meta = json.loads(parts["json"])
    except (KeyError, ValueError):
        raise BadRow("bad row") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels", {}), dict):
        raise BadRow("bad row")
    caps = string_list(meta.get("captions") or [])
    if not caps:
        raise BadRow("empty caption")
    ext = next((e for e in parts if e != "json"), None)
    if ext is None:
        raise BadRow("missing image")
    image = parts[ext]
    if image_size is not None:
        image = torch.from_numpy(load_image(io.BytesIO(image), image_size).copy()).permute(2, 0, 1)
    return {"key": key, "image": image, "captions": caps, "labels": meta.get("labels") or {},
            "tags": string_list(meta.get("tags") or []), "meta": meta}


def iter_shards(shards, seed: int = 0, epoch: int = 0, rank: int = 0, world: int = 1, worker: int = 0,
                n_workers: int = 1, buffer: int = 1000, image_size: int | None = 48,
                report: SkipReport | None = None) -> Iterator[dict]:
    """One epoch of this (rank, worker)'s samples (``decode_sample``'s dicts, plus ``"shard"``), shuffled through a
    buffer of ``buffer`` samples drawn from (seed, epoch, rank, worker): the same arguments give the same order, and
    at most ``buffer`` + 1 samples are held. Bad samples are counted in ``report`` (``total`` counts samples read)."""
    if buffer < 1:
        raise DataError(f"the shuffle buffer must hold at least 1 sample, got {buffer}")
    report = SkipReport() if report is None else report
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, rank, worker, 0xB0F])
    pool: list[dict] = []
    for path in assigned_shards(shard_paths(shards), seed, epoch, rank, world, worker, n_workers):
        for key, parts in read_tar(path, report):
            report.total += 1
            old_truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
            try:
                sample = {**decode_sample(key, parts, image_size), "shard": path.name}
            except BadRow as e:
                report.skip(e.reason, f"{path.name}:{key}", e.detail, identity=f"{path}:{key}")
                continue
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = old_truncated
            if len(pool) < buffer:
                pool.append(sample)
                continue
            j = int(rng.integers(buffer))
            out, pool[j] = pool[j], sample
            yield out
    for j in rng.permutation(len(pool)):
        yield pool[j]
