"""``polyalign index``: embed a source in shards and build a FAISS index of each part.

An index folder::

    IDX/job.json                       what is being indexed (a rerun with the same job resumes; another is refused)
    IDX/shards/<part>-00000.jsonl      one metadata row per item (id, caption(s), picture, fields)
    IDX/shards/<part>-00000.safetensors  its embeddings (n, E) float32, L2-normalised; written last: the shard is done
    IDX/thumbs/<n>.png                 pictures of items that have no file (a split of the run's data)
    IDX/<part>.faiss, IDX/info.json    the search structures and what they are (kind, counts, measured recall@10)

Parts: the run's item tower (``image``, ``audio`` or ``points``) and ``text``, the distinct captions of the items
(each pointing at the first item that has it). Under ``torchrun`` rank r embeds shards r, r + W, ...; rank 0 then
builds the FAISS structures. A killed job resumes from its last finished shard.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from polyalign.errors import ConfigError, PolyalignError
from polyalign.serve.faiss_index import build_faiss
from polyalign.train.files import atomic_write, write_json

KINDS = ("flat", "hnsw", "ivfpq")


def shard_name(part: str, s: int) -> str:
    return f"{part}-{s:05d}"


def _start_job(out: Path, job: dict) -> None:
    """Create ``out`` for ``job``, or check that it holds the same job (resume); never touch another folder's files."""
    path = out / "job.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != job:
            diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
            raise PolyalignError(f"{out} holds an index of another job (differs in {', '.join(diff)}): pass another "
                                 f"--out, or delete {out} to rebuild it")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PolyalignError(f"{out} exists and is not a polyalign index (no job.json): pass another --out")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    write_json(out / "job.json", job)


def _done(out: Path, name: str) -> bool:
    return (out / "shards" / f"{name}.safetensors").is_file() and (out / "shards" / f"{name}.jsonl").is_file()


def _write_shard(out: Path, name: str, emb: torch.Tensor, meta: list[dict]) -> None:
    from safetensors.torch import save_file

    lines = "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in meta)
    atomic_write(out / "shards" / f"{name}.jsonl", lambda p: p.write_text(lines, encoding="utf-8"))
    emb = torch.nn.functional.normalize(emb.float(), dim=-1).contiguous()
    atomic_write(out / "shards" / f"{name}.safetensors", lambda p: save_file({"embeddings": emb}, str(p)))


def read_part(out: Path, part: str, n_shards: int) -> tuple[np.ndarray, list[dict]]:
    """All shards of a part in order: embeddings (N, E) float32 and metadata rows."""
    from safetensors.numpy import load_file

    embs = [load_file(str(out / "shards" / f"{shard_name(part, s)}.safetensors"))["embeddings"] for s in range(n_shards)]
    embs = [e for e in embs if e.size]  # a shard whose rows were all skipped holds (0, 0)
    return (np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)), read_part_meta(out, part, n_shards)


def _embed_items(encoder, source, part: str, rows, out: Path) -> tuple[torch.Tensor, list[dict], dict]:
    """Decode and embed one shard's rows (bad ones skipped and counted)."""
    from PIL import Image

    from polyalign.data.manifest import BadRow

    items, meta, skipped = [], [], {}
    for row in rows:
        try:
            item = source.load(row)
        except BadRow as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            continue
        m = row.meta()
        if part == "image" and row.path is None:  # no file to show: keep a thumbnail
            thumb = out / "thumbs" / f"{row.index}.png"
            thumb.parent.mkdir(exist_ok=True)
            atomic_write(thumb, lambda p, a=item: Image.fromarray(np.asarray(a)).save(p, format="PNG"))
            m["thumb"] = f"thumbs/{row.index}.png"
        items.append(torch.from_numpy(np.array(item)).permute(2, 0, 1) if part == "image" else item)
        meta.append(m)
    if not items:
        return torch.zeros(0, 0), meta, skipped
    return encoder.encode(part, items), meta, skipped


def build_index(run_dir, out_dir, *, manifest: str = "", folder: str = "", split: str = "", id_field: str = "",
                kind: str = "flat", shard_size: int = 4096, which: str = "auto", texts: bool = True,
                recall_queries: int = 1000) -> dict:
    """Embed the source (one of ``manifest``, ``folder``, ``split``) with the run's towers into ``out_dir``; returns
    the index's info (also ``IDX/info.json``)."""
    from polyalign import distributed as dist
    from polyalign.serve.loader import load
    from polyalign.serve.sources import folder_source, manifest_source, split_source

    if sum(bool(x) for x in (manifest, folder, split)) != 1:
        raise ConfigError("name exactly one source: --manifest, --folder or --split")
    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    t0, out = time.time(), Path(out_dir)
    device = dist.init_from_env()
    enc = load(run_dir, which, device)
    part = enc.modalities[0]
    if folder or manifest:
        if part != "image":
            raise ConfigError(f"--manifest/--folder index images; the run's item tower is {part}: use --split")
        size = enc.config.data.image_size
        source = manifest_source(manifest, size, id_field) if manifest else folder_source(folder, size)
    else:
        source = split_source(enc.config, split, part)
    job = {"run": str(Path(run_dir).absolute()), "step": enc.step, "source": source.kind,
           "path": source.describe, "id_field": id_field, "shard_size": shard_size, "parts": [part] + ["text"] * texts}
    if dist.is_main():
        _start_job(out, job)
    dist.barrier()
    n_shards = -(-len(source.rows) // shard_size)
    skipped = _embed_part(enc, source, part, out, n_shards, shard_size, dist)
    dist.barrier()
    counts = {part: n_shards}
    if texts and "text" in enc.modalities:
        counts["text"] = _embed_texts(enc, out, part, n_shards, shard_size, dist)
        dist.barrier()
        if not counts["text"]:  # the items have no captions
            del counts["text"]
    if not dist.is_main():
        return {}
    info = {**job, "kind": kind, "parts": {}, "skipped": skipped, "model": repr(enc)}
    parts = {name: read_part(out, name, shards) for name, shards in counts.items()}  # each read once
    for name, (emb, meta) in parts.items():
        if not len(meta):
            raise PolyalignError(f"no {name} items could be indexed (skipped: {skipped})")
        # recall queries: the other part's embeddings (cross-modal, as searched), else the part's own
        other = next((parts[p][0] for p in parts if p != name), emb)
        queries = other[:: max(1, len(other) // recall_queries)][:recall_queries]
        info["parts"][name] = {"items": len(meta), "dim": int(emb.shape[1]), "shards": counts[name],
                               **build_faiss(emb, kind, out / f"{name}.faiss", queries)}
    info["elapsed_s"] = round(time.time() - t0, 2)
    write_json(out / "info.json", info)
    return info


def _embed_part(enc, source, part: str, out: Path, n_shards: int, shard_size: int, dist) -> dict:
    """This rank's shards of the item part (finished ones skipped); returns the rows skipped by reason."""
    skipped = dict(source.skipped)
    mine = [s for s in range(dist.rank(), n_shards, dist.world_size())]
    todo = [s for s in mine if not _done(out, shard_name(part, s))]
    if len(todo) < len(mine):
        print(f"resuming: {len(mine) - len(todo)} of {len(mine)} {part} shards already done")
    bar = tqdm(total=sum(min(shard_size, len(source.rows) - s * shard_size) for s in todo), desc=f"index {part}",
               unit="item", disable=None)
    for s in todo:
        rows = source.rows[s * shard_size : (s + 1) * shard_size]
        emb, meta, bad = _embed_items(enc, source, part, rows, out)
        for reason, n in bad.items():
            skipped[reason] = skipped.get(reason, 0) + n
        _write_shard(out, shard_name(part, s), emb, meta)
        bar.update(len(rows))
    bar.close()
    return skipped


def _embed_texts(enc, out: Path, part: str, n_item_shards: int, shard_size: int, dist) -> int:
    """The distinct captions of the indexed items, in shards like the items'; returns the number of text shards."""
    meta = read_part_meta(out, part, n_item_shards)
    first: dict[str, str] = {}
    for m in meta:
        for c in m["captions"]:
            first.setdefault(c, m["id"])
    texts = list(first)
    n_shards = -(-len(texts) // shard_size)
    for s in tqdm(range(dist.rank(), n_shards, dist.world_size()), desc="index text", unit="shard", disable=None):
        if _done(out, shard_name("text", s)):
            continue
        chunk = texts[s * shard_size : (s + 1) * shard_size]
        rows = [{"id": first[t], "caption": t, "captions": [t], "path": None, "fields": {}} for t in chunk]
        _write_shard(out, shard_name("text", s), enc.encode_text(chunk), rows)
    return n_shards


def read_part_meta(out: Path, part: str, n_shards: int) -> list[dict]:
    """The metadata rows of a part's shards, in order."""
    meta = []
    for s in range(n_shards):
        meta += [json.loads(x) for x in (out / "shards" / f"{shard_name(part, s)}.jsonl").read_text("utf-8").splitlines()]
    return meta
