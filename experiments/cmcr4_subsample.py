"""Cut the C-MCR memories of an embedding folder to M rows (experiments/cmcr4.sh, memory-size scaling).

    python experiments/cmcr4_subsample.py EMB_DIR M

Writes memory_image_x.mM.npy / .ids.txt and memory_audio_y.mM.npy / .ids.txt: the rows of a fixed permutation
(seed 0) of each memory, so every seed of the spaces gets the same items.
"""
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    emb_dir, m = Path(sys.argv[1]), int(sys.argv[2])
    for name in ("memory_image_x", "memory_audio_y"):
        emb = np.load(emb_dir / f"{name}.npy")
        ids = (emb_dir / f"{name}.ids.txt").read_text().splitlines()
        keep = np.sort(np.random.default_rng(0).permutation(len(ids))[:m])
        np.save(emb_dir / f"{name}.m{m}.npy", emb[keep])
        (emb_dir / f"{name}.m{m}.ids.txt").write_text("".join(ids[i] + "\n" for i in keep))
        print(f"{name}: {len(keep)} of {len(ids)} rows")


if __name__ == "__main__":
    main()
