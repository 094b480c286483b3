"""Connect two contrastive spaces that share a modality, from precomputed embeddings (C-MCR): the whole run.

Paper: Wang et al., "Connecting Multi-modal Contrastive Representations", NeurIPS 2023, arXiv 2305.14381;
``method.mode=anchor_x`` (X fixed, Y mapped into it) is inspired by Ex-MCR, arXiv 2310.08884, not its released recipe.

Space X aligns modalities (A, B), space Y aligns (B, C). From B items embedded in both spaces and *unpaired*
memories of A (in X) and C (in Y), one projector per space learns a common space in which A and C compare,
although no (A, C) pair is ever seen::

    files/tensors ─► pseudo pairs (once, clean) ─► noise + projectors + loss (per step) ─► ConnectedSpaces
                                                   └─► checkpoints/ (--resume)             └─► evaluate ─► metrics.json

Embedding files (``.npy`` + ids file, or ``.safetensors``): see ``polyalign.connect.embeddings``. B files are joined
by id (by row when neither has ids). Evaluation (``polyalign.connect.evaluate``) labels: ``NAME.txt`` (one class name
per line) or ``NAME.json`` (a list), aligned with the items. Besides the evaluation's metrics, metrics.json holds
``train/noise_std_x`` and ``train/noise_std_y`` (the noise std used in each space, see method.noise_scale).

``polyalign connect CONFIG.yaml [key=value ...] --out DIR [--resume]`` reads a config described in
``polyalign.config.connect``; ``--resume`` continues from ``DIR/checkpoints`` exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from polyalign.config.connect import ConnectConfig, load_connect_config
from polyalign.config.tree import to_dict
from polyalign.connect.data import load_inputs, load_shared
from polyalign.connect.embeddings import Log
from polyalign.connect.evaluate import check_eval_dims, evaluate, load_eval_sets, load_val_set, save_per_query
from polyalign.connect.model import ConnectedSpaces
from polyalign.connect.train import noise_stds, train_connection
from polyalign.errors import ConfigError
from polyalign.train.checkpoint import find_checkpoint, load_state
from polyalign.train.files import atomic_write, write_json


def _changed_keys(saved: Path, cfg: ConnectConfig) -> list[str]:
    """``section.key: old → new`` for each key of ``cfg`` that differs from the config saved at ``saved``."""
    old = (yaml.safe_load(saved.read_text()) or {}) if saved.is_file() else {}
    return [f"{s}.{k}: {old.get(s, {}).get(k)!r} → {v!r}" for s, section in to_dict(cfg).items()
            for k, v in section.items() if old.get(s, {}).get(k) != v]


def run_connect(cfg: ConnectConfig, out_dir: str | Path, resume: bool = False, log: Log = print) -> dict[str, float]:
    """Load the files, train (``resume``: from ``out_dir``'s latest checkpoint), save the model to ``out_dir``,
    evaluate; writes metrics.json, ranks.npz (per-query ranks, see ``evaluate``), log.jsonl, loss.png and
    checkpoints/. A run directory is never overwritten."""
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        log(msg)

    data = load_inputs(cfg.inputs, note, cfg.method.memories)
    retrieval, classify = load_eval_sets(cfg.eval, note)  # read before training: bad files fail early
    val = load_val_set(cfg.eval, note)
    check_eval_dims(data.dims, retrieval, classify, val)
    last = find_checkpoint(ckpt_dir)
    if not resume and (last is not None or is_connect_run(out)):
        held = f"checkpoint at step {last}" if last is not None else "a connected model"
        raise ConfigError(f"{out} already holds a connect run ({held}): pass --resume, or another --out")
    if resume and last is None:
        log(f"no checkpoint in {ckpt_dir}: starting from scratch")
    if last is not None and (changed := _changed_keys(out / "config.yaml", cfg)):
        log("warning: resuming with a changed config (the run is no longer exactly reproducible):\n  "
            + "\n  ".join(changed))
    out.mkdir(parents=True, exist_ok=True)

    def save_config() -> None:
        atomic_write(out / "config.yaml", lambda p: p.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False)))

    if last is None:
        save_config()
        (out / "log.jsonl").unlink(missing_ok=True)
    model, rows = train_connection(data, cfg, log, out / "log.jsonl", ckpt_dir)
    if last is not None:  # only now that the checkpoint fits cfg: a refused resume keeps the run's config.yaml
        save_config()
    model.save(out, cfg)
    per_query: dict = {}
    metrics = evaluate(model.cpu(), (data.b_x, data.b_y), retrieval, classify, cfg.eval.chunk_size, val,
                       cfg.method.tau_memory, per_query)
    save_per_query(out / "ranks.npz", per_query)
    std_x, std_y = noise_stds(cfg.method, data.dims)
    n_mem = [0 if m is None else m.shape[0] for m in (data.memory_a, data.memory_c)]
    metrics.update({"train/seconds": load_state(ckpt_dir, find_checkpoint(ckpt_dir))["seconds"],  # all sessions'
                    "train/final_loss": rows[-1]["loss"] if rows else float("nan"),
                    "inputs/n_b": data.b_x.shape[0], "inputs/n_memory_a": n_mem[0], "inputs/n_memory_c": n_mem[1],
                    "train/noise_std_x": std_x, "train/noise_std_y": std_y})
    write_json(out / "metrics.json", metrics)
    write_json(out / "inputs.json", {"notes": notes, "dims": list(data.dims)}, sort_keys=False)
    if rows:
        from polyalign.train.curves import plot_curves

        plot_curves(out / "log.jsonl", out / "loss.png")
    return metrics


def is_connect_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a connected model (``polyalign connect``'s output)."""
    return (Path(run_dir) / "connector.json").is_file()


def evaluate_connect_run(run_dir: str | Path, overrides: list[str] = (), log: Log = print) -> dict[str, float]:
    """`polyalign eval` of a connect run: the saved model on the eval sets of its config.yaml (``eval.*`` overrides
    point it at other files; ``inputs.b_x``/``inputs.b_y`` feed the pivot). Merged into metrics.json, kept atomic;
    ranks.npz replaced."""
    run = Path(run_dir)
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(("eval.", "inputs."))]
    if bad:
        raise ConfigError(f"polyalign eval of a connect run takes only eval.* and inputs.* overrides, got {bad}")
    cfg = load_connect_config(run / "config.yaml", overrides)
    model = ConnectedSpaces.load(run)
    retrieval, classify = load_eval_sets(cfg.eval, log)
    if retrieval is None and classify is None:
        raise ConfigError(f"{run / 'config.yaml'} names no evaluation set: give eval.a_test + eval.c_test, or "
                          "eval.classes + eval.items + eval.labels")
    shared = load_shared(cfg.inputs, log) if cfg.inputs.b_x and cfg.inputs.b_y else None  # the pivots'; no memories
    per_query: dict = {}
    metrics = evaluate(model, shared, retrieval, classify, cfg.eval.chunk_size, load_val_set(cfg.eval, log),
                       cfg.method.tau_memory, per_query)
    save_per_query(run / "ranks.npz", per_query)
    previous = run / "metrics.json"
    merged = {**(json.loads(previous.read_text()) if previous.exists() else {}), **metrics}
    write_json(previous, merged)
    return merged
