"""A run directory: its resolved config, tokenizer, checkpoints and metrics; shared by train and eval."""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from polyalign.app.lock import LOCK_NAME, lock_holder, run_lock
from polyalign.config import Config, load_config
from polyalign.config.resume import changed_keys
from polyalign.data.base import ImageTextDataset, Views, concept_partners
from polyalign.data.tags import tag_vocabulary
from polyalign.config.checks import init_from_dir, resolve_hf_path
from polyalign.errors import ConfigError, PolyalignError
from polyalign.models.build import build_model
from polyalign.models.interface import Model
from polyalign.tokenizer import Tokenizer, special_ids_of
from polyalign.train.checkpoint import find_checkpoint, load_weights
from polyalign.train.files import write_json
from polyalign.train.tensorboard import TENSORBOARD_DIR

DEMO_MARKER = ".polyalign-demo"  # written into a demo's run directory: the demo replaces only such a folder
RUN_FILES = {"config.yaml", "tokenizer.json", "tags.json", "log.jsonl", "loss.png", "metrics.json",
             "retrieval_examples.png", LOCK_NAME, DEMO_MARKER}
TEMP_FILE = re.compile(r"\..+\.tmp\d+")  # an atomic write's temp file, left by a kill
CHECKPOINT_FILE = re.compile(r"step-\d+\..+|latest\.json|best\.json")
FIXED_BY_WEIGHTS = ("model.", "loss.", "data.image_size")  # keys whose change no longer fits a run's saved weights


def prepare_tokenizer(cfg: Config, train_ds: ImageTextDataset, run_dir: Path, reuse: bool = True) -> Tokenizer:
    """The run's tokenizer: reloaded if the run has one (and ``reuse``), else the HF tower's own, else BPE trained
    on the captions (deterministic: a damaged ``tokenizer.json`` is rebuilt the same), saved atomically."""
    path, ctx = run_dir / "tokenizer.json", cfg.model.text.context_length
    if reuse and path.exists():
        try:
            return Tokenizer.load(path, ctx)
        except PolyalignError as e:
            how = "the text tower's own" if cfg.model.text.kind == "hf" else "the training captions"
            print(f"warning: {e}; rebuilding it from {how}, as the run first made it")
    if cfg.model.init_from:  # the checkpoint's own vocabulary, which its embeddings index
        tok = Tokenizer.load(init_from_dir(cfg.model.init_from) / "tokenizer.json", ctx)
    elif cfg.model.text.kind == "hf":
        tok = Tokenizer.load(resolve_hf_path(cfg.model.text.hf_path) / "tokenizer.json", ctx)
    else:
        tok = Tokenizer.train(train_ds.all_captions(), cfg.model.text.vocab_size, ctx)
    tok.save(path)
    return tok


def read_tags(path: Path) -> list[str]:
    """A run's tag vocabulary (``tags.json``; none: ``[]``), or a ``PolyalignError`` naming a damaged file."""
    if not path.exists():
        return []
    try:
        names = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise PolyalignError(f"{path} is damaged ({e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise PolyalignError(f"{path} is damaged (not a list of tag names)")
    return names


def prepare_views(cfg: Config, datasets: dict, run_dir: Path, main: bool = True, reuse: bool = True) -> list[str]:
    """Configure what training samples carry for the active intra-modal terms (augmented views, a second
    caption, multi-hot tags) on the train and val splits; returns the tag vocabulary (saved as ``tags.json``;
    ``reuse``: a resumed run keeps its saved one, or rebuilds a damaged one the same, from the training tags)."""
    terms, d = cfg.loss.active(), cfg.data
    tag_names, path = [], run_dir / "tags.json"
    if "tags" in terms:
        try:
            tag_names = read_tags(path) if reuse else []
        except PolyalignError as e:
            print(f"warning: {e}; rebuilding it from the training tags, as the run first made it")
        if not tag_names:
            train = datasets["train"]
            keep = train.captioned  # the low-label regime: the vocabulary of the captioned items' tags
            tag_names = tag_vocabulary((train.tags(i) for i in range(len(train)) if keep is None or keep[i]),
                                       d.tag_min_count, d.max_tags)
            if main and tag_names:
                write_json(path, tag_names)
    intra = "image_image" in terms
    views = Views(augment=d.augment if d.augment.enabled else None, image_views=2 if intra else 1,
                  text_views=2 if "text_text" in terms else 1, word_drop=d.text_word_drop,
                  tag_index={t: i for i, t in enumerate(tag_names)} if tag_names else None,
                  intra_augment=d.intra_augment if intra and d.intra_augment.enabled else None)
    if views != Views(word_drop=d.text_word_drop):
        for split in ("train", "val"):
            if split in datasets:
                partners = split == "train" and intra and d.intra_positive == "style"  # val: plain views
                datasets[split].views = replace(views, partners=_partners(datasets[split]) if partners else None)
    return tag_names


def _partners(dataset: ImageTextDataset) -> list:
    """data.intra_positive=style: each item's image_image partners, the other items of its concept_id."""
    partners = concept_partners(dataset)
    if not any(len(p) for p in partners):
        raise ConfigError("data.intra_positive=style needs manifest rows that share a concept_id (the emoji data's "
                          "all.jsonl or loso_* files, with several styles); this manifest has none: use view")
    return partners


def load_run(run_dir: Path, which: str = "latest", overrides: list[str] = ()) -> tuple[Config, Model, Tokenizer]:
    """Config, model (weights of the ``which`` checkpoint, eval mode) and tokenizer of a finished or running run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise PolyalignError(f"{run_dir} is not a polyalign run (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", overrides, for_training=False)  # its manifests may have moved
    _check_fixed_by_weights(load_config(run_dir / "config.yaml", for_training=False), cfg, run_dir)
    step = find_checkpoint(run_dir / "checkpoints", which)
    if step is None:
        raise PolyalignError(f"{run_dir} has no '{which}' checkpoint")
    try:
        tok = Tokenizer.load(run_dir / "tokenizer.json", cfg.model.text.context_length)
    except PolyalignError as e:
        raise PolyalignError(f"{e}: `polyalign train {run_dir / 'config.yaml'} --out {run_dir} --resume` rebuilds "
                             f"it") from None
    tag_names = read_tags(run_dir / "tags.json")
    model = build_model(cfg.model, cfg.data.image_size, tok.vocab_size, cfg.loss, tag_names,
                        special_ids_of(tok))
    model.load_state_dict(load_weights(run_dir / "checkpoints", step))
    return cfg, model.eval(), tok


def _check_fixed_by_weights(saved: Config, cfg: Config, run_dir: Path) -> None:
    """Overrides of a trained run may not change what its weights were trained as (the model, the loss heads)."""
    fixed = [k for k in changed_keys(saved, cfg) if k.startswith(FIXED_BY_WEIGHTS)]
    if fixed:
        raise ConfigError(f"{', '.join(fixed)}: fixed by the trained weights of {run_dir} (its config.yaml); "
                          f"overrides of a trained run may change only its data and evaluation")


def evaluate_run(cfg: Config, model: torch.nn.Module, tok: Tokenizer, datasets: dict, run_dir: Path | None) -> dict:
    """Retrieval, zero-shot (with a text tower) and linear probe on the test split (or val when there is none)."""
    from polyalign.eval import evaluate

    test = datasets.get("test") or datasets.get("val")
    if test is None:
        print("no val/test split configured: skipping evaluation")
        return {}
    e = cfg.eval
    with torch.random.fork_rng():  # evaluation must not move the training RNG (exact resume)
        probe = datasets["val"] if cfg.data.name == "shards" else datasets["train"]  # streamed train: no items
        metrics = evaluate(model, tok, probe, test, batch_size=e.batch_size,
                           zeroshot_fields=e.zeroshot_fields or None, templates=e.templates or None,
                           probe_field=e.probe_field or None, probe_max_train=e.probe_max_train,
                           max_captions=e.max_captions, chunk_size=e.chunk_size, precision=e.precision, out_dir=run_dir,
                           n_examples=e.n_examples, tag_min_count=cfg.data.tag_min_count, max_tags=cfg.data.max_tags,
                           modalities=cfg.model.modalities, bootstrap=e.bootstrap_resamples)
        if e.rerank_k and model.has_itm:  # fusion model: ITC top-k re-ranked by ITM, as ALBEF does
            from polyalign.eval.rerank import evaluate_rerank

            metrics |= evaluate_rerank(model, tok, test, k=e.rerank_k, max_captions=e.max_captions,
                                       bootstrap=e.bootstrap_resamples)
    return metrics


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """``RUN/metrics.json``, replaced atomically."""
    write_json(run_dir / "metrics.json", metrics)


def merge_metrics(run_dir: Path, metrics: dict) -> dict:
    """``metrics`` over the run's ``metrics.json`` (training-time figures such as throughput and skipped rows stay),
    written under the run's lock; a run still training keeps its file (it writes its own at the end)."""
    if holder := lock_holder(run_dir):
        print(f"note: {run_dir} is in use by {holder}: metrics.json left as it is", file=sys.stderr)
        return metrics
    previous = run_dir / "metrics.json"
    with run_lock(run_dir, "eval", wait_s=30):  # another eval merges for a moment
        if previous.exists():
            try:
                metrics = {**json.loads(previous.read_text()), **metrics}
            except ValueError as e:
                raise PolyalignError(f"{previous} is damaged ({e}): move it away, then evaluate again") from None
        write_metrics(run_dir, metrics)
    return metrics


def _is_run_file(entry: Path) -> bool:
    """A file that a training or demo run writes at the top of its directory (temp files of atomic writes too)."""
    return entry.is_file() and (entry.name in RUN_FILES or bool(TEMP_FILE.fullmatch(entry.name)))


def _is_checkpoint_file(entry: Path) -> bool:
    return entry.is_file() and bool(CHECKPOINT_FILE.fullmatch(entry.name) or TEMP_FILE.fullmatch(entry.name))


def _foreign_files(out: Path) -> list[str]:
    """The entries of ``out`` that no training run writes."""
    ckpt = out / "checkpoints"
    top = [e.name + "/" * e.is_dir() for e in sorted(out.iterdir())
           if not (_is_run_file(e) or e.name in ("checkpoints", TENSORBOARD_DIR) and e.is_dir())]
    if not ckpt.is_dir():
        return top
    return top + [f"checkpoints/{f.name}" for f in sorted(ckpt.iterdir()) if not _is_checkpoint_file(f)]


def check_demo_dir(out: Path) -> None:
    """``out`` is missing, empty or a previous demo run (its marker, and nothing the demo does not write); else a
    ``PolyalignError`` naming what is there."""
    if not out.exists() or (out.is_dir() and not [e for e in out.iterdir() if e.name != LOCK_NAME]):
        return
    if not out.is_dir():
        raise PolyalignError(f"{out} is a file, not a folder: pass another --out")
    foreign = _foreign_files(out)
    if foreign or not (out / DEMO_MARKER).is_file():
        what = (f"files the demo did not write ({', '.join(foreign[:5])}{', …' if len(foreign) > 5 else ''})"
                if foreign else f"a run the demo did not make (no {DEMO_MARKER} file)")
        raise PolyalignError(f"{out} holds {what}; the demo replaces only its own previous run: pass another --out, "
                             f"or move them away")


def start_demo_dir(out: Path) -> None:
    """Under the lock: delete the previous demo run's own files (only those), then mark ``out`` as the demo's."""
    check_demo_dir(out)  # again, now that no other process can write into it
    if (out / DEMO_MARKER).exists():
        print(f"replacing the previous demo run in {out}")
        ckpt = out / "checkpoints"
        own = [e for e in out.iterdir() if e.name != LOCK_NAME and _is_run_file(e)]
        if ckpt.is_dir():
            own += [f for f in ckpt.iterdir() if _is_checkpoint_file(f)]
        for f in own:
            f.unlink()
        if ckpt.is_dir() and not any(ckpt.iterdir()):
            ckpt.rmdir()
        if (events := out / TENSORBOARD_DIR).is_dir():  # train.report_to=tensorboard: the previous demo's events
            shutil.rmtree(events)
    write_json(out / DEMO_MARKER, {"made_by": "polyalign demo", "started": time.strftime("%Y-%m-%d %H:%M:%S")})
