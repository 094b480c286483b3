"""FDT section: the naive max-pool grounding (holds the (B, N, C) relevance) vs the chunked one, forward + backward.

Each case runs in a fresh subprocess (peak RSS above the process's baseline on CPU, allocator peak on GPU) and
saves its outputs and gradients, which the parent compares. Alone: ``python benchmarks/bench_fdt.py``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from timing import timed_with_peak, total_ram_mb

RAM_FRACTION = 0.6  # the naive case is skipped when its (B, N, C) tensors would not fit in this share of RAM


def fdt_case(impl: str, b: int, n: int, c: int, d: int, chunk: int, device: str, save: str) -> dict:
    """One grounding measurement in this process: ``r = max_n q[:, n] Fᵀ / sqrt(d)``, backward of ``Σ r·g``."""
    from polyalign.models.heads.fdt import ground

    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, n, d, generator=gen).to(device).requires_grad_()
    codebook = torch.randn(c, d, generator=gen).to(device).requires_grad_()
    g = torch.randn(b, c, generator=gen).to(device)
    scale = d ** -0.5
    use = 0 if impl == "naive" else chunk
    result = {}

    def step():
        q.grad = codebook.grad = None
        r = ground(q, codebook, None, scale, "max", use)  # image patches: no padding
        (r * g).sum().backward()
        result["r"] = r.detach()

    seconds, extra = timed_with_peak(step, device, 1)
    torch.save({"r": result["r"].cpu(), "dq": q.grad.cpu(), "dF": codebook.grad.cpu()}, save)
    return {"impl": impl, "B": b, "N": n, "C": c, "D": d, "chunk": use, "seconds": seconds, "peak_extra_mb": extra}


def bench_fdt(b: int = 256, n: int = 196, c: int = 16384, d: int = 512, chunk: int = 16,
              device: str = "cpu") -> list[dict]:
    """Naive vs chunked grounding at the same sizes; the chunked row carries the ratios and max |difference|."""
    rows, saved = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in ("naive", "chunked"):
            need_mb = 3 * b * n * c * 4 / 2**20  # relevance, its gradient and the max's scatter, fp32
            if impl == "naive" and device == "cpu" and need_mb > RAM_FRACTION * total_ram_mb():
                rows.append({"impl": impl, "B": b, "N": n, "C": c, "D": d, "chunk": 0, "seconds": None,
                             "peak_extra_mb": None, "note": f"does not fit: needs ≈{need_mb / 1024:.0f} GB"})
                continue
            save = str(Path(tmp) / f"{impl}.pt")
            cmd = [sys.executable, __file__, impl, str(b), str(n), str(c), str(d), str(chunk), device, save]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
                rows.append({"impl": impl, "B": b, "N": n, "C": c, "D": d, "chunk": chunk, "seconds": None,
                             "peak_extra_mb": None, "note": f"failed: {last}"})
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            saved[impl] = save
            print(f"fdt {impl:7s} B={b} N={n} C={c} D={d}: {rows[-1]['seconds']:.2f} s, "
                  f"+{rows[-1]['peak_extra_mb']:.0f} MB", flush=True)
        if len(saved) == 2:
            naive, chunked = (torch.load(saved[k]) for k in ("naive", "chunked"))
            diff = {k: (naive[k] - chunked[k]).abs().max().item() for k in naive}
            rows[1].update({"time_ratio": rows[1]["seconds"] / rows[0]["seconds"],
                            "memory_ratio": rows[1]["peak_extra_mb"] / rows[0]["peak_extra_mb"],
                            "max_abs_diff": diff})
            print(f"fdt chunked / naive: time ×{rows[1]['time_ratio']:.2f}, memory ×{rows[1]['memory_ratio']:.3f}, "
                  f"max |diff| {diff}", flush=True)
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 9:  # one case, in the fresh process bench_fdt starts
        _, impl, b, n, c, d, chunk, device, save = sys.argv
        print(json.dumps(fdt_case(impl, int(b), int(n), int(c), int(d), int(chunk), device, save)))
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(json.dumps(bench_fdt(device=device), indent=2))
