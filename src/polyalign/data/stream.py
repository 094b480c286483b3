"""Training samples streamed from tar shards (``data/shards.py``): an endless ``IterableDataset`` whose samples have
the form map-style datasets give (``image``, ``caption``, ``index``, ``labels``), so ``loader.Collator`` batches them.

Epoch e reads this rank's shards of ``iter_shards(seed, e, ...)``, split again across the DataLoader's workers.
Per-sample randomness (the caption chosen) derives from (sample_seed, epoch, index) as in ``data/base.py``.

**Exact resume.** A worker's stream is a fixed function of (seed, epoch, rank, worker, the shards), so its position
is two numbers: the epoch and how many samples of it were yielded. Every sample carries ``stream`` = (worker, epoch,
count); the collated batch keeps its last sample's (a batch comes from one worker), ``StreamTracker`` records the
position of each worker's last *consumed* batch, the checkpoint stores it, and a resumed stream (``resume``) starts
each worker at its epoch and skips the samples already trained on (re-reading them: exact, at the cost of the data
time those samples took). Batches prefetched but never consumed are simply made again. Not yet here: augmentation
and the intra-modal views.
"""
from __future__ import annotations

import torch

from polyalign.data.base import DistinctSkipReport, SkipReport, sample_rng, stable_hash
from polyalign.data.shards import INDEX, iter_shards, read_index, shard_paths
from polyalign.errors import DataError


class ShardStream(torch.utils.data.IterableDataset):
    """Endless samples of ``shards`` (a pattern with braces, a folder, ``shards.json`` or a list) for one rank, from
    epoch ``start_epoch`` on. ``label_names`` {field: classes} defaults to the ``shards.json`` beside the shards.
    Skipped samples are counted in ``skip_report`` (of this process: a DataLoader worker keeps its own)."""

    def __init__(self, shards, image_size: int = 48, seed: int = 0, buffer: int = 1000, rank: int = 0,
                 world: int = 1, label_names: dict[str, list[str]] | None = None, start_epoch: int = 0,
                 resume: dict[int, tuple[int, int]] | None = None):
        self.paths = shard_paths(shards)
        self.image_size, self.seed, self.buffer, self.rank, self.world = image_size, seed, buffer, rank, world
        self.start_epoch, self.sample_seed, self.skip_report = start_epoch, 0, DistinctSkipReport()
        self.resume = dict(resume or {})  # worker → (epoch, samples of it already consumed): see StreamTracker
        # the DataLoader hands out its workers' batches round-robin from worker 0: a resumed loader whose next batch
        # is (logical) worker k's lets DataLoader worker i play worker (i + k) mod n
        self.worker_offset = 0
        if label_names is None:
            index = self.paths[0].parent / INDEX
            label_names = read_index(index).get("label_names", {}) if index.is_file() else {}
        self.label_names = label_names
        self._class = {name: {c: k for k, c in enumerate(classes)} for name, classes in label_names.items()}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (worker + self.worker_offset) % n_workers
        if len(self.paths) < self.world * n_workers:  # a reader without shards would wait forever
            raise DataError(f"{len(self.paths)} shards cannot feed {self.world} rank(s) × {n_workers} worker(s): "
                            "write smaller shards (--shard-size) or use fewer data.num_workers")
        epoch, skip = self.resume.get(worker, (self.start_epoch, 0))
        while True:
            n = 0
            for s in iter_shards(self.paths, self.seed, epoch, self.rank, self.world, worker, n_workers,
                                 self.buffer, self.image_size, self.skip_report):
                n += 1
                if n > skip:  # with the worker's bad samples so far (rebuilt only when one more is met)
                    yield {**self._sample(s, epoch), "stream": (worker, epoch, n, self._skips())}
            skip = 0
            if n == 0:
                raise DataError(f"no usable samples in this reader's shards of epoch {epoch} "
                                f"(skipped: {dict(self.skip_report.skipped)})")
            epoch += 1

    def _skips(self) -> tuple:
        """(where, reason) of every distinct bad sample this reader met, and its first examples: a tuple rebuilt only
        when the report grew (a batch carries its last sample's)."""
        r = self.skip_report
        if getattr(self, "_skip_key", None) != (r.n_skipped, len(r.examples)):
            self._skip_key, self._skip_snapshot = (r.n_skipped, len(r.examples)), (tuple(sorted(r.seen.items())),
                                                                                     tuple(r.examples))
        return self._skip_snapshot

    def _sample(self, s: dict, epoch: int) -> dict:
        """A shard sample → the training sample of the dataset contract."""
        index = int(s["key"]) if s["key"].isdigit() else stable_hash(s["key"])
        caps = s["captions"]
        caption = caps[int(sample_rng(self.sample_seed, epoch, index).integers(len(caps)))]
        labels = {name: self._class[name][c] for name, c in s["labels"].items()
                  if c in self._class.get(name, {})}
        return {"image": s["image"], "caption": caption, "index": index, "labels": labels}

    def all_captions(self):
        """Every caption of every sample, in a fixed order (for training the BPE tokenizer); images are not decoded."""
        for s in iter_shards(self.paths, buffer=1, image_size=None, report=SkipReport()):
            yield from s["captions"]


class StreamTracker:
    """Wraps the iterator of a stream loader's batches: takes each batch's ``stream`` (worker, epoch, count) off it
    and keeps, per worker, the position of the last batch handed on, i.e. trained on (``state``, for the
    checkpoint; ``ShardStream(resume=...)`` continues from it)."""

    def __init__(self, batches, n_workers: int, state: dict | None = None):
        self.batches, self.n_workers = batches, n_workers
        self.positions, self.consumed = {}, 0  # consumed: batches handed on (whose worker comes next: consumed mod n)
        self.skips: dict[int, tuple] = {}  # worker → its bad samples so far (see ShardStream._skips)
        self.earlier: list = []  # bad samples the run met before it was resumed (the checkpoint's)
        self.handed, self._before = 0, None  # batches this tracker handed on; the fields before the last one
        if state and state.get("n_workers") == n_workers:  # continuing a resumed stream: its history counts
            self.positions = {int(w): tuple(p) for w, p in state["positions"].items()}
            self.consumed = int(state.get("consumed", 0))
        if state:
            saved = state.get("skips")
            self.earlier = [(tuple(map(tuple, saved[0])), tuple(saved[1]))] if saved else []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        worker, epoch, count, skips = batch.pop("stream")
        # an interrupt mid-step checkpoints the step before this batch: keep its fields (copies, no merging here)
        self._before = (dict(self.positions), self.consumed, dict(self.skips))
        self.skips[int(worker)] = skips
        self.positions[int(worker)] = (int(epoch), int(count))
        self.consumed += 1
        self.handed += 1
        return batch

    def state(self, handed: int | None = None) -> dict:
        """The position after the batches trained on; ``handed``: after that many of this tracker's batches (the
        loop's completed steps since it started: one fewer than handed on when a step was interrupted)."""
        positions, consumed, skips = self.positions, self.consumed, self.skips
        if handed is not None and handed == self.handed - 1 and self._before is not None:
            positions, consumed, skips = self._before
        return {"n_workers": self.n_workers, "consumed": consumed,
                "positions": {str(w): list(p) for w, p in positions.items()}, "skips": self._merged(skips)}

    def all_skips(self) -> list:
        """The bad samples of this run so far, the resumed checkpoint's with this process's readers', as one snapshot
        (``[[[where, reason], ...], [example, ...]]``: what ``merged_skips`` reads)."""
        return self._merged(self.skips)

    def _merged(self, skips: dict) -> list:
        merged = merged_skips(self.earlier + list(skips.values()))
        return [[[w, r] for w, r in sorted(merged.where.items())], list(merged.examples)]


def resume_stream(stream: ShardStream, state: dict | None, n_workers: int) -> bool:
    """Set ``stream`` to continue from a checkpoint's ``StreamTracker.state()``; False (nothing set) when there is
    none, or it was saved with another number of workers, whose streams were split otherwise."""
    if not state or state.get("n_workers") != n_workers:
        return False
    stream.resume = {int(w): (int(p[0]), int(p[1])) for w, p in state["positions"].items()}
    stream.worker_offset = int(state.get("consumed", 0)) % max(n_workers, 1)
    return True


def merged_skips(snapshots) -> SkipReport:
    """One report of the bad samples the readers met (each distinct sample once, whichever worker, rank or epoch
    read it): ``snapshots`` are ``StreamTracker.skips`` values, from every rank."""
    seen, examples = {}, []
    for where_reasons, ex in snapshots:
        seen.update(dict(where_reasons))
        examples += [e for e in ex if e not in examples]
    report = SkipReport(total=0, examples=examples[:5])
    for reason in seen.values():
        report.skipped[reason] = report.skipped.get(reason, 0) + 1
    report.where = seen  # (where → reason: what all_skips keeps)
    return report
