"""Eight shapes_clutter test scenes with their captions, as one PNG (docs/img/shapes-clutter.png).

    python experiments/clutter_examples.py                       # 64 px, the default image size
    python experiments/clutter_examples.py --image-size 48 --out /tmp/clutter-48.png
    python experiments/clutter_examples.py --baselines      # t2i mAP without binding, per data.clutter_share
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from polyalign.data.shapes_clutter import DEFAULT_IMAGE_SIZE, ShapesClutterDataset  # noqa: E402
from polyalign.eval.containment import attribute_baselines  # noqa: E402


def print_baselines(seed: int) -> None:
    """The model-free reference rankings of ``attribute_baselines`` on the 2,000 test scenes, per share."""
    print("| data.clutter_share | chance | colour only | shape only | bag of attributes (unbound) |")
    print("|---|---|---|---|---|")
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        b = attribute_baselines(ShapesClutterDataset("test", 2000, 32, seed=seed, share=share))
        print(f"| {share:g} | {b['chance']:.3f} | {b['colour']:.3f} | {b['shape']:.3f} | {b['bag']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    ap.add_argument("--out", type=Path, default=Path("docs/img/shapes-clutter.png"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baselines", action="store_true", help="print the model-free reference mAPs instead")
    args = ap.parse_args()
    if args.baselines:
        return print_baselines(args.seed)
    ds = ShapesClutterDataset("test", 8, args.image_size, seed=args.seed)
    fig, axes = plt.subplots(2, 4, figsize=(10, 7.2))
    for i, ax in enumerate(axes.flat):
        ax.imshow(ds.images[i], interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        text = "\n".join(textwrap.shorten(c, 40) for c in ds.captions(i))
        ax.set_xlabel(text, fontsize=7.5, loc="left", verticalalignment="top")
    fig.suptitle(f"data.name=shapes_clutter, test split, {args.image_size} px: one caption per object", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
