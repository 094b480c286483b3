"""Process-group facts and collectives in one place (a single process unless launched by torchrun).

Losses stay pure functions: the trainer gathers embeddings here and hands the gathered tensors to them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import signal
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from polyalign.errors import PolyalignError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> torch.device:
    """Join the process group torchrun describes (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``): NCCL on GPU, gloo on CPU.

    Returns this process's device. Without torchrun's variables (or with one process) nothing is initialised.
    ``POLYALIGN_DIST_TIMEOUT_S`` (seconds) bounds how long a rank waits in a collective before it fails with an
    error naming it (torch's default otherwise: 30 min on gloo, 10 min on NCCL).
    """
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        _die_with_launcher()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **_timeout_from_env())
    return device


def _timeout_from_env() -> dict:
    raw = os.environ.get("POLYALIGN_DIST_TIMEOUT_S", "").strip()
    if not raw:
        return {}
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not seconds > 0:
        raise PolyalignError(f"POLYALIGN_DIST_TIMEOUT_S must be a positive number of seconds, got {raw!r}")
    return {"timeout": datetime.timedelta(seconds=seconds)}


def _die_with_launcher() -> None:
    """Under torchrun, end this worker when its launcher dies (Linux).

    torchrun starts each worker in its own session, so a SIGKILL of torchrun (an OOM kill, ``kill -9``) leaves the
    workers training on as orphans, still writing log rows and checkpoints into the run directory while the user
    resumes it. A parent-death signal makes a killed launcher a killed run, which ``--resume`` continues exactly.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    launcher = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return  # no prctl (unusual libc): keep torchrun's own behaviour
    if os.getppid() != launcher:  # the launcher died before the signal was armed
        os._exit(1)


def shutdown() -> None:
    """Leave the process group together with the other ranks (gloo can abort a rank whose peer is still busy)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's (b, ...) tensor into (W·b, ...); the gradient of each rank's slice is the sum of
    all ranks' gradients for it (each rank's loss depends on every slice)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.b = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[rank() * ctx.b : (rank() + 1) * ctx.b]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) on each rank → (world·b, ...) in rank order, differentiable; identity in a single process."""
    return _AllGather.apply(x) if world_size() > 1 else x


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable; identity in a single process."""
    return _AllReduceSum.apply(x) if world_size() > 1 else x


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """A detached value averaged over ranks (for logging and finiteness checks)."""
    if world_size() == 1:
        return x.detach()
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


_BN_GROUPS: list = [None]  # (row group ids (R,), number of groups) while inside ``batch_norm_groups``


@contextlib.contextmanager
def batch_norm_groups(groups: torch.Tensor, n_groups: int):
    """Inside, every ``GlobalBatchNorm2d`` in training normalises local row r with the statistics of the rows, on
    every rank, of group ``groups[r]`` (< ``n_groups``, the same on all ranks): MoCo's shuffle-BN ("Momentum Contrast
    for Unsupervised Visual Representation Learning", arXiv 1911.05722) without moving samples between processes."""
    before, _BN_GROUPS[0] = _BN_GROUPS[0], (groups, n_groups)
    try:
        yield
    finally:
        _BN_GROUPS[0] = before


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch (summed over ranks), so a W-process run
    normalises exactly as one process with the whole batch. Works with gloo on CPU (torch's SyncBatchNorm is
    GPU-only). In a single process or in eval mode it is plain BatchNorm; inside ``batch_norm_groups`` the
    statistics are per group of rows (the running statistics still follow the whole batch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = _BN_GROUPS[0]
        if not self.training or (world_size() == 1 and grouped is None):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        ids, g = grouped if grouped is not None else (torch.zeros(x.shape[0], dtype=torch.long, device=x.device), 1)
        onehot = F.one_hot(ids.to(x.device), g).float().T  # (G, R)
        count = onehot.sum(1, keepdim=True) * (x[0, 0].numel() if x.shape[0] else 1)  # (G, 1) values per channel
        stats = all_reduce_sum_with_grad(torch.cat([onehot @ xf.sum((2, 3)), onehot @ (xf * xf).sum((2, 3)), count], 1))
        total = stats.sum(0)
        n, nt = stats[:, -1:].clamp_min(1.0), total[-1]
        mean, var = stats[:, :c] / n, (stats[:, c : 2 * c] / n - (stats[:, :c] / n) ** 2).clamp_min(0)  # biased
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            mt = total[:c] / nt
            self.running_mean.lerp_(mt, m)
            self.running_var.lerp_((total[c : 2 * c] / nt - mt * mt).clamp_min(0) * nt / max(float(nt) - 1, 1.0), m)
            self.num_batches_tracked += 1
        mean, var = mean[ids][:, :, None, None], var[ids][:, :, None, None]  # (R, C, 1, 1): each row's group
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def gather_embeddings(out):
    """A model output (``polyalign.models.outputs``) with ``gathered`` = the same output holding every rank's rows of
    its per-sample embedding fields (differentiable, rank order) and ``rank_offset`` = the global index of this
    rank's first row; a new object, the input is not changed. Unchanged in a single process."""
    if world_size() == 1:
        return out
    names = out.gather_fields()
    rows = {name: all_gather_with_grad(getattr(out, name)) for name in names}
    return dataclasses.replace(out, gathered=dataclasses.replace(out, **rows),
                               rank_offset=rank() * getattr(out, names[0]).shape[0])


def gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order (a collective under DDP; ``[obj]`` in one process)."""
    if world_size() == 1:
        return [obj]
    objs = [None] * world_size()
    dist.all_gather_object(objs, obj)
    return objs
