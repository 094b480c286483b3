"""Cut the C-MCR memories of an embedding folder to M rows (experiments/cmcr4.sh, memory-size scaling).

    python experiments/cmcr4_subsample.py EMB_DIR M [NAME ...] [--tag m]

Writes NAME.<tag>M.npy / .ids.txt for each NAME (default memory_image_x memory_audio_y; tag m): the rows of a fixed
permutation (seed 0), so every seed of the spaces gets the same items. Files of equal length get the same rows
(paired files stay paired: the real-pairs baseline cuts pair_image_x and memory_audio_y with tag p).
"""
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    args = sys.argv[1:]
    tag = "m"
    if "--tag" in args:
        tag = args.pop(args.index("--tag") + 1)
        args.remove("--tag")
    emb_dir, m = Path(args[0]), int(args[1])
    for name in args[2:] or ("memory_image_x", "memory_audio_y"):
        emb = np.load(emb_dir / f"{name}.npy")
        ids = (emb_dir / f"{name}.ids.txt").read_text().splitlines()
        keep = np.sort(np.random.default_rng(0).permutation(len(ids))[:m])
        np.save(emb_dir / f"{name}.{tag}{m}.npy", emb[keep])
        (emb_dir / f"{name}.{tag}{m}.ids.txt").write_text("".join(ids[i] + "\n" for i in keep))
        print(f"{name}: {len(keep)} of {len(ids)} rows")


if __name__ == "__main__":
    main()
