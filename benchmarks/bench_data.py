"""Data sections: the loader vs the train step (demo recipe and MCT views), and view augmentation."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch



LOADER_RECIPES = {  # name → overrides of the defaults (the shapes demo recipe)
    "demo (CLIP)": [],
    "MCT views (augment, 2 image views, caption view, tags)": [
        "data.augment.enabled=true", "data.augment.blur=0.5", "loss.weights.image_image=1",
        "loss.weights.text_text=0.5", "loss.weights.tags=1"],
}


def bench_loader(steps: int, name: str = "demo (CLIP)", overrides: list[str] = ()) -> dict:
    from polyalign.config import load_config
    from polyalign.data.build import build_datasets
    from polyalign.data.loader import make_loader
    from polyalign.models.build import build_model
    from polyalign.losses.objective import Objective
    from polyalign.tokenizer import Tokenizer
    from polyalign.data.loader import to_model_inputs

    from polyalign.app.runs import prepare_views

    cfg = load_config(None, list(overrides))  # the demo recipe: default workers, batch, model
    datasets = build_datasets(cfg.data, 0, show_progress=False)
    ds = datasets["train"]
    with tempfile.TemporaryDirectory() as tmp:
        tags = prepare_views(cfg, datasets, Path(tmp))  # views the active loss terms need
    tok = Tokenizer.train(ds.all_captions(), cfg.model.text.vocab_size, cfg.model.text.context_length)
    bs = cfg.train.batch_size
    batches = iter(make_loader(ds, tok, bs, 0, 0, cfg.data.num_workers))
    next(batches)
    t0 = time.perf_counter()
    for _ in range(steps):
        to_model_inputs(next(batches))
    loader_sps = steps * bs / (time.perf_counter() - t0)

    model = build_model(cfg.model, cfg.data.image_size, tok.vocab_size, cfg.loss, tags).train()
    objective = Objective(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fixed = to_model_inputs(next(batches))

    def step():
        opt.zero_grad(set_to_none=True)
        objective(model(fixed))["loss"].backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(max(steps // 4, 5)):
        step()
    train_sps = max(steps // 4, 5) * bs / (time.perf_counter() - t0)
    print(f"loader, {name}: {loader_sps:.0f} samples/s vs train step {train_sps:.0f} samples/s "
          f"({loader_sps / train_sps:.1f}×, {cfg.data.num_workers} workers)", flush=True)
    return {"recipe": name, "workers": cfg.data.num_workers, "batch": bs, "loader_samples_per_s": loader_sps,
            "train_samples_per_s": train_sps, "ratio": loader_sps / train_sps}


def bench_augment(n: int, size: int = 48) -> dict:
    """Augmented images/s with the SimCLR-like setting (crop, flip 0.5, blur 0.5) on one thread."""
    import numpy as np

    from polyalign.config import AugmentConfig
    from polyalign.data.augment import augment_image

    cfg = AugmentConfig(enabled=True, flip=0.5, blur=0.5)
    images = torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rng, threads = np.random.default_rng(0), torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run with one thread
    try:
        for i in range(32):
            augment_image(images[i % 64], rng, cfg)
        t0 = time.perf_counter()
        for i in range(n):
            augment_image(images[i % 64], rng, cfg)
        ips = n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    print(f"augment {size}px: {ips:.0f} images/s (1 thread)", flush=True)
    return {"setting": "crop (0.35, 1), flip 0.5, blur 0.5", "size": size, "images": n, "images_per_s": ips}


# ── streaming shards vs the in-memory manifest loader ─────────────────────────────────────────────────────────────
def _write_shapes_shards(n: int, out: Path, shard_size: int = 5000) -> None:
    """``n`` shapes scenes (48 px PNG + captions) as tar shards, rendered 10,000 at a time (other content seeds)."""
    import io
    import json

    from PIL import Image

    from polyalign.data.shapes import ShapesDataset
    from polyalign.data.shards import INDEX, _ShardWriter

    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, shard_size)
    for k in range(-(-n // 10_000)):
        ds = ShapesDataset("train", min(10_000, n - 10_000 * k), 48, seed=k)
        for i in range(len(ds)):
            buf = io.BytesIO()
            Image.fromarray(ds.images[i]).save(buf, "PNG")
            writer.add("png", buf.getvalue(), {"captions": ds.captions(i), "labels": {}, "tags": ds.tags(i)})
    (out / INDEX).write_text(json.dumps({"shards": writer.close()}))


def _stream_child(folder: str, workers: int, batch: int) -> None:
    """(run in a fresh process) one epoch of the shards through the training stream loader; prints JSON with
    samples/s and the peak RSS of this process and its loader workers together (sampled every 50 ms)."""
    import json
    import os
    import threading

    from polyalign.data.loader import make_stream_loader
    from polyalign.data.stream import ShardStream
    from polyalign.tokenizer import Tokenizer

    def rss_tree() -> int:
        total, todo = 0, [os.getpid()]
        while todo:
            pid = todo.pop()
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except (OSError, ValueError):
                pass
        return total

    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_tree())
            done.wait(0.05)

    tok = Tokenizer.train(["a small red circle at the top left", "two shapes"], 200, 16)
    stream = ShardStream(folder, image_size=48, seed=0, buffer=1000)
    n = sum(s["samples"] for s in json.loads((Path(folder) / "shards.json").read_text())["shards"])
    batches = iter(make_stream_loader(stream, tok, batch, workers))
    threading.Thread(target=sample, daemon=True).start()
    next(batches)
    t0 = time.perf_counter()
    for _ in range(n // batch - 1):
        next(batches)
    sps = (n // batch - 1) * batch / (time.perf_counter() - t0)
    done.set()
    print(json.dumps({"samples": n, "samples_per_s": sps, "peak_rss_mb": max(peak[0], rss_tree()) / 2**20}))


def _manifest_child(manifest: str) -> None:
    """(a fresh process) load a manifest as training does (every image decoded into memory); prints the peak RSS."""
    import json
    import resource

    from polyalign.data.manifest import ManifestDataset

    ds = ManifestDataset(manifest, image_size=48, show_progress=False)
    print(json.dumps({"samples": len(ds), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _child(*args: str) -> dict:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_shards(sizes=(20_000, 200_000), workers: int = 2, batch: int = 128, manifest_sizes=(10_000, 20_000)) -> dict:
    """Stream shard sets of ``sizes`` shapes images (one epoch each, ``workers`` loader workers, fresh processes): samples/s
    and peak RSS (process + workers); beside it, the in-memory manifest loader's peak RSS at ``manifest_sizes``."""
    from polyalign.data.export import export_manifest
    from polyalign.data.shapes import ShapesDataset

    rows, manifest_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            folder = Path(tmp) / f"shards-{n}"
            t0 = time.perf_counter()
            _write_shapes_shards(n, folder, shard_size=min(5000, n // 8))  # ≥ 8 shards: every worker reads
            built = time.perf_counter() - t0
            r = _child("--stream", str(folder), str(workers), str(batch))
            rows.append({**r, "workers": workers, "build_s": built})
            print(f"shards, {n} images: {r['samples_per_s']:.0f} samples/s, peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(process + {workers} workers)", flush=True)
        for n in manifest_sizes:
            path = export_manifest(ShapesDataset("train", n, 48), Path(tmp) / f"manifest-{n}", "train")
            r = _child("--manifest", str(path))
            manifest_rows.append(r)
            print(f"manifest (in memory), {n} images: peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    return {"shards": rows, "manifest": manifest_rows}


if __name__ == "__main__":  # the fresh processes of bench_shards
    import sys

    if sys.argv[1] == "--stream":
        _stream_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "--manifest":
        _manifest_child(sys.argv[2])
