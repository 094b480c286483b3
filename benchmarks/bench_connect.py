"""C-MCR section: the soft retrieval of pseudo pairs from a memory (``polyalign connect``), chunked vs naive.

The naive retrieval holds the (Q, M) score matrix: at Q = 4,096 queries and a 1M-item memory that is 16 GB in fp32.
The chunked one (``losses.cmcr.soft_retrieve``) runs an online softmax over memory blocks, so it costs the memory
itself plus one block. Each case runs in a fresh subprocess; reported: the whole process's peak RSS (what a user's
machine must hold, memory included), the peak above the memory, the time, and max |Δ| between the two outputs at a
size where the naive one fits. Alone: ``python benchmarks/bench_connect.py [--items 1000000] [--queries 1024]``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from timing import rss_mb


def connect_case(impl: str, items: int, queries: int, dim: int, save: str) -> dict:
    """One retrieval in this process: memory (items, dim) and queries, unit rows, tau = 0.01."""
    import torch.nn.functional as F

    from polyalign.losses.cmcr import soft_retrieve

    torch.set_num_threads(1)  # comparable on a shared machine; the ratio is what is reported
    gen = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(items, dim, generator=gen), dim=-1)
    q = F.normalize(torch.randn(queries, dim, generator=gen), dim=-1)
    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
    before = rss_mb("VmRSS")
    t0 = time.perf_counter()
    if impl == "naive":
        out = F.normalize(torch.softmax(q @ memory.T / 0.01, dim=-1) @ memory, dim=-1)
    else:
        out = soft_retrieve(q, memory, tau=0.01)
    seconds = time.perf_counter() - t0
    torch.save(out, save)
    return {"impl": impl, "items": items, "queries": queries, "dim": dim, "seconds": seconds,
            "memory_mb": items * dim * 4 / 2**20, "extra_mb": rss_mb("VmHWM") - before, "peak_rss_mb": rss_mb("VmHWM")}


def run_case(impl: str, items: int, queries: int, dim: int, tmp: str) -> tuple[dict, torch.Tensor]:
    save = f"{tmp}/{impl}-{items}.pt"
    code = ("import json, sys; sys.path.insert(0, %r); from bench_connect import connect_case; "
            "print(json.dumps(connect_case(%r, %d, %d, %d, %r)))" % (str(Path(__file__).parent), impl, items, queries,
                                                                    dim, save))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1]), torch.load(save)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000, help="memory size of the large case")
    ap.add_argument("--small", type=int, default=100_000, help="memory size of the chunked-vs-naive comparison")
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "connect"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        naive, out_n = run_case("naive", args.small, args.queries, args.dim, tmp)
        chunked, out_c = run_case("chunked", args.small, args.queries, args.dim, tmp)
        diff = (out_n - out_c).abs().max().item()
        big, _ = run_case("chunked", args.items, args.queries, args.dim, tmp)
        rows = [naive, chunked, big]
    lines = ["| retrieval | memory items | queries | memory (MB) | peak above memory (MB) | whole-process peak RSS (MB)"
             " | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['items']:,} | {r['queries']:,} | {r['memory_mb']:.0f} | {r['extra_mb']:.0f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['seconds']:.2f} |")
    ratio = chunked["extra_mb"] / max(naive["extra_mb"], 1e-9)
    summary = (f"\nAt {args.small:,} items: chunked ÷ naive peak above memory = {ratio:.3f}×, time "
               f"{chunked['seconds'] / naive['seconds']:.2f}×, max |Δ| of the outputs = {diff:.1e}. "
               f"At {args.items:,} items the whole process peaks at {big['peak_rss_mb'] / 1024:.2f} GiB "
               f"(the memory itself: {big['memory_mb'] / 1024:.2f} GiB).")
    text = "\n".join(lines) + "\n" + summary + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text("# C-MCR memory retrieval: chunked vs naive (`python benchmarks/bench_connect.py`)"
                                      "\n\n" + text)
    Path(args.out + ".json").write_text(json.dumps({"rows": rows, "max_abs_diff": diff, "extra_ratio": ratio},
                                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
