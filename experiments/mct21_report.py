"""Issue 21, item 4: the tables of experiments/mct21.sh's runs (markdown on stdout).

    python experiments/mct21_report.py [OUT]      # OUT: runs/mct21 (the layout experiments/mct21.sh writes)

Per dataset and caption fraction: each row's probes, tagging mAP and retrieval R@1 (mean ± std over seeds); the
gain of each probe / tagging figure over the untrained tower (paired by seed: the run's step 0; emoji: a random
EfficientNet-Lite0) and over the ImageNet-pretrained tower's features (one reference; its figures do not depend on
the seed); the paired differences intra + inter − inter only and − image-intra only (and what text-text and tags
add); 95% t-intervals over the seeds, `*` where the interval excludes 0. Then the operating point: each term's
loss early and late in training, throughput and wall time.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from polyalign.app.sweep import paired_diff
from report_lib import fmt_diff, fmt_stat, log_rows, seeds_of, table, values, vs_constant

ROWS = [("inter", "inter only"), ("inter-full", "inter only, batches of captioned items"),
        ("inter-half", "inter only, half of each batch captioned"),
        ("intra-inter-half", "intra + inter, half of each batch captioned"),
        ("intra-inter-w01-half", "intra + inter, image-image weight 0.1, half of each batch captioned"),
        ("image", "image-intra only"), ("intra-inter", "intra + inter"),
        ("text", "+ text-text"), ("tags", "+ tags"), ("intra-inter-w01", "intra + inter, image-image weight 0.1"),
        # emoji controls (experiments/mct21.sh VIEW_ROWS=1): SimCLR's own-image positives instead of the style ones
        ("image-view", "image-intra only, view positives"), ("intra-inter-view", "intra + inter, view positives")]
DATASETS = {
    "shapes": {"fraction": "0.05", "title": "shapes (20,000 training scenes; probes on the 2,000 test scenes)",
               "probes": ["probe/shape_acc", "probe/colour_acc", "probe/count_acc", "tagging/probe_mAP"]},
    "emoji": {"fraction": "0.1", "title": "four-style emoji, held-out style (train google, fluent, emojione; "
                                          "test twitter)",
              "probes": ["probe/subcategory_acc", "tagging/probe_mAP"]},
}
RETRIEVAL = ["retrieval/t2i_R@1", "retrieval/i2t_R@1"]
SHORT = {"probe/shape_acc": "probe shape", "probe/colour_acc": "probe colour", "probe/count_acc": "probe count",
         "probe/subcategory_acc": "probe subcategory", "tagging/probe_mAP": "tag mAP (probe)",
         "tagging/head_mAP": "tag mAP (head)", "retrieval/t2i_R@1": "t2i R@1", "retrieval/i2t_R@1": "i2t R@1"}
LOSSES = ["clip_loss", "image_image_loss", "text_text_loss", "tags_loss"]


def row_runs(root: Path, frac: str, row: str) -> dict[int, Path]:
    return seeds_of(root / row) if row.startswith("image") else seeds_of(root / frac / row)


def finished_rows(root: Path, fracs: list[str]):
    """(fraction, row label, {seed: run}) of every row with a finished run, in table order."""
    for frac in fracs:
        for row, label in ROWS:
            if runs := row_runs(root, frac, row):
                yield frac, label, runs


def log_losses(run: Path) -> dict[str, tuple[float, float]]:
    """Each logged loss term: (mean over the first 10 % of the logged steps, mean over the last 10 %)."""
    rows = log_rows(run)
    out = {}
    for k in LOSSES:
        xs = [r[k] for r in rows if k in r]
        if xs:
            n = max(1, len(xs) // 10)
            out[k] = (statistics.fmean(xs[:n]), statistics.fmean(xs[-n:]))
    return out


def report(out: Path, ds: str) -> str:
    spec, root = DATASETS[ds], out / ds
    fracs = ["f1", f"f{spec['fraction']}"]
    metrics = spec["probes"] + RETRIEVAL
    untrained, imagenet = seeds_of(root / "untrained"), seeds_of(root / "imagenet")
    if not any(row_runs(root, f, r) for f in fracs for r, _ in ROWS):
        return f"## {ds}: no finished runs under {root}\n"
    lines = [f"## {spec['title']}\n"]

    head = ["caption fraction", "row", "seeds"] + [SHORT[m] for m in metrics] + ["tag mAP (head)"]
    body = []
    for name, runs in (("untrained tower", untrained), ("ImageNet tower (locked)", imagenet)):
        if runs:
            body.append(["–", name, str(len(runs))] + [fmt_stat(values(runs, m)) for m in metrics] + ["–"])
    for frac, label, runs in finished_rows(root, fracs):
        body.append([frac[1:], label, str(len(runs))] + [fmt_stat(values(runs, m)) for m in metrics] +
                    [fmt_stat(values(runs, "tagging/head_mAP"))])
    lines += ["Mean ± std over the seeds (image-intra only reads no caption: one run per seed, shown at both "
              "fractions; retrieval of the references is chance: their heads are untrained).\n", table(head, body)]

    head = ["caption fraction", "row"] + [f"{SHORT[m]}: Δ vs {ref}" for m in spec["probes"]
                                          for ref in ("untrained", "ImageNet")]
    body = []
    for frac, label, runs in finished_rows(root, fracs):
        cells = []
        for m in spec["probes"]:
            v = values(runs, m)
            cells += [fmt_diff(paired_diff(values(untrained, m), v)) if untrained else "–",
                      fmt_diff(vs_constant(v, values(imagenet, m))) if imagenet else "–"]
        body.append([frac[1:], label] + cells)
    lines += ["Gains over the references: Δ vs untrained paired by seed (each seed's own step 0); Δ vs ImageNet: "
              "each seed minus the one ImageNet reference; mean [95% t-interval over the seeds], * excludes 0.\n",
              table(head, body)]

    pairs = [("intra-inter", "inter", "intra + inter − inter only"),
             ("intra-inter", "image", "intra + inter − image-intra only"),
             ("text", "intra-inter", "+ text-text − intra + inter"), ("tags", "text", "+ tags − + text-text"),
             ("tags", "inter", "+ tags − inter only"),
             ("intra-inter-view", "inter", "intra + inter (view) − inter only"),
             ("intra-inter-view", "image-view", "intra + inter (view) − image-intra only (view)"),
             ("intra-inter", "intra-inter-view", "intra + inter: style − view positives"),
             ("intra-inter-w01", "inter", "intra + inter (w 0.1) − inter only"),
             ("intra-inter-w01", "image", "intra + inter (w 0.1) − image-intra only"),
             ("intra-inter-w01", "intra-inter", "image-image weight 0.1 − 1"),
             ("intra-inter", "inter-full", "intra + inter − inter only (captioned batches)"),
             ("inter-full", "inter", "inter only: captioned batches − mixed batches"),
             ("intra-inter-half", "inter-half", "intra + inter − inter only (half captioned)"),
             ("intra-inter-half", "inter-full", "intra + inter (half captioned) − inter only (captioned batches)"),
             ("intra-inter-half", "image", "intra + inter (half captioned) − image-intra only"),
             ("intra-inter-half", "intra-inter", "intra + inter: half captioned − as they come"),
             ("intra-inter-w01-half", "inter-half", "intra + inter (w 0.1, half capt.) − inter only (half capt.)"),
             ("intra-inter-w01-half", "inter-full",
              "intra + inter (w 0.1, half captioned) − inter only (captioned batches)"),
             ("intra-inter-w01-half", "intra-inter-half", "half captioned: image-image weight 0.1 − 1")]
    head = ["caption fraction", "difference"] + [SHORT[m] for m in metrics]
    body, verdict = [], []
    for frac in fracs:
        for a, b, label in pairs:
            ra, rb = row_runs(root, frac, a), row_runs(root, frac, b)
            if ra and rb:
                body.append([frac[1:], label] + [fmt_diff(paired_diff(values(rb, m), values(ra, m))) for m in metrics])
        for combo, alone, what, inter in (
                ("intra-inter", "image", "", "inter"), ("intra-inter-view", "image-view", ", view positives", "inter"),
                ("intra-inter-w01", "image", ", image-image weight 0.1", "inter"),
                ("intra-inter", "image", ", inter only on captioned batches", "inter-full"),
                ("intra-inter-half", "image", ", half of each batch captioned", "inter-half"),
                ("intra-inter-half", "image", ", half captioned vs inter only on captioned batches", "inter-full"),
                ("intra-inter-w01-half", "image", ", image-image weight 0.1, half of each batch captioned",
                 "inter-half"),
                ("intra-inter-w01-half", "image", ", weight 0.1, half captioned vs inter only on captioned batches",
                 "inter-full")):
            ri, rn, rm = (row_runs(root, frac, r) for r in (combo, inter, alone))
            if not (ri and rn and rm):
                continue
            for m in spec["probes"]:  # retrieval: the image-intra rows train no text tower (chance by design)
                d1, d2 = paired_diff(values(rn, m), values(ri, m)), paired_diff(values(rm, m), values(ri, m))
                if d1["low"] is None or d2["low"] is None:
                    continue
                word = ("holds" if d1["low"] > 0 and d2["low"] > 0 else
                        "fails (worse than one alone)" if d1["high"] < 0 or d2["high"] < 0 else "not shown")
                verdict.append(f"- f = {frac[1:]}{what}, {SHORT[m]}: MCT's claim (intra + inter above both) "
                               f"**{word}** (vs inter {d1['mean']:+.3f}, vs image-intra {d2['mean']:+.3f})")
    lines += ["Paired differences (by seed), mean [95% t-interval over the seeds], * excludes 0.\n",
              table(head, body), *verdict, ""]

    head = ["caption fraction", "row"] + [f"{k.removesuffix('_loss')} loss first→last 10 %" for k in LOSSES] + \
        ["samples/s", "wall min (mean, max)"]
    body = []
    for frac, label, runs in finished_rows(root, fracs):
        per = [log_losses(p) for p in runs.values()]
        cells = []
        for k in LOSSES:
            got = [x[k] for x in per if k in x]
            cells.append(f"{statistics.fmean(a for a, _ in got):.3f} → {statistics.fmean(b for _, b in got):.3f}"
                         if got else "–")
        sps = values(runs, "train/samples_per_s")
        walls = [int(w.read_text()) / 60 for p in runs.values() if (w := p.with_suffix(".wall")).is_file()]
        cells += [f"{statistics.fmean(sps.values()):.0f}" if sps else "–",
                  f"{statistics.fmean(walls):.1f}, {max(walls):.1f}" if walls else "–"]
        body.append([frac[1:], label] + cells)
    lines += ["Operating point: each term's training loss (mean over seeds of the first and last 10 % of the "
              "logged steps; NT-Xent at chance is ln(2B − 1) = 5.54 for B = 128, before the 1/τ sharpening), "
              "training throughput and wall time per run (training + evaluation).\n", table(head, body)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default="runs/mct21")
    p.add_argument("--datasets", default="shapes,emoji")
    a = p.parse_args()
    print("\n".join(report(Path(a.out), ds) for ds in a.datasets.split(",") if ds))


if __name__ == "__main__":
    main()
