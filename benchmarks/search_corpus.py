"""The synthetic corpus of benchmarks/bench_search.py: clustered unit vectors around the run's text embeddings of
emoji captions, written in ``build_index``'s layout with a flat and an HNSW structure (see bench_search's doc)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from timing import load_avg, log


def parse_extras(spec: str) -> list[dict]:
    """``M:efC[:efmax],...`` → extra HNSW builds (other build parameters and a longer, monkeypatched EF_SEARCH ladder; labelled)."""
    out = []
    for item in filter(None, spec.split(",")):
        m, efc, *rest = (int(x) for x in item.split(":"))
        out.append({"kind": f"hnsw-M{m}-efC{efc}", "hnsw_m": m, "ef_construction": efc,
                    "ef_max": rest[0] if rest else 512})
    return out



def captions(manifest: Path) -> list[str]:
    seen: dict[str, None] = {}
    for line in manifest.read_text("utf-8").splitlines():
        for c in json.loads(line).get("captions", []):
            if c.strip():
                seen.setdefault(c.strip(), None)
    return list(seen)


def run_embed_dim(run: Path) -> int:
    import yaml

    return int(yaml.safe_load((run / "config.yaml").read_text())["model"]["embed_dim"])


def encode_cached(enc, texts: list[str], path: Path) -> np.ndarray:
    if path.is_file():
        got = np.load(path)
        if got.shape[0] == len(texts):
            return got
    t0 = time.perf_counter()
    emb = enc.encode("text", texts, numpy=True).astype(np.float32)
    log(f"encoded {len(texts)} captions in {time.perf_counter() - t0:.1f} s")
    np.save(path, emb)
    return emb


# ---------------------------------------------------------------- synthetic index

def make_items(centres: np.ndarray, n: int, noise: float, seed: int, chunk: int):
    """Yield (rows, cluster ids) chunks of n unit vectors: clustered, anisotropic noise (see the module doc)."""
    rng = np.random.default_rng(seed)
    c, e = centres.shape
    rot, _ = np.linalg.qr(rng.standard_normal((e, e)))
    lam = (np.arange(e) + 1.0) ** -0.75
    lam *= noise / np.sqrt((lam ** 2).sum())
    w = 1.0 / (np.arange(c) + 10.0)
    w /= w.sum()
    order = rng.permutation(c)  # which centre gets which popularity
    done = 0
    while done < n:
        m = min(chunk, n - done)
        which = order[rng.choice(c, size=m, p=w)]
        x = centres[which] + ((rng.standard_normal((m, e)) * lam) @ rot).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x.astype(np.float32), which
        done += m


def write_index(base: Path, n: int, centres: np.ndarray, names: list[str], queries: np.ndarray, args, run: Path,
                step: int, model: str) -> dict:
    """base/shards (shared), base/flat and base/hnsw (each: shards -> ../shards, image.faiss, info.json)."""
    from safetensors.numpy import save_file

    from polyalign.serve import faiss_index
    from polyalign.serve.faiss_index import build_faiss

    if base.exists():
        shutil.rmtree(base)
    (base / "shards").mkdir(parents=True)
    t0 = time.perf_counter()
    embs, n_shards = [], 0
    for s, (x, which) in enumerate(make_items(centres, n, args.noise, args.seed, args.shard_size)):
        lines = "".join(json.dumps({"id": f"syn-{s * args.shard_size + r:07d}", "caption": names[c],
                                    "captions": [names[c]], "path": None, "fields": {"cluster": int(c)}},
                                   ensure_ascii=False) + "\n" for r, c in enumerate(which))
        (base / "shards" / f"image-{s:05d}.jsonl").write_text(lines, encoding="utf-8")
        save_file({"embeddings": x}, str(base / "shards" / f"image-{s:05d}.safetensors"))
        embs.append(x)
        n_shards += 1
    emb = np.concatenate(embs)
    del embs
    gen_s = time.perf_counter() - t0
    log(f"{n}: wrote {n_shards} shards in {gen_s:.1f} s")
    builds = {}
    plans = [{"kind": "flat"}, {"kind": "hnsw"}] + parse_extras(args.hnsw_extra)
    for plan in plans:
        kind = plan["kind"]
        d = base / kind
        d.mkdir()
        (d / "shards").symlink_to("../shards")
        saved = faiss_index.EF_SEARCH
        params = {k: plan[k] for k in ("hnsw_m", "ef_construction") if k in plan}  # extra builds: other params
        if "ef_max" in plan:  # MONKEYPATCH (labelled in the results): a longer efSearch ladder
            faiss_index.EF_SEARCH = tuple(16 * 2 ** i for i in range(16) if 16 * 2 ** i <= plan["ef_max"])
        t0 = time.perf_counter()
        try:
            entry = build_faiss(emb, "hnsw" if kind.startswith("hnsw") else kind, d / "image.faiss", queries, **params)
        finally:
            wall = time.perf_counter() - t0
            if params:
                entry["monkeypatched"] = {**params, "EF_SEARCH": list(faiss_index.EF_SEARCH)}
            faiss_index.EF_SEARCH = saved
        if kind.startswith("hnsw"):
            entry["ladder"] = list(entry.get("monkeypatched", {}).get("EF_SEARCH", faiss_index.EF_SEARCH))
        info = {"run": str(run), "step": step, "source": "synthetic",
                "path": f"clustered unit vectors: {len(centres)} caption centres, noise {args.noise}, seed {args.seed}",
                "id_field": "", "shard_size": args.shard_size, "kind": kind,
                "parts": {"image": {"items": n, "dim": int(emb.shape[1]), "shards": n_shards, **entry}},
                "skipped": {}, "model": model, "elapsed_s": round(wall, 2)}
        (d / "info.json").write_text(json.dumps(info, indent=2))
        builds[kind] = {**entry, "build_and_tune_s": round(wall, 2), "load": load_avg()}
        log(f"{n}: built {kind} in {entry['build_s']} s (with tuning {wall:.1f} s): {entry}")
    return {"emb": emb, "generate_s": round(gen_s, 2), "builds": builds, "shards": n_shards}
