"""Search an index (``polyalign index``): text, an image, or an indexed item ("more like this") → ranked items.

Queries from many threads (the HTTP service's) are safe: they are queued, and one worker thread takes whatever is
waiting, encodes it as one batch and searches it as one batch (a FAISS search of B queries costs little more than
one: it streams the index once)."""
from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polyalign.errors import DataError, PolyalignError
from polyalign.serve.faiss_index import read_index

MAX_K = 100
BACKENDS = ("faiss", "torch")


@dataclass
class Hit:
    rank: int  # 1 = best
    id: str
    score: float
    caption: str
    row: int  # position in its part


class Part:
    """One searchable part of an index (its items' metadata, embeddings and FAISS structure)."""

    def __init__(self, root: Path, name: str, info: dict, backend: str):
        from polyalign.serve.index import read_part

        self.name, self.info = name, info
        self.emb, self.meta = read_part(root, name, info["shards"])  # (N, E) float32, [row dicts]
        self.backend = backend
        self.index = read_index(root / f"{name}.faiss", info) if backend == "faiss" else None
        self.torch_emb = None
        if backend == "torch":
            import torch

            self.torch_emb = torch.from_numpy(self.emb)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) scores and row numbers, best first."""
        k = min(k, len(self.meta))
        if self.backend == "faiss":
            return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        import torch

        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))  # (B, E)
        s, i = torch.topk((self.torch_emb @ q.T).T, k, dim=1)  # items × queries: 2.3× faster than q @ items.T
        return s.numpy(), i.numpy()


class Searcher:
    """An index and its run's encoder: ``search(text=... | image=... | like=ID, k, target)`` → [Hit]."""

    def __init__(self, index_dir, run_dir=None, device: str = "cpu", backend: str = "faiss", encoder=None):
        root = Path(index_dir)
        if not (root / "info.json").is_file():
            raise PolyalignError(f"{root} is not a finished polyalign index (no info.json): build it with "
                                 f"`polyalign index RUN --out {root} ...`")
        if backend not in BACKENDS:
            raise PolyalignError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.root, self.info = root, json.loads((root / "info.json").read_text())
        self.parts = {name: Part(root, name, p, backend) for name, p in self.info["parts"].items()}
        self.item_part = next(iter(self.parts))
        self.by_id = {m["id"]: n for n, m in enumerate(self.parts[self.item_part].meta)}
        self._encoder, self._run, self._device = encoder, run_dir or self.info["run"], device
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the worker's start

    @property
    def encoder(self):
        """The run's encoder, loaded on first use."""
        if self._encoder is None:
            from polyalign.serve.loader import load

            self._encoder = load(self._run, "auto", self._device)
        return self._encoder

    def item(self, item_id: str) -> dict:
        """The metadata of an indexed item; ``KeyError`` if unknown."""
        return self.parts[self.item_part].meta[self.by_id[item_id]]

    def check(self, k: int, target: str) -> str:
        if not 1 <= k <= MAX_K:
            raise DataError(f"k must be between 1 and {MAX_K}, got {k}")
        target = target or self.item_part
        if target not in self.parts:
            raise DataError(f"target must be one of {', '.join(self.parts)}, got {target!r}")
        return target

    def search(self, text: str | None = None, image=None, like: str | None = None, k: int = 10,
               target: str = "") -> list[Hit]:
        """Ranked hits in part ``target`` (default: the items) for one query: text, an image, or an item's id."""
        target = self.check(k, target)
        if sum(x is not None for x in (text, image, like)) != 1:
            raise DataError("give exactly one query: text, image or like")
        if text is not None and not text.strip():
            raise DataError("the text query is empty")
        if like is not None:
            if like not in self.by_id:
                raise KeyError(like)
            job = ("vector", self.parts[self.item_part].emb[self.by_id[like]])
        elif text is not None:
            job = ("text", text)
        else:  # decoded here, in the caller's thread: a bad image fails its own request only
            job = ("image", self.encoder.preprocess(image))
        return self._submit(job, k, target)

    def _submit(self, job: tuple, k: int, target: str) -> list[Hit]:
        done, box = threading.Event(), {}
        self._queue.put((job, k, target, done, box))
        self._ensure_worker()
        done.wait()
        if "error" in box:
            raise box["error"]
        part = self.parts[target]
        return [Hit(r + 1, part.meta[i]["id"], float(s), part.meta[i]["caption"], int(i))
                for r, (s, i) in enumerate(zip(*box["result"])) if i >= 0]

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, daemon=True, name="polyalign-search")
                self._worker.start()

    def _work(self) -> None:
        while True:
            jobs = [self._queue.get()]
            while True:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._run_batch(jobs)
            except Exception as e:  # noqa: BLE001 - handed to the waiting callers, raised there
                for job in jobs:
                    job[4].setdefault("error", e)
            for job in jobs:
                job[3].set()

    def _run_batch(self, jobs: list) -> None:
        """Encode every waiting text as one batch and every image as one, then search each (target, k) group as one
        batch."""
        import torch

        vectors: list = [None] * len(jobs)
        for kind in ("text", "image"):
            mine = [n for n, j in enumerate(jobs) if j[0][0] == kind]
            if mine:
                values = [jobs[n][0][1] for n in mine]
                batch = torch.stack(values) if kind == "image" else values
                emb = self.encoder.encode(kind, batch, numpy=True)
                for n, e in zip(mine, emb):
                    vectors[n] = e
        for n, j in enumerate(jobs):
            if j[0][0] == "vector":
                vectors[n] = j[0][1]
        groups: dict = {}
        for n, j in enumerate(jobs):
            groups.setdefault((j[2], j[1]), []).append(n)
        for (target, k), members in groups.items():
            scores, rows = self.parts[target].search(np.stack([vectors[n] for n in members]), k)
            for r, n in enumerate(members):
                jobs[n][4]["result"] = (scores[r], rows[r])
