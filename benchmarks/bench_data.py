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
