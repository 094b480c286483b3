"""A run directory: its resolved config, tokenizer, checkpoints and metrics; shared by train and eval."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import Config, load_config
from .data.base import ImageTextDataset
from .encoders.text import resolve_hf_path
from .errors import PolyalignError
from .model import ContrastiveModel, build_model
from .tokenizer import Tokenizer
from .train.checkpoint import find_checkpoint, load_weights


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


def load_run(run_dir: Path, which: str = "latest", overrides: list[str] = ()) -> tuple[Config, ContrastiveModel, Tokenizer]:
    """Config, model (weights of the ``which`` checkpoint, eval mode) and tokenizer of a finished or running run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise PolyalignError(f"{run_dir} is not a polyalign run (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", overrides)
    step = find_checkpoint(run_dir / "checkpoints", which)
    if step is None:
        raise PolyalignError(f"{run_dir} has no '{which}' checkpoint")
    tok = Tokenizer.load(run_dir / "tokenizer.json", cfg.model.text.context_length)
    model = build_model(cfg.model, cfg.data.image_size, tok.vocab_size)
    model.load_state_dict(load_weights(run_dir / "checkpoints", step))
    return cfg, model.eval(), tok


def evaluate_run(cfg: Config, model: torch.nn.Module, tok: Tokenizer, datasets: dict, run_dir: Path | None) -> dict:
    """Retrieval, zero-shot and linear probe on the test split (or val when there is no test split)."""
    from .eval import evaluate

    test = datasets.get("test") or datasets.get("val")
    if test is None:
        print("no val/test split configured: skipping evaluation")
        return {}
    e = cfg.eval
    with torch.random.fork_rng():  # evaluation must not move the training RNG (exact resume)
        return evaluate(model, tok, datasets["train"], test, batch_size=e.batch_size,
                        zeroshot_fields=e.zeroshot_fields or None, templates=e.templates or None,
                        probe_field=e.probe_field or None, probe_max_train=e.probe_max_train,
                        max_captions=e.max_captions, chunk_size=e.chunk_size, precision=e.precision, out_dir=run_dir,
                        n_examples=e.n_examples)


def write_metrics(run_dir: Path, metrics: dict) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
