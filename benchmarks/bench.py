"""Side-by-side performance measurements, one command: ``make bench`` (or ``python benchmarks/bench.py``).

Every figure is measured in this run, on this machine, next to its peer; compare them as ratios.
Writes ``benchmarks/results/bench.json`` and ``benchmarks/results/bench.md``.

  loss       our dense InfoNCE vs our tiled InfoNCE vs HF transformers' CLIP loss: forward + backward time and
             peak extra memory (each case in a fresh subprocess: RSS high-water mark on CPU, allocator peak on GPU)
  train      a train step of our CLIP (ViT + Transformer text tower) vs HF ``CLIPModel`` built with identical sizes
             and precision: samples/s, and model FLOPs utilisation against the matmul peak measured in this run
  loader     our resumable loader (default workers) vs the train step, samples/s: the demo recipe, and MCT's views
  retrieval  text↔image recall@1/5/10 over N images × N captions
  fdt        FDT max-pool grounding, naive (holds the (B, N, C) relevance) vs chunked: forward + backward time, peak
             extra memory (fresh subprocesses) and the largest difference of outputs and gradients
  augment    SimCLR-like view augmentation on one process (one torch thread, as in a loader worker), images/s
             next to the train step's samples/s measured in the same run
  shards     one epoch of 20k- and 200k-image shard sets through the training stream loader (2 workers, fresh
             processes): samples/s next to the train step's, and peak RSS of the process and its workers, beside the
             in-memory manifest loader's peak RSS at 20k and 200k images (not in the default set: it writes ~0.8 GB)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from bench_data import LOADER_RECIPES, bench_augment, bench_loader, bench_shards
from bench_fdt import bench_fdt
from bench_loss import bench_loss
from bench_retrieval import bench_retrieval
from bench_train import bench_train

HERE = Path(__file__).resolve().parent


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
    if res.get("fdt"):
        lines += ["## FDT grounding (max over tokens), forward + backward", "",
                  "| B | N | C | D | impl | chunk | time (s) | peak extra memory (MB) | max abs diff (r, dQ, dF) | note |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["fdt"]:
            diff = ", ".join(f"{v:.1e}" for v in r["max_abs_diff"].values()) if "max_abs_diff" in r else ""
            lines.append(f"| {r['B']} | {r['N']} | {r['C']} | {r['D']} | {r['impl']} | {r['chunk']} | "
                         f"{_fmt(r['seconds'], '.2f')} | {_fmt(r['peak_extra_mb'], '.0f')} | {diff} | {r.get('note', '')} |")
        chunked = res["fdt"][-1]
        if "time_ratio" in chunked:
            lines += ["", f"Chunked ÷ naive: time ×{chunked['time_ratio']:.2f}, memory ×{chunked['memory_ratio']:.2f}."]
        lines.append("")
    if res.get("augment"):
        r, train = res["augment"], _train_samples_per_s(res)
        lines += ["## View augmentation (one process, one thread)", "",
                  "| setting | px | images/s | train step samples/s | images/s ÷ samples/s |", "|---|---|---|---|---|",
                  f"| {r['setting']} | {r['size']} | {r['images_per_s']:.0f} | {_fmt(train, '.0f')} | "
                  f"{_fmt(train and r['images_per_s'] / train, '.1f')} |", "",
                  "With two views per sample the loader must augment 2 images per trained sample, shared among its "
                  "workers.", ""]
    if res.get("shards"):
        train, sh = _train_samples_per_s(res), res["shards"]
        lines += ["## Streaming shards vs the in-memory manifest loader", "",
                  "| loader | images | samples/s | train step samples/s | ratio | peak RSS (MB) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| shards, {r['workers']} workers (RSS: process + workers) | {r['samples']:,} | "
                  f"{r['samples_per_s']:.0f} | {_fmt(train, '.0f')} | {_fmt(train and r['samples_per_s'] / train, '.1f')}× "
                  f"| {r['peak_rss_mb']:.0f} |" for r in sh["shards"]]
        lines += [f"| manifest, in memory (loading) | {r['samples']:,} | – | – | – | {r['peak_rss_mb']:.0f} |"
                  for r in sh["manifest"]]
        if len(sh["shards"]) > 1:
            a, b = sh["shards"][0], sh["shards"][-1]
            lines += ["", f"Shards' peak RSS at {b['samples']:,} ÷ at {a['samples']:,} images: "
                          f"{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}×."]
        lines.append("")
    return "\n".join(lines)


def _train_samples_per_s(res: dict):
    """The train step's samples/s from this run: the demo recipe's (loader section), else our fp32 CLIP's."""
    if res.get("loader"):
        return res["loader"][0]["train_samples_per_s"]
    rows = [r for r in res.get("train") or [] if r["model"] == "polyalign CLIP" and r["precision"] == "fp32"]
    return rows[0]["samples_per_s"] if rows else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="loss,train,loader,retrieval,fdt,augment", help="comma-separated sections")
    p.add_argument("--batches", default="1024,4096,16384,65536", help="loss batch sizes")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (compiling takes minutes)")
    p.add_argument("--retrieval-n", type=int, default=100_000)
    p.add_argument("--fdt-size", default="256,196,16384,512", help="FDT section: B,N,C,D")
    p.add_argument("--augment-n", type=int, default=2000, help="images augmented in the augment section")
    p.add_argument("--shard-sizes", default="20000,200000", help="shards section: images per shard set")
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
    if "fdt" in only:
        res["fdt"] = bench_fdt(*[int(x) for x in args.fdt_size.split(",")], device=device.type)
    if "augment" in only:
        res["augment"] = bench_augment(args.augment_n)
    if "shards" in only:
        if not res.get("loader"):  # the train step to compare with, measured in this run
            res["loader"] = [bench_loader(40)]
        sizes = [int(x) for x in args.shard_sizes.split(",")]
        res["shards"] = bench_shards(sizes, manifest_sizes=sizes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    (out / "bench.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
