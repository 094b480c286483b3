"""Side-by-side performance measurements, one command: ``make bench`` (or ``python benchmarks/bench.py``).

Every figure is measured in this run, on this machine, next to its peer; compare them as ratios.
Writes ``benchmarks/results/bench.json`` and ``benchmarks/results/bench.md``.

  loss       our dense InfoNCE vs our tiled InfoNCE vs HF transformers' CLIP loss: forward + backward time and
             peak extra memory (each case in a fresh subprocess: RSS high-water mark on CPU, allocator peak on GPU)
  train      a train step of our CLIP (ViT + Transformer text tower) vs HF ``CLIPModel`` built with identical sizes
             and precision: samples/s, and model FLOPs utilisation against the matmul peak measured in this run
  loader     our resumable loader (default workers) vs the train step, samples/s: the demo recipe, and MCT's views
  retrieval  text↔image recall@1/5/10 over N images × N captions
  augment    SimCLR-like view augmentation on one process (one torch thread, as in a loader worker), images/s
             next to the train step's samples/s measured in the same run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RAM_FRACTION = 0.6  # a dense case whose estimated need exceeds this share of RAM is reported as not fitting


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _total_ram_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (after one warm-up when repeating)."""
    if repeats > 1:
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- loss
def _hf_clip_loss():
    from transformers.models.clip import modeling_clip as m

    return getattr(m, "clip_loss", None) or m.image_text_contrastive_loss


def loss_case(impl: str, batch: int, dim: int, device: str) -> dict:
    """One loss measurement in this process (called in a fresh subprocess by ``bench_loss``)."""
    from polyalign.losses.contrastive import info_nce
    from polyalign.losses.tiled import tiled_info_nce

    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device).requires_grad_()
    b = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device).requires_grad_()
    scale = torch.tensor(20.0, device=device, requires_grad=True)
    if impl == "dense":
        fn = lambda: info_nce(a, b, scale)  # noqa: E731
    elif impl == "tiled":
        fn = lambda: tiled_info_nce(a, b, scale)  # noqa: E731
    else:
        peer = _hf_clip_loss()
        fn = lambda: peer(scale * b @ a.T)  # noqa: E731  HF: logits_per_text → loss over both directions

    def step():
        a.grad = b.grad = scale.grad = None
        fn().backward()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
        base = _rss_mb("VmRSS")
    seconds = _timed(step, device, 3 if batch <= 4096 else 1)
    if device.type == "cuda":
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        extra = _rss_mb("VmHWM") - base
    return {"impl": impl, "batch": batch, "dim": dim, "seconds": seconds, "peak_extra_mb": extra}


def bench_loss(batches, dim: int, device: str) -> list[dict]:
    rows = []
    for batch in batches:
        for impl in ("dense", "tiled", "hf"):
            need_mb = 3 * batch * batch * 4 / 2**20  # logits + softmax + gradient, fp32
            if impl != "tiled" and device == "cpu" and need_mb > RAM_FRACTION * _total_ram_mb():
                rows.append({"impl": impl, "batch": batch, "dim": dim, "seconds": None, "peak_extra_mb": None,
                             "note": f"does not fit: needs ≈{need_mb / 1024:.0f} GB"})
                print(f"loss {impl:5s} B={batch:6d}: does not fit (≈{need_mb / 1024:.0f} GB)", flush=True)
                continue
            cmd = [sys.executable, __file__, "_loss", impl, str(batch), str(dim), device]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"impl": impl, "batch": batch, "dim": dim, "seconds": None, "peak_extra_mb": None,
                             "note": f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}"})
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"loss {impl:5s} B={batch:6d}: {row['seconds']:.3f} s, +{row['peak_extra_mb']:.0f} MB", flush=True)
    return rows


# ---------------------------------------------------------------- train step
def matmul_peak(device, dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n×n×n matmul (median), the peak our MFU is measured against."""
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _timed(lambda: x @ y, device, repeats)
    return 2 * n**3 / seconds


SIZES = {"image_size": 48, "patch": 8, "width": 256, "layers": 4, "heads": 4, "context": 32, "vocab": 2000,
         "embed": 128}


def _our_clip(device):
    from polyalign.config import load_config
    from polyalign.model import build_model
    from polyalign.objective import Objective

    s = SIZES
    cfg = load_config(None, [
        "model.image.kind=vit", f"model.image.width={s['width']}", f"model.image.layers={s['layers']}",
        f"model.image.heads={s['heads']}", f"model.image.patch_size={s['patch']}", f"data.image_size={s['image_size']}",
        f"model.text.width={s['width']}", f"model.text.layers={s['layers']}", f"model.text.heads={s['heads']}",
        f"model.text.context_length={s['context']}", f"model.embed_dim={s['embed']}"])
    model = build_model(cfg.model, s["image_size"], s["vocab"]).to(device)
    objective = Objective(cfg.loss)
    return model, lambda batch: objective(model(batch))["loss"]


def _hf_clip(device):
    from transformers import CLIPConfig, CLIPModel

    s = SIZES
    common = {"hidden_size": s["width"], "intermediate_size": 4 * s["width"], "num_hidden_layers": s["layers"],
              "num_attention_heads": s["heads"]}
    cfg = CLIPConfig(text_config={**common, "vocab_size": s["vocab"], "max_position_embeddings": s["context"]},
                     vision_config={**common, "image_size": s["image_size"], "patch_size": s["patch"]},
                     projection_dim=s["embed"])
    model = CLIPModel(cfg).to(device)
    return model, lambda batch: model(input_ids=batch["text"], attention_mask=batch["text_mask"].long(),
                                      pixel_values=batch["image"], return_loss=True).loss


def _batch(n: int, device):
    g = torch.Generator().manual_seed(0)
    s = SIZES
    mask = torch.ones(n, s["context"], dtype=torch.bool)
    mask[:, s["context"] // 2:] = False  # half the context is padding, as with short captions
    return {"image": torch.rand(n, 3, s["image_size"], s["image_size"], generator=g).to(device),
            "text": torch.randint(0, s["vocab"], (n, s["context"]), generator=g).to(device), "text_mask": mask.to(device)}


def _step_flops(model, loss_of, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_of(batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _our_clip_compiled(device):
    model, _ = _our_clip(device)
    from polyalign.objective import Objective

    objective, forward = Objective({"clip": 1.0}), torch.compile(model)
    return model, lambda batch: objective(forward(batch))["loss"]


def bench_train(device, precision: str, batch_size: int, steps: int, compiled: bool) -> list[dict]:
    peak = matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    batch = _batch(batch_size, device)
    rows = []
    makers = [("polyalign CLIP", _our_clip), ("HF CLIPModel", _hf_clip)]
    if compiled:
        makers.insert(1, ("polyalign CLIP, torch.compile", _our_clip_compiled))
    for name, make in makers:
        torch.manual_seed(0)
        model, loss_of = make(device)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        # the compiled model does the same work as the eager one measured just before it
        flops = rows[0]["step_flops"] if "compile" in name else _step_flops(model, loss_of, batch)
        ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else None

        def step():
            opt.zero_grad(set_to_none=True)
            if ctx:
                with ctx():
                    loss = loss_of(batch)
            else:
                loss = loss_of(batch)
            loss.backward()
            opt.step()

        for _ in range(2):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        seconds = (time.perf_counter() - t0) / steps
        params = sum(p.numel() for p in model.parameters())
        rows.append({"model": name, "precision": precision, "batch": batch_size, "params": params,
                     "samples_per_s": batch_size / seconds, "step_flops": flops,
                     "mfu": flops / seconds / peak, "matmul_peak_flops": peak})
        print(f"train {name:15s} {precision}: {batch_size / seconds:.0f} samples/s, MFU {flops / seconds / peak:.1%}",
              flush=True)
    return rows


# ---------------------------------------------------------------- loader
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
    from polyalign.model import build_model
    from polyalign.objective import Objective
    from polyalign.tokenizer import Tokenizer
    from polyalign.train.loop import to_model_inputs

    from polyalign.runs import prepare_views

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


# ---------------------------------------------------------------- retrieval
def bench_retrieval(n: int, dim: int, device) -> list[dict]:
    """Our one-sweep evaluation (fp32 and bf16 products) vs the two-pass top-k it replaced, on the same embeddings."""
    from polyalign.eval.retrieval import retrieval_metrics, topk_chunked

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    txt = F.normalize(img + 0.3 * torch.randn(n, dim, generator=g), dim=1)  # a noisy match: recall in (0, 1)
    img, txt = img.to(device), txt.to(device)
    owner = torch.arange(n, device=device)

    def two_pass():  # top-k of every caption over images, then of every image over captions
        _, t2i = topk_chunked(txt, img, 10)
        _, i2t = topk_chunked(img, txt, 10)
        return {"t2i_R@1": (t2i[:, 0] == owner).float().mean().item()}

    rows = []
    for name, fn in (("two-pass top-k (before)", two_pass),
                     ("one sweep, fp32", lambda: retrieval_metrics(img, txt, owner)),
                     ("one sweep, bf16", lambda: retrieval_metrics(img, txt, owner, dtype=torch.bfloat16))):
        _sync(device)
        t0 = time.perf_counter()
        metrics = fn()
        _sync(device)
        seconds = time.perf_counter() - t0
        print(f"retrieval {name} {n}×{n}, d={dim}: {seconds:.1f} s (t2i R@1 {metrics['t2i_R@1']:.4f})", flush=True)
        rows.append({"method": name, "n": n, "dim": dim, "seconds": seconds, "t2i_R@1": metrics["t2i_R@1"]})
    return rows


# ---------------------------------------------------------------- augment
def bench_augment(n: int, size: int = 48) -> dict:
    """Augmented images/s with the SimCLR-like setting (crop, flip 0.5, blur 0.5) on one thread."""
    import numpy as np

    from polyalign.data.augment import AugmentConfig, augment_image

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


# ---------------------------------------------------------------- report
def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    lines = [f"# Benchmarks ({res['machine']})", "", f"Command: `{res['command']}`; measured {res['date']}.", ""]
    if res.get("loss"):
        lines += ["## Contrastive loss, forward + backward", "",
                  "| B | d | impl | time (s) | × dense | peak extra memory (MB) | note |", "|---|---|---|---|---|---|---|"]
        dense = {r["batch"]: r["seconds"] for r in res["loss"] if r["impl"] == "dense"}
        for r in res["loss"]:
            ratio = r["seconds"] / dense[r["batch"]] if r["seconds"] and dense.get(r["batch"]) else None
            lines.append(f"| {r['batch']} | {r['dim']} | {r['impl']} | {_fmt(r['seconds'], '.3f')} | "
                         f"{_fmt(ratio, '.2f')} | {_fmt(r['peak_extra_mb'], '.0f')} | {r.get('note', '')} |")
        lines.append("")
    if res.get("train"):
        lines += ["## Train step (identical sizes and precision)", "",
                  "| model | precision | batch | params | samples/s | × HF | step GFLOP | MFU |",
                  "|---|---|---|---|---|---|---|---|"]
        hf = {r["precision"]: r["samples_per_s"] for r in res["train"] if r["model"].startswith("HF")}
        for r in res["train"]:
            lines.append(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['params'] / 1e6:.2f} M | "
                         f"{r['samples_per_s']:.0f} | {r['samples_per_s'] / hf[r['precision']]:.2f} | "
                         f"{r['step_flops'] / 1e9:.1f} | {r['mfu']:.1%} |")
        peaks = {r["precision"]: r["matmul_peak_flops"] for r in res["train"]}
        lines += ["", "Matmul peak measured in this run: " +
                  ", ".join(f"{p}: {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()), ""]
    if res.get("loader"):
        lines += ["## Loader vs train step", "", "| recipe | workers | loader samples/s | train samples/s | ratio |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['recipe']} | {r['workers']} | {r['loader_samples_per_s']:.0f} | {r['train_samples_per_s']:.0f} "
                  f"| {r['ratio']:.1f}× |" for r in res["loader"]]
        lines.append("")
    if res.get("retrieval"):
        lines += ["## Retrieval evaluation (R@1/5/10 both directions)", "",
                  "| method | images × captions | d | seconds | t2i R@1 |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['n']} × {r['n']} | {r['dim']} | {r['seconds']:.1f} | {r['t2i_R@1']:.4f} |"
                  for r in res["retrieval"]]
        lines.append("")
    if res.get("augment"):
        r, train = res["augment"], _train_samples_per_s(res)
        lines += ["## View augmentation (one process, one thread)", "",
                  "| setting | px | images/s | train step samples/s | images/s ÷ samples/s |", "|---|---|---|---|---|",
                  f"| {r['setting']} | {r['size']} | {r['images_per_s']:.0f} | {_fmt(train, '.0f')} | "
                  f"{_fmt(train and r['images_per_s'] / train, '.1f')} |", "",
                  "With two views per sample the loader must augment 2 images per trained sample, shared among its "
                  "workers.", ""]
    return "\n".join(lines)


def _train_samples_per_s(res: dict):
    """The train step's samples/s from this run: the demo recipe's (loader section), else our fp32 CLIP's."""
    if res.get("loader"):
        return res["loader"][0]["train_samples_per_s"]
    rows = [r for r in res.get("train") or [] if r["model"] == "polyalign CLIP" and r["precision"] == "fp32"]
    return rows[0]["samples_per_s"] if rows else None


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_loss":
        _, _, impl, batch, dim, device = sys.argv
        print(json.dumps(loss_case(impl, int(batch), int(dim), device)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="loss,train,loader,retrieval,augment", help="comma-separated sections")
    p.add_argument("--batches", default="1024,4096,16384,65536", help="loss batch sizes")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (compiling takes minutes)")
    p.add_argument("--retrieval-n", type=int, default=100_000)
    p.add_argument("--augment-n", type=int, default=2000, help="images augmented in the augment section")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    only = set(args.only.split(","))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    res = {"machine": f"{name}, torch {torch.__version__}", "date": time.strftime("%Y-%m-%d"),
           "command": "python benchmarks/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if "loss" in only:
        res["loss"] = bench_loss([int(b) for b in args.batches.split(",")], args.dim, device.type)
    if "train" in only:
        res["train"] = [r for p_ in args.precisions.split(",") for r in bench_train(device, p_, args.train_batch, args.train_steps,
                                                                            not args.no_compile)]
    if "loader" in only:
        res["loader"] = [bench_loader(100, name, over) for name, over in LOADER_RECIPES.items()]
    if "retrieval" in only:
        res["retrieval"] = bench_retrieval(args.retrieval_n, args.dim, device)
    if "augment" in only:
        res["augment"] = bench_augment(args.augment_n)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    (out / "bench.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
