"""The fit loop, top to bottom: lr → forward → loss → backward → clip → step → after-step → log → checkpoint.

Everything it runs on is built beforehand (``polyalign.app.training`` sets a run up) and handed in as a
:class:`Job`: the loop knows no dataset, recipe or model family.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from polyalign import distributed as dist
from polyalign.config import TrainConfig
from polyalign.data.loader import to_model_inputs
from polyalign.errors import Interrupted, TrainingError
from polyalign.losses.objective import Objective
from polyalign.models.interface import Model
from polyalign.train.amp import autocast
from polyalign.train.checkpoint import find_checkpoint, rng_state
from polyalign.train.gradcache import grad_cache_step
from polyalign.train.meter import StepMeter
from polyalign.train.optim import lr_at, set_lr
from polyalign.train.state import Checkpointer


@dataclass
class Job:
    """What one training run needs, ready-built."""

    cfg: TrainConfig
    model: Model  # checkpoints and after_step use it
    forward: torch.nn.Module  # the model, or its DDP / torch.compile wrapper: what the step calls
    optimizer: torch.optim.Optimizer
    objective: Objective
    batches: Iterator[dict]  # this rank's share of each global batch, from ``start`` on
    checkpointer: Checkpointer
    meter: StepMeter
    device: torch.device
    start: int = 0  # the step the run continues from (0: a new run)


def fit(job: Job) -> int:
    """Train from ``job.start`` to ``cfg.max_steps``; returns the last completed step. Ctrl-C saves an exact
    checkpoint of the last completed step (single process) and raises ``Interrupted``."""
    t, model = job.cfg, job.model
    step = completed = job.start
    updating, rng = False, None
    try:
        for step in range(job.start + 1, t.max_steps + 1):
            t0 = time.perf_counter()
            rng = rng_state()  # lets an interrupt mid-step still save an exact checkpoint
            batch = to_model_inputs(next(job.batches), job.device)  # image (b, 3, H, W), text (b, L), text_mask (b, L)
            t_data = time.perf_counter() - t0
            lr = set_lr(job.optimizer, lr_at(step - 1, t))

            job.optimizer.zero_grad(set_to_none=True)
            out, losses = forward_backward(job, batch, step)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or math.inf)
            if not torch.isfinite(grad_norm):
                raise TrainingError(nan_message(step, losses, job.checkpointer.dir, what="gradient norm"))
            updating = True
            job.optimizer.step()
            model.after_step(out)  # EMA teachers, queues, clamps (a no-op for plain CLIP)
            updating, completed, rng = False, step, None

            job.meter.step(step, losses, out.stats, lr, grad_norm, model.scale(), t_data, time.perf_counter() - t0)
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                job.meter.flush()
                job.checkpointer.save(step)
    except KeyboardInterrupt:
        if updating or dist.world_size() > 1:  # a half-applied update, or DDP peers mid-collective
            raise Interrupted(f"interrupted during step {step}; continue from the last checkpoint with --resume") from None
        if completed > job.start and job.checkpointer.latest() != completed:
            job.checkpointer.save(completed, rng)
        raise Interrupted(f"interrupted after step {completed}; checkpoint saved — continue with --resume") from None
    finally:
        job.meter.close()
    return step


def forward_backward(job: Job, batch: dict, step: int):
    """The step's (gathered) model output and losses, gradients accumulated; stops every rank on a non-finite
    loss before any update. With ``train.grad_cache_chunk`` the batch runs in sub-batches (same gradients)."""
    t, seen = job.cfg, {}

    def loss_of(out):  # {"clip_loss", ..., "loss"}; keeps the gathered output for after_step and the log
        seen["out"] = dist.gather_embeddings(out)
        return job.objective(seen["out"])

    if t.grad_cache_chunk:
        losses = grad_cache_step(job.forward, batch, loss_of, t.grad_cache_chunk,
                                 lambda: autocast(t.precision, job.device))
    else:
        with autocast(t.precision, job.device):
            losses = loss_of(job.forward(batch))
    if not torch.isfinite(dist.mean_over_ranks(losses["loss"])):  # every rank stops together
        raise TrainingError(nan_message(step, losses, job.checkpointer.dir))
    if not t.grad_cache_chunk:
        losses["loss"].backward()
    return seen["out"], losses


def nan_message(step: int, losses: dict, ckpt_dir: Path, what: str = "loss") -> str:
    """Which value broke at which step, and that the last good checkpoint is intact (nothing was saved)."""
    terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
    good = find_checkpoint(ckpt_dir)
    where = f"the last good checkpoint (step {good}) in {ckpt_dir} is intact" if good else "no checkpoint was written yet"
    return (f"non-finite {what} at step {step} ({terms}); stopped without saving: {where}. "
            f"Lower train.lr or use train.precision=fp32, then continue with --resume.")
