"""MoCo's momentum (key) encoder and queue ("Momentum Contrast for Unsupervised Visual Representation Learning",
arXiv 1911.05722; v2: arXiv 2003.04297).

The key encoder is an exponential moving average of the query encoder and head; it never receives gradients.
Its parameters, the queue and the queue pointer are module state, so checkpoints carry them and a resumed run
continues exactly.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class MomentumEncoder(nn.Module):
    """EMA copy of ``encoder`` + ``head`` producing keys, and a FIFO queue of past keys (``queue_size``, dim)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, dim: int, queue_size: int, momentum: float,
                 shuffle_bn: bool = False):
        super().__init__()
        self.encoder, self.head = copy.deepcopy(encoder), copy.deepcopy(head)
        for p in self.parameters():
            p.requires_grad_(False)
        self.momentum, self.shuffle_bn = momentum, shuffle_bn  # shuffle_bn: the model's keys use other BN groups
        g = torch.Generator().manual_seed(0)  # the initial queue must not move the global RNG
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim, generator=g), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) → L2-normalised keys (B, dim), no graph."""
        return self.head(self.encoder(images))

    @torch.no_grad()
    def update(self, encoder: nn.Module, head: nn.Module) -> None:
        """key ← m·key + (1 - m)·query for parameters; buffers (BatchNorm statistics) are copied."""
        for src, dst in ((encoder, self.encoder), (head, self.head)):
            for q, k in zip(src.parameters(), dst.parameters()):
                k.lerp_(q.detach(), 1.0 - self.momentum)
            for q, k in zip(src.buffers(), dst.buffers()):
                k.copy_(q)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (N, dim) over the oldest entries (wrapping around)."""
        keys = keys.detach().to(self.queue.dtype)[-self.queue.shape[0]:]
        n, size, ptr = keys.shape[0], self.queue.shape[0], int(self.queue_ptr)
        idx = (ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys
        self.queue_ptr.fill_((ptr + n) % size)


class MomentumTower(nn.Module):
    """An EMA copy of a text tower and its head (MCT's momentum text encoder): ``forward(ids, mask)`` → normalised
    embeddings (B, dim) without a graph; ``update`` after each optimiser step."""

    def __init__(self, encoder: nn.Module, head: nn.Module, momentum: float):
        super().__init__()
        self.encoder, self.head, self.momentum = copy.deepcopy(encoder), copy.deepcopy(head), momentum
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(ids, mask), mask)

    @torch.no_grad()
    def update(self, encoder: nn.Module, head: nn.Module) -> None:
        ema_update(encoder, self.encoder, self.momentum)
        ema_update(head, self.head, self.momentum)


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher ← m·teacher + (1 − m)·student for parameters; buffers (BatchNorm statistics) are copied."""
    for s, t in zip(student.parameters(), teacher.parameters()):
        t.lerp_(s.detach(), 1.0 - momentum)
    for s, t in zip(student.buffers(), teacher.buffers()):
        t.copy_(s)


@torch.no_grad()
def enqueue(queues: list[torch.Tensor], ptr: torch.Tensor, rows: list[torch.Tensor]) -> None:
    """Write ``rows[i]`` (n, ...) over the oldest entries of ``queues[i]`` (Q, ...) from ``ptr``, wrapping around
    (only the last Q rows when n > Q); then advance ``ptr`` (a 0-d long buffer)."""
    size = queues[0].shape[0]
    if size == 0:
        return
    n = min(rows[0].shape[0], size)
    idx = (int(ptr) + torch.arange(n, device=queues[0].device)) % size
    for q, r in zip(queues, rows):
        q[idx] = r[-n:].detach().to(q.dtype)
    ptr.fill_((int(ptr) + n) % size)
