"""A training run's state on disk: periodic checkpoints (weights, optimizer, every rank's RNG, best validation
loss) with the validation loss that ranks them, and the exact resume from the latest one."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from polyalign import distributed as dist
from polyalign.config import Config
from polyalign.data.loader import Collator, to_model_inputs
from polyalign.train.amp import autocast
from polyalign.train.checkpoint import (find_checkpoint, load_state, load_weights, rng_state, save_checkpoint,
                                       set_rng_state)
from polyalign.train.files import truncate_log
from polyalign.train.tensorboard import Reporter


@torch.no_grad()
def validation_loss(model, objective, dataset, tokenizer, cfg: Config) -> float:
    """Mean objective over the validation set in fixed batches (no dropout, training RNG untouched)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate, bs, total, n = Collator(tokenizer), min(cfg.train.batch_size, len(dataset)), 0.0, 0
    for start in range(0, len(dataset) - bs + 1, bs):
        batch = to_model_inputs(collate([dataset[(0, i)] for i in range(start, start + bs)]), device)
        with autocast(cfg.train.precision, device):
            total += objective(model(batch))["loss"].item()
        n += 1
    model.train(was_training)
    return total / max(n, 1)


def _rank_rng_states() -> list[dict]:
    """Every rank's RNG state (rank order), so a resumed DDP run restores each process's own."""
    return dist.gather_objects(rng_state())


class Checkpointer:
    """Saves and restores ``RUN/checkpoints`` (the latest, previous and best steps are kept, so a damaged checkpoint
    has an intact one to fall back on); rank 0 writes, every rank takes part (RNG states are gathered)."""

    def __init__(self, run_dir: Path, model, optimizer, objective, cfg: Config, val_set=None, tokenizer=None,
                 reporter: Reporter | None = None):
        self.dir, self.log_path = Path(run_dir) / "checkpoints", Path(run_dir) / "log.jsonl"
        self.reporter = reporter or Reporter()
        self.model, self.optimizer, self.objective, self.cfg = model, optimizer, objective, cfg
        self.val_set, self.tokenizer, self.best = val_set, tokenizer, math.inf
        # a streamed run: its StreamTracker (``stream``; the run started at ``stream_start``), whose state after each
        # saved step goes into the checkpoint with every rank's; ``stream_saved``: what the resumed checkpoint held
        self.stream, self.stream_start, self.stream_saved = None, 0, None

    def latest(self) -> int | None:
        return find_checkpoint(self.dir)

    def save(self, step: int, rng: dict | None = None) -> None:
        """Checkpoint after ``step`` (``rng``: the state to record instead of the current one, for an interrupt
        mid-step); with a validation set, its loss is logged and decides the ``best`` pointer. A collective."""
        states = [rng] if rng is not None else _rank_rng_states()
        streams = dist.gather_objects(self.stream.state(step - self.stream_start)) if self.stream is not None else None
        if dist.is_main():
            val = (validation_loss(self.model, self.objective, self.val_set, self.tokenizer, self.cfg)
                   if self.val_set is not None else math.nan)
            is_best = not val > self.best  # NaN-safe: no val split → every checkpoint counts as best
            self.best = min(self.best, val) if not math.isnan(val) else self.best
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": {"step": step}, "step": step,
                     "rng": states[0], "rng_ranks": states, "best_val_loss": self.best}
            if streams is not None:
                state["stream"] = streams
            if not math.isnan(val):  # no val split: nothing to log (NaN is not valid JSON)
                with open(self.log_path, "a") as f:  # before the commit: a resume from `step` keeps it, one from an
                    f.write(json.dumps({"step": step, "val_loss": val}) + "\n")  # earlier step drops it
                self.reporter.scalars(step, {"loss": val}, "val/")
            save_checkpoint(self.dir, step, self.model, state, best=is_best, keep_previous=True)
        dist.barrier()

    def resume(self, step: int) -> int:
        """Load weights, optimizer, this rank's RNG and the best loss of checkpoint ``step``; drop later log rows."""
        self.model.load_state_dict(load_weights(self.dir, step))
        state = load_state(self.dir, step)
        self.optimizer.load_state_dict(state["optimizer"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) != dist.world_size() and dist.is_main():
            print(f"warning: the checkpoint was written by {len(ranks)} process(es), this run has "
                  f"{dist.world_size()}: RNG streams (dropout) continue from rank 0's")
        set_rng_state(ranks[dist.rank()] if len(ranks) == dist.world_size() else state["rng"])
        self.best = state["best_val_loss"]
        streams = state.get("stream")
        self.stream_saved = streams[dist.rank()] if streams and len(streams) == dist.world_size() else None
        if dist.is_main():
            truncate_log(self.log_path, state["step"])  # the killed run may have logged further
            print(f"resuming from step {state['step']}")
        return state["step"]
