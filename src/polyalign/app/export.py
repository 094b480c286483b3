"""Export a trained run's embeddings as files ``polyalign connect`` reads: ``PREFIX.npy`` (N, D) float32,
L2-normalised, ``PREFIX.ids.txt`` (one id per row) and, with a label field, ``PREFIX.labels.txt`` (one class name
per row).

What to embed (one source per call):
  - ``split``: items of the run's own data config (``data.*`` overrides pick other data, e.g. ``data.seed=1``);
    ids are the item indices, so two runs whose datasets align item by item (``ShapesDataset`` and ``ShapesAudio``
    of one split and seed) give paired files;
  - ``manifest``: an image–text manifest (image or text) or a speech manifest (``polyalign data speech``; audio
    or text); ids are the row field ``id_field`` (default: the row's index, from 0). Every row must be usable;
  - ``texts``: a text file, one text per line (ids: the texts);
  - ``classes``: the zero-shot class embeddings of a label field of ``split``'s data (the mean of the prompt
    templates' embeddings; ids: the class names), for ``eval.classes`` of a connect config.
Text rows are the distinct captions of the items (ids: the texts themselves), so two runs embed the same texts
under the same ids and ``connect`` joins them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from polyalign.errors import ConfigError, DataError


def _write(prefix: Path, emb: torch.Tensor, ids: list[str], labels: list[str] | None, meta: dict) -> dict:
    """``PREFIX.npy``, ``PREFIX.ids.txt``, ``PREFIX.labels.txt`` (with labels) and ``PREFIX.meta.json`` (the source)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    emb = torch.nn.functional.normalize(emb.float().cpu(), dim=-1)
    np.save(prefix.with_name(prefix.name + ".npy"), emb.numpy())
    bad = [i for i in ids if not i.strip() or "\n" in i or i != i.strip()]
    if bad:
        raise DataError(f"ids must be non-empty single-line strings without surrounding spaces; e.g. {bad[:3]!r}")
    prefix.with_name(prefix.name + ".ids.txt").write_text("".join(i + "\n" for i in ids))
    if labels is not None:
        prefix.with_name(prefix.name + ".labels.txt").write_text("".join(lab + "\n" for lab in labels))
    info = {"rows": emb.shape[0], "dim": emb.shape[1], "file": str(prefix.with_name(prefix.name + ".npy"))}
    prefix.with_name(prefix.name + ".meta.json").write_text(json.dumps({**meta, **info}, indent=2))
    return info


def _manifest_dataset(path: Path, modality: str, image_size: int, label_field: str):
    """The manifest's dataset (every row checked, none may be bad) and its rows in dataset order."""
    from polyalign.data.manifest import read_rows

    rows = [row for _, row in read_rows(path)]
    fields = (label_field,) if label_field else ("label",)
    if rows and isinstance(rows[0], dict) and "audio" in rows[0]:
        from polyalign.data.audio import SpeechManifest

        ds = SpeechManifest(path, max_bad_fraction=0.0, label_fields=fields)
    else:
        if modality == "audio":
            raise DataError(f"{path} is not a speech manifest (its rows name no 'audio'): nothing to embed as audio")
        from polyalign.data.manifest import ManifestDataset

        ds = ManifestDataset(path, image_size, max_bad_fraction=0.0, label_fields=fields, show_progress=False)
    return ds, rows


def export_embeddings(run_dir: str | Path, modality: str, out: str | Path, *, split: str = "",
                      manifest: str = "", texts: str = "", classes: str = "", overrides: list[str] = (),
                      id_field: str = "", label_field: str = "", which: str = "latest",
                      batch_size: int = 256) -> dict:
    """Embed one source (see the module docstring) with the run's ``modality`` tower; returns a summary dict."""
    from polyalign.data.build import build_datasets
    from polyalign.app.runs import load_run
    from polyalign.eval.embed import embed_items, embed_texts
    from polyalign.eval.run import _templates_for
    from polyalign.eval.zeroshot import zeroshot_classifier

    if sum(bool(x) for x in (split, manifest, texts)) != 1 or (classes and texts):
        raise ConfigError("name exactly one source: --split, --manifest or --texts (--classes FIELD takes the class "
                          "names of --split's or --manifest's data)")
    cfg, model, tok = load_run(Path(run_dir), which, list(overrides))
    meta = {"run": str(run_dir), "checkpoint": which, "modality": modality, "split": split, "manifest": manifest,
            "texts": texts, "classes": classes, "overrides": list(overrides)}
    if modality not in cfg.model.modalities:
        raise ConfigError(f"the run's towers read {', '.join(cfg.model.modalities)}, not {modality}")
    prefix = Path(out)
    if texts or classes:
        if modality != "text":
            raise ConfigError("--texts and --classes embed text: use --modality text")
    if texts:
        lines = list(dict.fromkeys(t.strip() for t in Path(texts).read_text().splitlines() if t.strip()))
        return _write(prefix, embed_texts(model, tok, lines, batch_size), lines, None, meta)

    labels = None
    if manifest:
        ds, rows = _manifest_dataset(Path(manifest), modality, cfg.data.image_size, label_field)
        if len(ds) != len(rows):
            raise DataError(f"{manifest}: {len(rows) - len(ds)} unusable rows; fix them before exporting")
        ids = [str(r.get(id_field, "")) if id_field else str(n) for n, r in enumerate(rows)]
        if id_field and any(r.get(id_field) is None for r in rows):
            raise DataError(f"{manifest}: some rows have no field {id_field!r}")
        if label_field:
            labels = [str(r.get(label_field, "")) for r in rows]
    else:
        sets = build_datasets(cfg.data, cfg.train.seed, show_progress=False)
        if split not in sets:
            raise ConfigError(f"the run's data has no {split!r} split (it has {', '.join(sets)})")
        ds, ids = sets[split], [str(i) for i in range(len(sets[split]))]
        if label_field:
            names = ds.label_names.get(label_field)
            if names is None:
                raise ConfigError(f"{label_field!r} is not a label field of the data ({', '.join(ds.label_names)})")
            labels = [names[ds.labels(i)[label_field]] if label_field in ds.labels(i) else "" for i in range(len(ds))]

    if classes:
        names = ds.label_names.get(classes)
        if names is None:
            raise ConfigError(f"{classes!r} is not a label field of the data ({', '.join(ds.label_names) or 'none'})")
        weights = zeroshot_classifier(model, tok, names, _templates_for(ds, classes, cfg.eval.templates or None),
                                      batch_size)
        return _write(prefix, weights, list(names), None, meta)
    if modality == "text":  # the distinct captions of the items
        caps = list(dict.fromkeys(c.strip() for i in range(len(ds)) for c in ds.captions(i) if c.strip()))
        return _write(prefix, embed_texts(model, tok, caps, batch_size), caps, None, meta)
    if labels is not None and "" in labels:
        raise DataError(f"{labels.count('')} items carry no {label_field!r} label")
    return _write(prefix, embed_items(model, ds, modality, batch_size), ids, labels, meta)
