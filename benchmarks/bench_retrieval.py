"""Retrieval section: one-sweep evaluation (fp32, bf16) vs the two-pass top-k it replaced."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from timing import sync



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
        sync(device)
        t0 = time.perf_counter()
        metrics = fn()
        sync(device)
        seconds = time.perf_counter() - t0
        print(f"retrieval {name} {n}×{n}, d={dim}: {seconds:.1f} s (t2i R@1 {metrics['t2i_R@1']:.4f})", flush=True)
        rows.append({"method": name, "n": n, "dim": dim, "seconds": seconds, "t2i_R@1": metrics["t2i_R@1"]})
    return rows
