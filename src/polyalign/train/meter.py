"""What a training step reports: rows of ``log.jsonl`` (losses, stats, lr, throughput), the progress bar, and a
printed line every ~5% of the run when stderr is not a terminal; the throughput totals for ``metrics.json``."""
from __future__ import annotations

import contextlib
import json
import sys

import torch
from tqdm import tqdm

from polyalign import distributed as dist
from polyalign.config import TrainConfig
from polyalign.train.tensorboard import Reporter


class StepMeter:
    """Every rank calls ``step`` (the logged values are averaged over ranks, a collective); rank 0 alone writes."""

    def __init__(self, cfg: TrainConfig, log_path, start: int, main: bool, show_progress: bool = True,
                 reporter: Reporter | None = None):
        self.cfg, self.main, self.show = cfg, main, show_progress
        self.reporter = reporter or Reporter()  # TensorBoard too (train.report_to); the caller closes it
        self.log = open(log_path, "a") if main else contextlib.nullcontext()
        self.interactive = show_progress and main and sys.stderr.isatty()
        self.bar = tqdm(total=cfg.max_steps, initial=start, disable=not self.interactive, desc="train", unit="step")
        self.report_every = cfg.log_every * max(1, cfg.max_steps // 20 // cfg.log_every)
        self.window = {"samples": 0, "time": 0.0, "data": 0.0}
        self.data_time = self.step_time = 0.0

    def step(self, step: int, losses: dict, stats: dict, lr: float, grad_norm: torch.Tensor, scale: torch.Tensor,
             data_time: float, step_time: float) -> None:
        t, w = self.cfg, self.window
        w["samples"] += t.batch_size
        w["time"] += step_time
        w["data"] += data_time
        self.data_time += data_time
        self.step_time += step_time
        if step % t.log_every == 0 or step == t.max_steps:
            shown = {k: dist.mean_over_ranks(v).item() for k, v in losses.items()}  # the global-batch loss
            shown.update({k: dist.mean_over_ranks(v).item() for k, v in stats.items()})  # e.g. FDT sparsity
            if self.main:
                self._write(step, shown, lr, grad_norm, scale)
        self.bar.update(1)

    def _write(self, step, shown, lr, grad_norm, scale) -> None:
        t, w = self.cfg, self.window
        row = {"step": step, **shown, "lr": lr, "samples_per_s": w["samples"] / w["time"],
               "data_frac": w["data"] / w["time"], "grad_norm": grad_norm.item(), "logit_scale": scale.item()}
        self.log.write(json.dumps(row) + "\n")
        self.log.flush()
        self.reporter.scalars(step, {k: v for k, v in row.items() if k != "step"}, "train/")
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.0f}")
        if self.show and not self.interactive and (step % self.report_every == 0 or step == t.max_steps):
            print(f"step {step}/{t.max_steps}  loss {row['loss']:.4f}  lr {lr:.2e}  "
                  f"{row['samples_per_s']:.0f} samples/s  data {100 * row['data_frac']:.0f}%", flush=True)
        self.window = {"samples": 0, "time": 0.0, "data": 0.0}

    def flush(self) -> None:
        if self.main:
            self.log.flush()

    def close(self) -> None:
        self.bar.close()
        if self.main:
            self.log.close()
