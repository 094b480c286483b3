"""Per-word Grad-CAM pictures of a trained fusion run (ALBEF's visualisation, arXiv 2107.07651; the maps behind the
soft masks of arXiv 2304.00719), plus a pointing-game score on the shapes data.

For sample test pairs, ``gradcam-<item>.png`` shows the image and one heat map per caption word. On shapes scenes
the objects' boxes are known, so for every word that names the colour or the shape of exactly one object in the
scene we check whether the map's peak lies inside that object's box: the **pointing-game** accuracy, next to the
chance level (the mean fraction of the image that the box covers).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch

from polyalign.errors import PolyalignError
from polyalign.app.gradcam_plot import plot_word_gradcam
from polyalign.eval.pointing import point_hit, scene_boxes

SPECIALS = {"[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"}


def _words(tok, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, str]]:
    """(position, piece) of the caption's real, non-special tokens."""
    out = []
    for pos in torch.nonzero(mask, as_tuple=False).flatten().tolist():
        piece = tok.tok.id_to_token(int(ids[pos])) or "?"
        if piece not in SPECIALS:
            out.append((pos, piece.replace("\u2581", "").replace("##", "") or piece))
    return out


def _pointing(words, maps, boxes, size: int) -> list[dict]:
    """For each word naming the colour or shape of exactly one object: is the map's peak inside its box?"""
    trials = []
    for (pos, word), cam in zip(words, maps):
        owners = [b for b in boxes if word in (b["colour"], b["shape"])]
        if len(owners) != 1:
            continue
        hit, area = point_hit(cam, owners[0]["box"], size)
        trials.append({"word": word, "hit": hit, "box_fraction": area})
    return trials


def inspect_gradcam(run_dir: str | Path, out: str | Path | None = None, n_pictures: int = 8, max_items: int = 500,
                    split: str = "test", layer: int | None = None, words: list[str] = ()) -> Path:
    """Write the pictures and ``report.json`` (+ ``report.html``) into ``out`` (default RUN_DIR/inspect-gradcam).
    ``words``: draw only items whose first caption names one of them (e.g. ``["red", "star"]``); the pointing game
    still scores every item."""
    from polyalign.data.build import build_datasets
    from polyalign.models.heads.gradcam import itm_gradcam
    from polyalign.app.runs import load_run
    from polyalign.models.fusion import FusionModel

    run_dir = Path(run_dir)
    cfg, model, tok = load_run(run_dir)
    if not isinstance(model, FusionModel):
        raise PolyalignError(f"{run_dir} is not a fusion run (Grad-CAM needs the itm loss term and its fusion model)")
    if not model.has_itm:
        raise PolyalignError(f"{run_dir} trained no ITM head (loss.weights.itm is 0): there is no match score to explain")
    ds = build_datasets(cfg.data, cfg.train.seed, show_progress=False).get(split)
    if ds is None:
        raise PolyalignError(f"{run_dir}: the data config has no {split!r} split")
    out = Path(out) if out else run_dir / "inspect-gradcam"
    out.mkdir(parents=True, exist_ok=True)

    n = min(len(ds), max_items)
    items = [round(j * (len(ds) - 1) / max(n - 1, 1)) for j in range(n)]
    candidates = items
    if words:
        wanted = {w.lower() for w in words}
        candidates = [i for i in items if wanted & set(ds.captions(i)[0].lower().split())]
        if not candidates:
            raise PolyalignError(f"no caption among the {len(items)} {split} items names any of {sorted(wanted)}")
    multi = [i for i in candidates if len(getattr(ds, "objects", lambda _: [None])(i)) > 1]  # shapes: crowded first
    shown = set(list(dict.fromkeys(multi + candidates))[:n_pictures])  # crowded scenes first, no repeats
    trials, pictures = [], []
    for i in items:
        caption = ds.captions(i)[0]
        ids, mask = tok([caption])
        image = ds.image(i)
        maps = itm_gradcam(model, image[None].float() / 255, ids, mask, layer)[0]  # (L, N)
        words = _words(tok, ids[0], mask[0])
        word_maps = maps[[p for p, _ in words]]
        boxes = scene_boxes(ds, i)
        if boxes is not None:
            for t in _pointing(words, word_maps, boxes, image.shape[-1]):
                trials.append({"item": i, **t})
        if i in shown:
            path = out / f"gradcam-{i}.png"
            plot_word_gradcam(path, image, [w for _, w in words], word_maps)
            pictures.append({"item": i, "caption": caption, "png": path.name})
    report = {"run": str(run_dir), "split": split, "items": len(items), "pictures": pictures}
    if trials:
        report["pointing"] = {"trials": len(trials), "accuracy": float(np.mean([t["hit"] for t in trials])),
                              "chance": float(np.mean([t["box_fraction"] for t in trials])),
                              "by_word": _by_word(trials)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.html").write_text(_html(report))
    return out


def _by_word(trials: list[dict]) -> dict[str, dict]:
    words = sorted({t["word"] for t in trials})
    return {w: {"trials": sum(t["word"] == w for t in trials),
                "accuracy": float(np.mean([t["hit"] for t in trials if t["word"] == w]))} for w in words}


def _html(r: dict) -> str:
    p = r.get("pointing")
    score = (f"<p>Pointing game over {p['trials']} words that name the colour or shape of one object: peak inside "
             f"the object's box <b>{p['accuracy']:.3f}</b> (chance {p['chance']:.3f}).</p>") if p else ""
    figs = "".join(f"<h3>{html.escape(x['caption'])}</h3><img src=\"{x['png']}\">" for x in r["pictures"])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Grad-CAM: {html.escape(r['run'])}</title></head>"
            f"<body style='font-family:sans-serif'><h1>Per-word Grad-CAM of {html.escape(r['run'])}</h1>{score}{figs}"
            f"</body></html>")
