"""The training loop, top to bottom: set lr → forward → loss → backward → clip → step → log → checkpoint → eval."""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config, load_config, save_config
from ..config_tree import flat_items
from ..data.build import build_datasets
from ..data.loader import Collator, make_loader
from .. import distributed as dist
from ..errors import Interrupted, PolyalignError, TrainingError
from ..albef import special_ids_of
from ..model import build_model
from ..objective import Objective
from ..runs import evaluate_run, prepare_tokenizer, prepare_views, write_metrics
from .checkpoint import find_checkpoint, load_state, load_weights, rng_state, save_checkpoint, set_rng_state
from .curves import plot_curves, read_log
from .gradcache import grad_cache_step
from .optim import build_optimizer, lr_at


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(precision: str, device: torch.device | str = "cpu"):
    """bf16 autocast on the device's type, or nothing for fp32."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def to_model_inputs(batch: dict, device: torch.device | str = "cpu") -> dict:
    """Tensors to the device; uint8 pixels → float in [0, 1] (once per batch, not per sample in the loader)."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    pixels = {k: batch[k].float().div_(255.0) for k in ("image", "image_view2") if k in batch}
    return {**batch, **pixels}


def _rank_rng_states() -> list[dict]:
    """Every rank's RNG state (rank order), so a resumed DDP run restores each process's own."""
    state = rng_state()
    if dist.world_size() == 1:
        return [state]
    states = [None] * dist.world_size()
    torch.distributed.all_gather_object(states, state)
    return states


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


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past the checkpoint we resume from (the killed run may have logged further)."""
    if path.exists():
        rows = [r for r in read_log(path) if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _warn_config_changes(old: Config, new: Config) -> None:
    """Resuming is exact only with the recipe unchanged: name every key that differs from the saved one."""
    a, b = flat_items(old), flat_items(new)
    changed = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    if changed:
        print("warning: resuming with a changed config (the run is no longer exactly reproducible):\n  "
              + "\n  ".join(changed))


def train(cfg: Config, out_dir: str | Path, resume: bool = False, show_progress: bool = True) -> dict:
    """Train ``cfg`` into ``out_dir``; returns the final metrics. ``resume`` continues from the latest checkpoint.

    Under torchrun every process runs this; ``train.batch_size`` is the global batch, each rank takes its slice
    of the same global batch, embeddings are gathered with gradient, and rank 0 alone logs, checkpoints and
    evaluates (other ranks return ``{}``).
    """
    out, t = Path(out_dir), cfg.train
    device = dist.init_from_env()
    main = dist.is_main()
    ckpt_dir = out / "checkpoints"
    last = find_checkpoint(ckpt_dir)
    if last is not None and not resume:
        raise PolyalignError(f"{out} already holds a run (checkpoint at step {last}): pass --resume, or another --out")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if resume and last is not None:
            _warn_config_changes(load_config(out / "config.yaml"), cfg)
        save_config(cfg, out / "config.yaml")
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed)

    datasets = build_datasets(cfg.data, t.seed, show_progress and main)
    train_ds = datasets["train"]
    if main:
        tokenizer = prepare_tokenizer(cfg, train_ds, out)  # trains and saves the BPE tokenizer once
    dist.barrier()
    if not main:
        tokenizer = prepare_tokenizer(cfg, train_ds, out)  # loads rank 0's
    tag_names = prepare_views(cfg, datasets, out, main)
    model = build_model(cfg.model, cfg.data.image_size, tokenizer.vocab_size, cfg.loss, tag_names,
                        special_ids_of(tokenizer)).to(device)
    warm_cache = getattr(getattr(model, "text_encoder", None), "warm_cache", None)
    if warm_cache is not None:  # a locked pretrained tower: embed every training caption once, up front
        t0 = time.perf_counter()
        n = warm_cache(tokenizer, train_ds.all_captions())
        if n and main:
            print(f"cached the locked text tower's outputs for {n} captions in {time.perf_counter() - t0:.0f} s")
    optimizer = build_optimizer(model, t)
    objective = Objective(cfg.loss, cfg.model.modalities)
    start, best = 0, math.inf
    if resume and last is not None:
        model.load_state_dict(load_weights(ckpt_dir, last))
        state = load_state(ckpt_dir, last)
        optimizer.load_state_dict(state["optimizer"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) != dist.world_size() and main:
            print(f"warning: the checkpoint was written by {len(ranks)} process(es), this run has "
                  f"{dist.world_size()}: RNG streams (dropout) continue from rank 0's")
        set_rng_state(ranks[dist.rank()] if len(ranks) == dist.world_size() else state["rng"])
        start, best = state["step"], state["best_val_loss"]
        if main:
            _truncate_log(out / "log.jsonl", start)
            print(f"resuming from step {start}")
    elif resume and main:
        print(f"no checkpoint in {ckpt_dir}: starting from scratch")
    # DDP averages gradients over ranks; each rank's loss is its share of the global-batch loss
    ddp = (torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=not model.clip_on)  # no clip: text tower idle
           if dist.world_size() > 1 else model)
    if t.compile:  # weights stay shared with ``model``, which checkpoints and evaluation use
        ddp = torch.compile(ddp)

    def checkpoint(step: int, rng: dict | None = None) -> None:
        nonlocal best
        states = [rng] if rng is not None else _rank_rng_states()  # collective: every rank calls it
        if main:
            val = validation_loss(model, objective, datasets["val"], tokenizer, cfg) if "val" in datasets else math.nan
            is_best = not val > best  # NaN-safe: no val split → every checkpoint counts as best
            best = min(best, val) if not math.isnan(val) else best
            state = {"optimizer": optimizer.state_dict(), "scheduler": {"step": step}, "step": step,
                     "rng": states[0], "rng_ranks": states, "best_val_loss": best}
            save_checkpoint(ckpt_dir, step, model, state, best=is_best)
            if not math.isnan(val):  # no val split: nothing to log (NaN is not valid JSON)
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "val_loss": val}) + "\n")
        dist.barrier()

    loader = make_loader(train_ds, tokenizer, t.batch_size, t.seed, start, cfg.data.num_workers,
                         dist.rank(), dist.world_size())
    batches = iter(loader)
    model.train()
    interactive = show_progress and main and sys.stderr.isatty()
    bar = tqdm(total=t.max_steps, initial=start, disable=not interactive, desc="train", unit="step")
    report_every = t.log_every * max(1, t.max_steps // 20 // t.log_every)  # no TTY: a line every ~5% of the run
    window = {"samples": 0, "time": 0.0, "data": 0.0}
    data_time_total = step_time_total = 0.0
    step = completed = start
    updating, rng_snapshot = False, None
    try:
        with open(out / "log.jsonl", "a") if main else contextlib.nullcontext() as log:
            for step in range(start + 1, t.max_steps + 1):
                t0 = time.perf_counter()
                rng_snapshot = rng_state()  # lets an interrupt mid-step still save an exact checkpoint
                batch = to_model_inputs(next(batches), device)  # e.g. image (b, 3, H, W), text (b, L), text_mask (b, L)
                t_data = time.perf_counter() - t0
                lr = lr_at(step - 1, t)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                optimizer.zero_grad(set_to_none=True)
                seen = {}

                def loss_of(out: dict) -> dict:  # {"clip_loss", ..., "loss"}; keeps the (gathered) outputs
                    seen["out"] = dist.gather_embeddings(out)
                    return objective(seen["out"])

                if t.grad_cache_chunk:  # the same gradients, one sub-batch's activations alive at a time
                    losses = grad_cache_step(ddp, batch, loss_of, t.grad_cache_chunk,
                                             lambda: autocast(t.precision, device))
                else:
                    with autocast(t.precision, device):
                        losses = loss_of(ddp(batch))
                if not torch.isfinite(dist.mean_over_ranks(losses["loss"])):  # every rank stops together
                    raise TrainingError(_nan_message(step, losses, ckpt_dir))
                if not t.grad_cache_chunk:
                    losses["loss"].backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or math.inf)
                if not torch.isfinite(grad_norm):
                    raise TrainingError(_nan_message(step, losses, ckpt_dir, what="gradient norm"))
                updating = True
                optimizer.step()
                model.after_step(seen["out"])  # MoCo: momentum update and enqueue (a no-op otherwise)
                updating, completed, rng_snapshot = False, step, None

                dt = time.perf_counter() - t0
                window["samples"] += t.batch_size
                window["time"] += dt
                window["data"] += t_data
                data_time_total += t_data
                step_time_total += dt
                if step % t.log_every == 0 or step == t.max_steps:
                    shown = {k: dist.mean_over_ranks(v).item() for k, v in losses.items()}  # global-batch loss
                    shown.update({k.removeprefix("stat/"): dist.mean_over_ranks(v).item()  # e.g. FDT sparsity
                                  for k, v in seen["out"].items() if k.startswith("stat/")})
                if main and (step % t.log_every == 0 or step == t.max_steps):
                    row = {"step": step, **shown, "lr": lr,
                           "samples_per_s": window["samples"] / window["time"],
                           "data_frac": window["data"] / window["time"], "grad_norm": grad_norm.item(),
                           "logit_scale": model.scale().item()}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.0f}")
                    if show_progress and not interactive and (step % report_every == 0 or step == t.max_steps):
                        print(f"step {step}/{t.max_steps}  loss {row['loss']:.4f}  lr {lr:.2e}  "
                              f"{row['samples_per_s']:.0f} samples/s  data {100 * row['data_frac']:.0f}%", flush=True)
                    window = {"samples": 0, "time": 0.0, "data": 0.0}
                bar.update(1)
                if step % t.checkpoint_every == 0 or step == t.max_steps:
                    if main:
                        log.flush()
                    checkpoint(step)
    except KeyboardInterrupt:
        if updating or dist.world_size() > 1:  # a half-applied update, or DDP peers mid-collective: the last periodic checkpoint stands
            raise Interrupted(f"interrupted during step {step}; continue from the last checkpoint with --resume") from None
        if completed > start and find_checkpoint(ckpt_dir) != completed:
            checkpoint(completed, rng_snapshot)
        raise Interrupted(f"interrupted after step {completed}; checkpoint saved — continue with --resume") from None
    finally:
        bar.close()

    if not main:
        dist.barrier()  # wait while rank 0 evaluates
        return {}
    plot_curves(out / "log.jsonl", out / "loss.png")
    metrics = evaluate_run(cfg, model, tokenizer, datasets, out)
    if step_time_total:
        metrics["train/data_time_frac"] = data_time_total / step_time_total
        metrics["train/samples_per_s"] = (step - start) * t.batch_size / step_time_total
    metrics["train/steps"] = step
    skipped = sum(ds.skip_report.n_skipped for ds in datasets.values())
    if skipped:
        metrics["data/skipped_rows"] = skipped
        for split, ds in datasets.items():
            r = ds.skip_report
            if r.n_skipped:
                print(f"{split}: skipped {r.n_skipped} of {r.total} rows ({dict(r.skipped)}), e.g. {r.examples[0]}")
    write_metrics(out, metrics)
    dist.barrier()
    return metrics


def _nan_message(step: int, losses: dict, ckpt_dir: Path, what: str = "loss") -> str:
    terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
    good = find_checkpoint(ckpt_dir)
    where = f"the last good checkpoint (step {good}) in {ckpt_dir} is intact" if good else "no checkpoint was written yet"
    return (f"non-finite {what} at step {step} ({terms}); stopped without saving: {where}. "
            f"Lower train.lr or use train.precision=fp32, then continue with --resume.")
