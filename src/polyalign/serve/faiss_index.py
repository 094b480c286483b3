"""FAISS structures over unit embeddings (inner product = cosine): exact (``flat``), graph (``hnsw``) or compressed
inverted lists (``ivfpq``); the approximate ones are tuned at build time to a measured recall@10 against exact."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from polyalign.train.files import atomic_write

TARGET_RECALL = 0.95  # the search-time knob (efSearch, nprobe) grows until recall@10 reaches this, or its maximum
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024, 2048)
NPROBE = (4, 8, 16, 32, 64, 128, 256)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("the index needs faiss: pip install faiss-cpu") from None
    return faiss


def make_index(emb: np.ndarray, kind: str, hnsw_m: int = 32, ef_construction: int = 200):
    """A FAISS index of ``emb`` (N, E) float32 unit rows, inner-product metric."""
    faiss = _faiss()
    n, d = emb.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    elif kind == "ivfpq":
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # FAISS wants >= 39 training points per list
        m = next(k for k in (d // 8, d // 4, d // 2, d) if k >= 1 and d % k == 0)
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, 8 if n >= 256 * 39 else 4,
                                 faiss.METRIC_INNER_PRODUCT)
        sample = emb[np.random.default_rng(0).permutation(n)[: max(nlist * 64, 10_000)]]
        index.train(np.ascontiguousarray(sample))
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    index.add(np.ascontiguousarray(emb, dtype=np.float32))
    return index


def set_knob(index, kind: str, value: int) -> None:
    if kind == "hnsw":
        index.hnsw.efSearch = value
    elif kind == "ivfpq":
        index.nprobe = value


def recall_at_10(index, exact_ids: np.ndarray, queries: np.ndarray) -> float:
    """|approximate top-10 ∩ exact top-10| / 10, averaged over the queries."""
    _, ids = index.search(queries, exact_ids.shape[1])
    return float(np.mean([len(set(a) & set(b)) / exact_ids.shape[1] for a, b in zip(ids, exact_ids)]))


def build_faiss(emb: np.ndarray, kind: str, path: Path, queries: np.ndarray, hnsw_m: int = 32,
                ef_construction: int = 200) -> dict:
    """Build, tune (approximate kinds) and save ``path``; returns what it is: kind, knob, recall@10, timings."""
    faiss = _faiss()
    t0 = time.perf_counter()
    index = make_index(emb, kind, hnsw_m, ef_construction)
    info = {"kind": kind, "build_s": round(time.perf_counter() - t0, 2)}
    if kind != "flat" and len(queries):
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        exact = faiss.IndexFlatIP(emb.shape[1])
        exact.add(np.ascontiguousarray(emb, dtype=np.float32))
        _, exact_ids = exact.search(queries, min(10, len(emb)))
        knobs = EF_SEARCH if kind == "hnsw" else [p for p in NPROBE if p <= index.nlist] or [index.nlist]
        for value in knobs:
            set_knob(index, kind, value)
            recall = recall_at_10(index, exact_ids, queries)
            if recall >= TARGET_RECALL:
                break
        info |= {"ef_search" if kind == "hnsw" else "nprobe": value, "recall@10": round(recall, 4),
                 "recall_queries": len(queries), "target_recall": TARGET_RECALL}
        if kind == "hnsw":
            info |= {"hnsw_m": hnsw_m, "ef_construction": ef_construction}
    atomic_write(path, lambda p: faiss.write_index(index, str(p)))
    return info


def read_index(path: Path, info: dict):
    """A saved index with its tuned search knob set."""
    faiss = _faiss()
    # small query batches (the service's) as one matrix product, not one scan of the index per query: at 1M items
    # a batch of 8 takes 42 ms instead of 85 (benchmarks/results/search.md)
    faiss.cvar.distance_compute_blas_threshold = 1
    index = faiss.read_index(str(path))
    set_knob(index, info["kind"], info.get("ef_search") or info.get("nprobe") or 0)
    return index
