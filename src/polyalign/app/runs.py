"""A run directory: its resolved config, tokenizer, checkpoints and metrics; shared by train and eval."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from polyalign.config import Config, load_config
from polyalign.data.base import ImageTextDataset, Views
from polyalign.data.tags import tag_vocabulary
from polyalign.config.checks import resolve_hf_path
from polyalign.errors import PolyalignError
from polyalign.models.build import build_model
from polyalign.models.interface import Model
from polyalign.tokenizer import Tokenizer, special_ids_of
from polyalign.train.checkpoint import find_checkpoint, load_weights


def prepare_tokenizer(cfg: Config, train_ds: ImageTextDataset, run_dir: Path) -> Tokenizer:
    """The run's tokenizer: reloaded if the run has one, else the HF tower's own, else BPE trained on captions."""
    path, ctx = run_dir / "tokenizer.json", cfg.model.text.context_length
    if path.exists():
        return Tokenizer.load(path, ctx)
    if cfg.model.text.kind == "hf":
        tok = Tokenizer.load(resolve_hf_path(cfg.model.text.hf_path) / "tokenizer.json", ctx)
    else:
        tok = Tokenizer.train(train_ds.all_captions(), cfg.model.text.vocab_size, ctx)
    tok.save(path)
    return tok


def prepare_views(cfg: Config, datasets: dict, run_dir: Path, main: bool = True) -> list[str]:
    """Configure what training samples carry for the active intra-modal terms (augmented views, a second
    caption, multi-hot tags) on the train and val splits; returns the tag vocabulary (saved as ``tags.json``)."""
    terms, d = cfg.loss.active(), cfg.data
    tag_names, path = [], run_dir / "tags.json"
    if "tags" in terms:
        if path.exists():  # a resumed run keeps its vocabulary
            tag_names = json.loads(path.read_text())
        else:
            train = datasets["train"]
            tag_names = tag_vocabulary((train.tags(i) for i in range(len(train))), d.tag_min_count, d.max_tags)
            if main and tag_names:
                path.write_text(json.dumps(tag_names))
    views = Views(augment=d.augment if d.augment.enabled else None, image_views=2 if "image_image" in terms else 1,
                  text_views=2 if "text_text" in terms else 1, word_drop=d.text_word_drop,
                  tag_index={t: i for i, t in enumerate(tag_names)} if tag_names else None)
    if views != Views(word_drop=d.text_word_drop):
        for split in ("train", "val"):
            if split in datasets:
                datasets[split].views = views
    return tag_names


def load_run(run_dir: Path, which: str = "latest", overrides: list[str] = ()) -> tuple[Config, Model, Tokenizer]:
    """Config, model (weights of the ``which`` checkpoint, eval mode) and tokenizer of a finished or running run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise PolyalignError(f"{run_dir} is not a polyalign run (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", overrides)
    step = find_checkpoint(run_dir / "checkpoints", which)
    if step is None:
        raise PolyalignError(f"{run_dir} has no '{which}' checkpoint")
    tok = Tokenizer.load(run_dir / "tokenizer.json", cfg.model.text.context_length)
    tags = run_dir / "tags.json"
    tag_names = json.loads(tags.read_text()) if tags.exists() else []
    model = build_model(cfg.model, cfg.data.image_size, tok.vocab_size, cfg.loss, tag_names,
                        special_ids_of(tok))
    model.load_state_dict(load_weights(run_dir / "checkpoints", step))
    return cfg, model.eval(), tok


def evaluate_run(cfg: Config, model: torch.nn.Module, tok: Tokenizer, datasets: dict, run_dir: Path | None) -> dict:
    """Retrieval, zero-shot (with a text tower) and linear probe on the test split (or val when there is none)."""
    from polyalign.eval import evaluate

    test = datasets.get("test") or datasets.get("val")
    if test is None:
        print("no val/test split configured: skipping evaluation")
        return {}
    e = cfg.eval
    with torch.random.fork_rng():  # evaluation must not move the training RNG (exact resume)
        metrics = evaluate(model, tok, datasets["train"], test, batch_size=e.batch_size,
                           zeroshot_fields=e.zeroshot_fields or None, templates=e.templates or None,
                           probe_field=e.probe_field or None, probe_max_train=e.probe_max_train,
                           max_captions=e.max_captions, chunk_size=e.chunk_size, precision=e.precision, out_dir=run_dir,
                           n_examples=e.n_examples, tag_min_count=cfg.data.tag_min_count, max_tags=cfg.data.max_tags,
                           modalities=cfg.model.modalities)
        if e.rerank_k and model.has_itm:  # fusion model: ITC top-k re-ranked by ITM, as ALBEF does
            from polyalign.eval.rerank import evaluate_rerank

            metrics |= evaluate_rerank(model, tok, test, k=e.rerank_k, max_captions=e.max_captions)
    return metrics


def write_metrics(run_dir: Path, metrics: dict) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
