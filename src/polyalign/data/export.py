"""Write any dataset out as PNG files plus a JSONL manifest (the format ManifestDataset reads)."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from polyalign.data.base import ImageTextDataset


def export_manifest(ds: ImageTextDataset, out_dir: str | Path, name: str, label_field: str | None = None) -> Path:
    """``out_dir/name/<i>.png`` and ``out_dir/name.jsonl`` with captions, tags and (optionally) one label field."""
    out_dir = Path(out_dir)
    (out_dir / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in tqdm(range(len(ds)), desc=f"export {name}", disable=None):
        rel = f"{name}/{i:06d}.png"
        Image.fromarray(ds.image(i).permute(1, 2, 0).numpy()).save(out_dir / rel)
        row = {"image": rel, "captions": ds.captions(i), "tags": ds.tags(i)}
        labels = ds.labels(i)
        if label_field and label_field in labels:
            row["label"] = ds.label_names[label_field][labels[label_field]]
        rows.append(row)
    path = out_dir / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
