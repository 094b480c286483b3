"""What a trained FDT run's discrete tokens mean (arXiv 2303.14865): a report of PNGs + HTML + JSON.

- ``samples.png``: for sample test images and their captions, the top active tokens of each and their weights
  (tokens active in both are marked);
- ``tokens.png``: for the most used tokens, the words that activate them most and the images whose weight on the
  token is largest, with the token's relevance over the image patches as a heat map;
- ``report.html`` shows both with the same facts as text; ``report.json`` holds the numbers (usage, sparsity).
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from polyalign.errors import PolyalignError
from polyalign.eval.pointing import upsample_map


@torch.no_grad()
def _weights(model, tok, ds, idx: list[int], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """FDT weights (n, C) of the images and of each image's first caption."""
    wi, wt = [], []
    for s in range(0, len(idx), batch):
        part = idx[s:s + batch]
        wi.append(model.fdt_image_weights(torch.stack([ds.image(i) for i in part]).float() / 255))
        wt.append(model.fdt_text_weights(*tok([ds.captions(i)[0] for i in part])))
    return torch.cat(wi), torch.cat(wt)


@torch.no_grad()
def _top_words(model, tok, captions: list[str], token_ids: list[int], k: int, batch: int = 256) -> dict[int, list]:
    """For each codebook entry: the ``k`` distinct words (tokenizer pieces) of ``captions`` most relevant to it."""
    best: dict[int, dict[str, float]] = {c: {} for c in token_ids}
    cols = torch.tensor(token_ids)
    specials = {"[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"}
    for s in range(0, len(captions), batch):
        ids, mask = tok(captions[s:s + batch])
        rel = model.fdt_text_relevance(ids, mask)[:, :, cols]  # (b, L', k) padding −inf
        ids = ids[:, :rel.shape[1]]
        for b, pos in torch.nonzero(mask[:, :rel.shape[1]], as_tuple=False).tolist():
            word = tok.tok.id_to_token(int(ids[b, pos])) or "?"
            if word in specials:
                continue
            word = word.replace("\u2581", "").replace("##", "") or word
            for j, c in enumerate(token_ids):
                v = float(rel[b, pos, j])
                if v > best[c].get(word, -math.inf):
                    best[c][word] = v
    return {c: sorted(best[c].items(), key=lambda kv: -kv[1])[:k] for c in token_ids}


@torch.no_grad()
def _heat(model, images: torch.Tensor, c: int) -> torch.Tensor:
    """Relevance of each patch to entry ``c``, min-max normalised and upsampled to the image size: (b, H, W)."""
    rel = model.fdt_image_relevance(images.float() / 255)[:, :, c]  # (b, N)
    try:
        return torch.stack([upsample_map(r, tuple(images.shape[-2:])) for r in rel])
    except ValueError as e:  # not a square patch grid
        raise PolyalignError(str(e)) from None


def _canvas(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_samples(path: Path, ds, idx, wi, wt, k: int) -> list[dict]:
    rows, fig = [], _canvas(10, 2.2 * len(idx))
    axes = fig.subplots(len(idx), 3, squeeze=False, width_ratios=[1, 2, 2])
    for r, i in enumerate(idx):
        ti, tt = wi[r].topk(k), wt[r].topk(k)
        img_top = [(int(c), float(v)) for v, c in zip(*ti) if v > 0]
        txt_top = [(int(c), float(v)) for v, c in zip(*tt) if v > 0]
        shared = {c for c, _ in img_top} & {c for c, _ in txt_top}
        caption = ds.captions(i)[0]
        rows.append({"index": i, "caption": caption, "image_tokens": img_top, "text_tokens": txt_top,
                     "shared": sorted(shared), "image_active": int((wi[r] > 0).sum()),
                     "text_active": int((wt[r] > 0).sum())})
        axes[r, 0].imshow(ds.image(i).permute(1, 2, 0).numpy())
        axes[r, 0].set_title(caption[:28], fontsize=8)
        axes[r, 0].axis("off")
        for ax, top, name in ((axes[r, 1], img_top, "image"), (axes[r, 2], txt_top, "caption")):
            labels = [f"#{c}" for c, _ in top]
            ax.barh(range(len(top)), [v for _, v in top],
                    color=["tab:orange" if c in shared else "tab:blue" for c, _ in top])
            ax.set_yticks(range(len(top)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{name}: top tokens (orange = also in the {'caption' if name == 'image' else 'image'})",
                         fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
    fig.savefig(path, dpi=90)
    return rows


def _plot_tokens(path: Path, model, ds, eval_idx, wi, tokens, words, n_images: int) -> list[dict]:
    rows, fig = [], _canvas(2 * (n_images + 1.5), 2 * len(tokens))
    axes = fig.subplots(len(tokens), n_images + 1, squeeze=False, width_ratios=[1.5] + [1] * n_images)
    for r, c in enumerate(tokens):
        top = wi[:, c].topk(n_images).indices.tolist()
        items = [eval_idx[j] for j in top]
        images = torch.stack([ds.image(i) for i in items])
        heat = _heat(model, images, c)
        rows.append({"token": c, "words": words[c], "images": items,
                     "image_weights": [float(wi[j, c]) for j in top]})
        axes[r, 0].text(0.0, 0.5, f"token #{c}\n" + "\n".join(w for w, _ in words[c][:6]), fontsize=9, va="center")
        axes[r, 0].axis("off")
        for ax, img, h, j in zip(axes[r, 1:], images, heat, top):
            ax.imshow(img.permute(1, 2, 0).numpy())
            ax.imshow(h.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(f"w={float(wi[j, c]):.2g}", fontsize=8)
            ax.axis("off")
    fig.savefig(path, dpi=90)
    return rows


def inspect_fdt(run_dir: str | Path, out: str | Path | None = None, n_samples: int = 6, n_tokens: int = 8,
                top_k: int = 8, n_images: int = 4, max_items: int = 2000, split: str = "test") -> Path:
    """Write the report for a trained FDT run into ``out`` (default RUN_DIR/inspect-fdt); returns that folder."""
    from polyalign.data.build import build_datasets
    from polyalign.app.runs import load_run

    run_dir = Path(run_dir)
    cfg, model, tok = load_run(run_dir)
    if getattr(model, "fdt", None) is None:
        raise PolyalignError(f"{run_dir} has no FDT head (loss.weights.fdt is 0 in its config)")
    datasets = build_datasets(cfg.data, cfg.train.seed, show_progress=False)
    if split not in datasets:
        raise PolyalignError(f"{run_dir}: the data config has no {split!r} split (has: {', '.join(datasets)})")
    ds = datasets[split]
    out = Path(out) if out else run_dir / "inspect-fdt"
    out.mkdir(parents=True, exist_ok=True)

    n = len(ds)
    eval_idx = sorted({round(j * (n - 1) / max(min(n, max_items) - 1, 1)) for j in range(min(n, max_items))})
    wi, wt = _weights(model, tok, ds, eval_idx)
    usage = (wi > 0).float().sum(0) + (wt > 0).float().sum(0)  # (C,) how often each entry is active
    tokens = usage.topk(min(n_tokens, int((usage > 0).sum()) or 1)).indices.tolist()
    captions = [ds.captions(i)[0] for i in eval_idx]
    words = _top_words(model, tok, captions, tokens, k=10)

    sample_pos = [round(j * (len(eval_idx) - 1) / max(n_samples - 1, 1)) for j in range(min(n_samples, len(eval_idx)))]
    samples = _plot_samples(out / "samples.png", ds, [eval_idx[p] for p in sample_pos], wi[sample_pos],
                            wt[sample_pos], top_k)
    token_rows = _plot_tokens(out / "tokens.png", model, ds, eval_idx, wi, tokens, words, n_images)
    report = {"run": str(run_dir), "split": split, "items": len(eval_idx), "codebook_size": int(wi.shape[1]),
              "mean_active_image": float((wi > 0).float().sum(1).mean()),
              "mean_active_text": float((wt > 0).float().sum(1).mean()),
              "entries_ever_active": int((usage > 0).sum()), "samples": samples, "tokens": token_rows}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.html").write_text(_html(report))
    return out


def _html(r: dict) -> str:
    esc = html.escape
    sample_rows = "".join(
        f"<tr><td>{s['index']}</td><td>{esc(s['caption'])}</td><td>{s['image_active']}</td><td>{s['text_active']}</td>"
        f"<td>{', '.join(f'#{c} {v:.2f}' for c, v in s['image_tokens'])}</td>"
        f"<td>{', '.join(f'#{c} {v:.2f}' for c, v in s['text_tokens'])}</td>"
        f"<td>{', '.join(f'#{c}' for c in s['shared'])}</td></tr>" for s in r["samples"])
    token_rows = "".join(f"<tr><td>#{t['token']}</td><td>{esc(', '.join(w for w, _ in t['words']))}</td></tr>"
                         for t in r["tokens"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>FDT tokens: {esc(r['run'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} td,th{{border:1px solid #ccc;padding:3px;font-size:13px}}
table{{border-collapse:collapse}}</style></head><body>
<h1>FDT tokens of {esc(r['run'])}</h1>
<p>{r['items']} {esc(r['split'])} items; codebook {r['codebook_size']} entries, {r['entries_ever_active']} ever active.
Mean active entries per image: <b>{r['mean_active_image']:.1f}</b>; per caption: <b>{r['mean_active_text']:.1f}</b>.</p>
<h2>Samples: top tokens of an image and of its caption</h2><img src="samples.png" style="max-width:100%">
<table><tr><th>item</th><th>caption</th><th>active (image)</th><th>active (caption)</th><th>image tokens</th>
<th>caption tokens</th><th>shared</th></tr>{sample_rows}</table>
<h2>Most used tokens: their words, and the images (with patch heat maps) that weigh them most</h2>
<img src="tokens.png" style="max-width:100%"><table><tr><th>token</th><th>most relevant words</th></tr>{token_rows}</table>
</body></html>"""
