"""Loss section: our dense and tiled InfoNCE vs HF transformers' CLIP loss, each case in a fresh subprocess."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from timing import timed_with_peak, total_ram_mb

RAM_FRACTION = 0.6  # a dense case whose estimated need exceeds this share of RAM is reported as not fitting



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

    seconds, extra = timed_with_peak(step, device, 3 if batch <= 4096 else 1)
    return {"impl": impl, "batch": batch, "dim": dim, "seconds": seconds, "peak_extra_mb": extra}


def bench_loss(batches, dim: int, device: str) -> list[dict]:
    rows = []
    for batch in batches:
        for impl in ("dense", "tiled", "hf"):
            need_mb = 3 * batch * batch * 4 / 2**20  # logits + softmax + gradient, fp32
            if impl != "tiled" and device == "cpu" and need_mb > RAM_FRACTION * total_ram_mb():
                rows.append({"impl": impl, "batch": batch, "dim": dim, "seconds": None, "peak_extra_mb": None,
                             "note": f"does not fit: needs ≈{need_mb / 1024:.0f} GB"})
                print(f"loss {impl:5s} B={batch:6d}: does not fit (≈{need_mb / 1024:.0f} GB)", flush=True)
                continue
            cmd = [sys.executable, __file__, impl, str(batch), str(dim), device]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"impl": impl, "batch": batch, "dim": dim, "seconds": None, "peak_extra_mb": None,
                             "note": f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}"})
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"loss {impl:5s} B={batch:6d}: {row['seconds']:.3f} s, +{row['peak_extra_mb']:.0f} MB", flush=True)
    return rows


if __name__ == "__main__":  # one case, in the fresh process bench_loss starts: python bench_loss.py IMPL B D DEVICE
    _, impl, batch, dim, device = sys.argv
    print(json.dumps(loss_case(impl, int(batch), int(dim), device)))
