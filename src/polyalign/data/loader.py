"""All batch preparation: a resumable global-batch sampler, the collate that tokenises captions, the move of a
batch to the device (``to_model_inputs``), and the inputs of dataset items for inference (``item_inputs``)."""
from __future__ import annotations

import torch

from polyalign.errors import DataError
from polyalign.data.audio import pad_audio


class GlobalBatchSampler:
    """Yields, for steps ``start_step, start_step + 1, ...``, this rank's share of the global batch.

    The global batch at a step depends only on (seed, step): epoch e is a permutation drawn from seed and e,
    cut into ``len // batch_size`` batches (the remainder is dropped). Keys are ``(epoch, index)`` pairs so the
    dataset derives per-sample randomness from them. Resuming = constructing with the step to start at.

    ``items`` (optional): the dataset indices batches are drawn from (all ``n`` when None), e.g. only the captioned
    items of a low-label run (``data.captioned_only``); the permutation is then over those.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1,
                 items=None):
        self.items = None if items is None else torch.as_tensor(items, dtype=torch.long)
        if self.items is not None:
            n = len(self.items)
        if batch_size > n:
            what = "the training items drawn from" if self.items is not None else "the training set"
            raise DataError(f"train.batch_size ({batch_size}) is larger than {what} ({n} items)")
        if batch_size % world_size:
            raise DataError(f"train.batch_size ({batch_size}) is not divisible by the world size ({world_size})")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n // batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        return perm if self.items is None else self.items[perm]

    def __iter__(self):
        step, epoch, perm = self.start_step, -1, None
        local = self.batch_size // self.world_size
        while True:
            e, k = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            batch = perm[k * self.batch_size + self.rank * local: k * self.batch_size + (self.rank + 1) * local]
            yield [(epoch, int(i)) for i in batch]
            step += 1


class MixedBatchSampler:
    """Every global batch of ``batch_size`` rows holds ``k`` rows of group ``a`` and the rest of group ``b`` (the
    low-label regime's ``data.captioned_share``: a fixed share of captioned items, the rest captionless), each group
    drawn by its own :class:`GlobalBatchSampler` (its own epochs), the rows shuffled by (seed, step) before each rank
    takes its slice. Depends only on (seed, step): resuming = constructing with the step to start at."""

    def __init__(self, a, b, k: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not 0 < k < batch_size:
            raise DataError(f"a mixed batch needs 0 < k < train.batch_size rows of the first group, got k={k}")
        if batch_size % world_size:
            raise DataError(f"train.batch_size ({batch_size}) is not divisible by the world size ({world_size})")
        self.a = GlobalBatchSampler(len(a), k, seed, start_step, items=a)
        self.b = GlobalBatchSampler(len(b), batch_size - k, seed + 7_919, start_step, items=b)
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        local, step = self.batch_size // self.world_size, self.start_step
        for rows_a, rows_b in zip(self.a, self.b):
            rows = rows_a + rows_b
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + step))
            yield [rows[int(j)] for j in order[self.rank * local:(self.rank + 1) * local]]
            step += 1


class Collator:
    """Samples → batch dict with whatever modalities the samples carry: ``image`` uint8 (B, 3, H, W); ``text``
    (B, L) + ``text_mask`` (B, L) from the captions; ``audio`` float (B, T) zero-padded + ``audio_mask`` (B, T), True
    on real samples; ``points`` (B, N, 3); always ``index`` (B,). With views: ``image_view2`` (and, with ``data.intra_augment``,
    ``image_view1``) uint8 (B, 3, H, W), ``text_view2``/``text_view2_mask`` (B, L), ``tags`` (B, T); with
    ``data.caption_fraction`` < 1, ``captioned`` bool (B,): the rows whose caption and tags the inter terms see."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        first = samples[0]
        batch = {"index": torch.tensor([s["index"] for s in samples])}
        for key in ("image", "image_view1", "image_view2", "points", "tags"):  # fixed-size tensors
            if key in first:
                batch[key] = torch.stack([s[key] for s in samples])
        if "captioned" in first:
            batch["captioned"] = torch.tensor([s["captioned"] for s in samples], dtype=torch.bool)
        if "caption" in first:
            batch["text"], batch["text_mask"] = self.tokenizer([s["caption"] for s in samples])
        if "caption_view2" in first:
            batch["text_view2"], batch["text_view2_mask"] = self.tokenizer([s["caption_view2"] for s in samples])
        if "stream" in first:  # a streamed batch (one worker's): the position of its last sample (data/stream.py)
            batch["stream"] = samples[-1]["stream"]
        if "audio" in first:  # clips of different lengths
            batch["audio"], batch["audio_mask"] = pad_audio([s["audio"] for s in samples])
        return batch


def _data_loader(data, tokenizer, num_workers: int, **how) -> torch.utils.data.DataLoader:
    """The collating, pinning and prefetching every training loader shares; ``how`` says how batches are drawn."""
    return torch.utils.data.DataLoader(data, collate_fn=Collator(tokenizer), num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),  # lets the copy to the GPU overlap
                                       prefetch_factor=4 if num_workers else None, **how)


def make_loader(dataset, tokenizer, batch_size: int, seed: int, start_step: int, num_workers: int,
                rank: int = 0, world_size: int = 1, items=None, mix=None) -> torch.utils.data.DataLoader:
    """An endless loader of this rank's batches from ``start_step`` on, drawn from ``items`` when given, or with
    ``mix = (group_a, group_b, k)``: k rows of group a in every global batch (:class:`MixedBatchSampler`)."""
    sampler = (GlobalBatchSampler(len(dataset), batch_size, seed, start_step, rank, world_size, items) if mix is None
               else MixedBatchSampler(*mix, batch_size, seed, start_step, rank, world_size))
    return _data_loader(dataset, tokenizer, num_workers, batch_sampler=sampler, persistent_workers=False,
                        generator=torch.Generator().manual_seed(seed))  # keep the global RNG untouched


def make_stream_loader(stream, tokenizer, batch_size: int, num_workers: int,
                       world_size: int = 1) -> torch.utils.data.DataLoader:
    """An endless loader of this rank's batches (``batch_size // world_size`` samples) from a ``stream.ShardStream``;
    each batch comes from one worker's shards."""
    if batch_size % world_size:
        raise DataError(f"train.batch_size ({batch_size}) is not divisible by the world size ({world_size})")
    return _data_loader(stream, tokenizer, num_workers, batch_size=batch_size // world_size, drop_last=True,
                        generator=torch.Generator().manual_seed(0))  # the workers' seeds: not from the global RNG,
    # whose state a resumed run restores first (a draw from it would shift the dropout stream after a resume)


def to_model_inputs(batch: dict, device: torch.device | str = "cpu") -> dict:
    """Tensors to the device; uint8 pixels → float in [0, 1] (once per batch, not per sample in the loader)."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    pixels = {k: batch[k].float().div_(255.0) for k in ("image", "image_view1", "image_view2") if k in batch}
    return {**batch, **pixels}


def item_inputs(dataset, modality: str, indices: list[int], device) -> tuple[torch.Tensor, ...]:
    """The model inputs of items ``indices``: image → pixels (B, 3, H, W) in [0, 1] (the dataset's ``image(i)``);
    audio → waveforms (B, T) + sample mask (B, T) (``waveform(i)``); points → clouds (B, N, 3) (``points(i)``)."""
    if modality == "image":
        return (torch.stack([dataset.image(i) for i in indices]).to(device).float() / 255,)
    if modality == "audio":
        return tuple(x.to(device) for x in pad_audio([dataset.waveform(i) for i in indices]))
    if modality == "points":
        return (torch.stack([dataset.points(i) for i in indices]).to(device),)
    raise ValueError(f"cannot embed dataset items of modality {modality!r} (image | audio | points)")
