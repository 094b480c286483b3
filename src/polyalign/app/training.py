"""A training run end to end: set the run directory up (config, data, tokenizer, model, optimizer, resume), hand
the job to the fit loop (``polyalign.train.fit``), then draw the curves, evaluate and write ``metrics.json``."""
from __future__ import annotations

import contextlib
import itertools
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from polyalign import distributed as dist
from polyalign.app.lock import run_lock
from polyalign.app.runs import evaluate_run, prepare_tokenizer, prepare_views, write_metrics
from polyalign.config import FUSION_TERMS, Config, load_config, save_config
from polyalign.config.checks import init_from_dir
from polyalign.config.fusion import fusion_schedules
from polyalign.config.resume import changed_keys, check_resume_step, unsafe_changes, unsafe_message
from polyalign.data.build import build_datasets
from polyalign.data.loader import make_loader, make_stream_loader, to_model_inputs
from polyalign.data.stream import StreamTracker, merged_skips, resume_stream
from polyalign.errors import ConfigError, PolyalignError
from polyalign.losses.objective import Objective
from polyalign.models.build import build_model, fdt_temperature
from polyalign.models.hf_clip import load_clip_dir
from polyalign.tokenizer import function_word_ids, special_ids_of
from polyalign.train.checkpoint import find_checkpoint
from polyalign.train.files import truncate_log
from polyalign.train.curves import plot_curves
from polyalign.train.fit import Job, fit
from polyalign.train.meter import StepMeter
from polyalign.train.optim import build_optimizer
from polyalign.train.state import Checkpointer
from polyalign.train.tensorboard import open_reporter


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_resumed_config(cfg: Config, out: Path) -> None:
    """A resumed run keeps its saved config: only the keys that keep it the same run may change (the others: a
    ``ConfigError`` naming them); the changed ones are printed."""
    path = out / "config.yaml"
    if not path.is_file():
        return
    saved = load_config(path)
    if bad := unsafe_changes(saved, cfg):
        raise ConfigError(unsafe_message(bad, path))
    if (changed := changed_keys(saved, cfg)) and dist.is_main():
        print("resuming with changed settings: " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))


def _start_log(out: Path) -> None:
    """A run that starts from step 0 drops the log rows of an earlier attempt that left no checkpoint."""
    log = out / "log.jsonl"
    if log.exists() and log.stat().st_size:
        truncate_log(log, 0)
        print(f"note: cleared {log} (rows of an earlier attempt that left no checkpoint)")


def _set_up(cfg: Config, out: Path, device, resume: bool, show_progress: bool) -> tuple[Job, dict, object]:
    """Everything the fit loop runs on; returns the job, the datasets and the tokenizer."""
    t, main = cfg.train, dist.is_main()
    last = find_checkpoint(out / "checkpoints")
    if last is not None and not resume:
        raise PolyalignError(f"{out} already holds a run (checkpoint at step {last}): pass --resume, or another --out")
    resumed = resume and last is not None
    # a branch's first start (polyalign train --branch-from): the copied checkpoint, under this config
    branching = resumed and (out / "branch.json").is_file() and not (out / "config.yaml").is_file()
    dist.barrier()  # every rank has looked before rank 0 writes config.yaml
    if resumed:
        check_resume_step(cfg, last, out)
    if resume:
        _check_resumed_config(cfg, out)
    if main:
        save_config(cfg, out / "config.yaml")  # atomically
        if not resumed:
            _start_log(out)
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed)

    datasets = build_datasets(cfg.data, t.seed, show_progress and main)
    if main:  # a new run trains (and saves) the BPE tokenizer again: one left by an earlier attempt may be stale
        tokenizer = prepare_tokenizer(cfg, datasets["train"], out, reuse=resumed)
    dist.barrier()
    if not main:
        tokenizer = prepare_tokenizer(cfg, datasets["train"], out)  # loads rank 0's
    tag_names = prepare_views(cfg, datasets, out, main, reuse=resumed)
    model = build_model(cfg.model, cfg.data.image_size, tokenizer.vocab_size, cfg.loss, tag_names,
                        special_ids_of(tokenizer), train_steps=t.max_steps,
                        function_ids=function_word_ids(tokenizer)).to(device)
    if cfg.loss.active() & set(FUSION_TERMS) and main:  # the fusion teacher's schedules, resolved for this run
        m, ramp = fusion_schedules(cfg.model.fusion, t.max_steps)
        horizon = f"{1 / (1 - m):.1f} steps" if m < 1 else "inf"
        print(f"fusion teacher: momentum {m:.4g} per step (EMA horizon {horizon} of {t.max_steps}), "
              f"α ramp over {ramp} steps")
    if cfg.model.init_from and not resumed:  # hf:DIR (a resumed run's checkpoint holds its weights)
        load_clip_dir(model, init_from_dir(cfg.model.init_from))
    t0, train_ds = time.perf_counter(), datasets["train"]
    streamed = cfg.data.name == "shards"  # an endless stream of samples: no len, no image(i)
    images = () if cfg.data.augment.enabled or "image" not in cfg.model.modalities or streamed else (  # augmented: never hit
        train_ds.image(i).float() / 255 for i in range(len(train_ds)))  # as the loader makes them
    image_encoder = getattr(model, "image_encoder", None)
    if cfg.data.cache_dir and hasattr(image_encoder, "cache_store"):  # the frozen prefix's outputs, kept for next time
        image_encoder.cache_store = Path(cfg.data.cache_dir)
    if (n := model.prepare(tokenizer, train_ds.all_captions(), images)) and main:  # frozen pretrained towers
        print(f"cached the frozen towers' outputs for {n} captions and images in {time.perf_counter() - t0:.0f} s")
    optimizer, objective = build_optimizer(model, t), Objective(cfg.loss, cfg.model.modalities)
    reporter = open_reporter(t, out, last if resumed else 0, main)  # TensorBoard (train.report_to) or nothing
    checkpointer = Checkpointer(out, model, optimizer, objective, cfg, datasets.get("val"), tokenizer, reporter)
    start = checkpointer.resume(last) if resumed else 0
    if branching:  # the source's best validation loss is another run's: the branch keeps its own best
        checkpointer.best = math.inf
        if model.has_fdt and cfg.model.fdt.t_fdt_auto != "active":  # this config's T_fdt, not the source's
            model.fdt.t_start.fill_(fdt_temperature(cfg.model.fdt))
    if resume and not resumed and main:
        print(f"no checkpoint in {checkpointer.dir}: starting from scratch")
    # DDP averages gradients over ranks; each rank's loss is its share of the global-batch loss
    forward = (torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=not model.all_parameters_used)
               if dist.world_size() > 1 else model)
    if t.compile:  # weights stay shared with ``model``, which checkpoints and evaluation use
        forward = torch.compile(forward)
    if streamed:  # a resumed stream continues at each worker's position (data/stream.py): exact
        train_ds.rank, train_ds.world, n_workers = dist.rank(), dist.world_size(), max(cfg.data.num_workers, 1)
        if resumed and not resume_stream(train_ds, checkpointer.stream_saved, n_workers) and main:
            print(f"warning: resuming a streamed (data.name=shards) run at step {start} whose checkpoint holds no "
                  f"stream position for {n_workers} worker(s) per rank: the stream restarts at its first epoch, so "
                  "this run will not match an uninterrupted one sample for sample", file=sys.stderr)
        loader = make_stream_loader(train_ds, tokenizer, t.batch_size, cfg.data.num_workers, dist.world_size())
        batches = StreamTracker(iter(loader), n_workers, checkpointer.stream_saved if resumed else None)
        checkpointer.stream, checkpointer.stream_start = batches, start
    else:
        # the low-label regime's batches: captioned items only (data.captioned_only), or a fixed share of them
        # (data.captioned_share); otherwise as they come (~caption_fraction of each batch)
        items = np.flatnonzero(train_ds.captioned) if cfg.data.captioned_only else None
        mix = None
        if cfg.data.captioned_share > 0:
            mix = (np.flatnonzero(train_ds.captioned), np.flatnonzero(~train_ds.captioned),
                   round(cfg.data.captioned_share * t.batch_size))
        batches = iter(make_loader(train_ds, tokenizer, t.batch_size, t.seed, start, cfg.data.num_workers,
                                   dist.rank(), dist.world_size(), items, mix))
    model.train()
    if cfg.model.fdt.t_fdt_auto == "active" and model.has_fdt and (branching or not resumed):  # (a resumed run's T is in its checkpoint)
        first = next(batches)
        _calibrate_fdt(model, to_model_inputs(first, device), cfg.model.fdt.active_target, device, main)
        batches = itertools.chain([first], batches)  # the loop still trains on it
    meter = StepMeter(t, out / "log.jsonl", start, main, show_progress, reporter)
    job = Job(t, model, forward, optimizer, objective, batches, checkpointer, meter, device, start)
    return job, datasets, tokenizer


def _calibrate_fdt(model, batch: dict, target: float, device, main: bool) -> None:
    """``model.fdt.t_fdt_auto=active``: T_fdt such that ``target`` of the codebook is active on the first batch (each
    rank's batch; DDP: the mean log T). Side-effect free otherwise: the random state and every other buffer
    (BatchNorm statistics) are as they were."""
    saved = {k: v.clone() for k, v in model.named_buffers()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        q_image, q_text, mask = model.fdt_queries(batch)
    for k, v in model.named_buffers():
        v.copy_(saved[k])
    t = model.fdt.calibrate(q_image, q_text, mask, target, reduce=lambda x: dist.mean_over_ranks(x.to(device)).cpu())
    if main:
        got = model.fdt.active_fraction(q_image, q_text, mask)
        print(f"FDT: T_fdt = {t:.4g} (calibrated on the first batch: {got:.1%} of the {model.fdt.codebook.num_embeddings} "
              f"entries active, target {target:.0%})")


def train(cfg: Config, out_dir: str | Path, resume: bool = False, show_progress: bool = True) -> dict:
    """Train ``cfg`` into ``out_dir``; returns the final metrics. ``resume`` continues from the latest checkpoint.

    Under torchrun every process runs this; ``train.batch_size`` is the global batch, each rank takes its slice
    of the same global batch, embeddings are gathered with gradient, and rank 0 alone logs, checkpoints and
    evaluates (other ranks return ``{}``).
    """
    out, device = Path(out_dir), dist.init_from_env()
    with run_lock(out, "train") if dist.is_main() else contextlib.nullcontext():  # before anything is written
        return _train(cfg, out, device, resume, show_progress)


def _train(cfg: Config, out: Path, device, resume: bool, show_progress: bool) -> dict:
    """``train`` inside the run directory's lock."""
    job, datasets, tokenizer = _set_up(cfg, out, device, resume, show_progress)
    try:
        return _fit_and_evaluate(cfg, out, job, datasets, tokenizer)
    finally:
        job.meter.reporter.close()


def _fit_and_evaluate(cfg: Config, out: Path, job: Job, datasets: dict, tokenizer) -> dict:
    """The fit loop, then (rank 0) the curves, the evaluation and ``metrics.json``."""
    step = fit(job)
    if (stream := job.checkpointer.stream) is not None:  # a stream's bad samples were met in its readers
        snapshots = dist.gather_objects(stream.all_skips())  # every rank's
        if dist.is_main():
            datasets["train"].skip_report = merged_skips(snapshots)
    if not dist.is_main():
        dist.barrier()  # wait while rank 0 evaluates
        return {}
    plot_curves(out / "log.jsonl", out / "loss.png")
    metrics = evaluate_run(cfg, job.model, tokenizer, datasets, out)
    if job.meter.step_time:
        metrics["train/data_time_frac"] = job.meter.data_time / job.meter.step_time
        metrics["train/samples_per_s"] = (step - job.start) * cfg.train.batch_size / job.meter.step_time
    metrics["train/steps"] = step
    skipped = sum(ds.skip_report.n_skipped for ds in datasets.values())
    if skipped:
        metrics["data/skipped_rows"] = skipped
        for split, ds in datasets.items():
            r = ds.skip_report
            if r.n_skipped:
                of = f" of {r.total}" if r.total else ""  # (a stream counts distinct bad samples, not rows read)
                print(f"{split}: skipped {r.n_skipped}{of} rows ({dict(r.skipped)}), e.g. {r.examples[0]}")
    job.meter.reporter.scalars(step, metrics, "eval/")
    if (examples := out / "retrieval_examples.png").is_file() and cfg.eval.n_examples:
        job.meter.reporter.image("eval/retrieval_examples", examples, step)
    write_metrics(out, metrics)
    dist.barrier()
    return metrics
