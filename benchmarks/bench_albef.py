"""Fusion-model section (ALBEF, arXiv 2107.07651 + soft masks, arXiv 2304.00719): cost of one training step
(forward, ITC + ITM + MLM, backward, AdamW, momentum update + enqueue) for the base model, + soft mask, and all three
additions (soft mask, focal ITC, text-mask augmentation), at a tiny CPU size.

Configs run interleaved; on CPU the measure is the process's CPU time on one thread (robust on a shared machine),
on GPU the wall time. Alone: ``python benchmarks/bench_albef.py``.
"""
from __future__ import annotations

import statistics
import time

import torch

SPECIAL = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
SIZES = {"batch": 32, "context": 32, "vocab": 2000, "image_size": 48, "patch": 8, "width": 128, "layers": 2,
         "heads": 4, "fusion_layers": 2, "embed": 128, "queue": 1024}
CASES = {"base": {}, "soft_mask": {"soft_mask": True},
         "all_three": {"soft_mask": True, "focal_gamma": 2.0, "text_mask_aug": True}}


def _batch(seed: int, device) -> dict:
    s, g = SIZES, torch.Generator().manual_seed(seed)
    b, length = s["batch"], s["context"]
    ids = torch.randint(len(SPECIAL), s["vocab"], (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    for i in range(b):  # captions of 8..23 tokens: [CLS] … [SEP] [PAD]…
        n = 8 + i % 16
        ids[i, 0], ids[i, n], ids[i, n + 1:], mask[i, n + 1:] = 2, 3, 0, False
    batch = {"image": torch.rand(b, 3, s["image_size"], s["image_size"], generator=g), "text": ids,
             "text_mask": mask, "index": torch.arange(b) + seed * b}
    return {k: v.to(device) for k, v in batch.items()}


def _case(switches: dict, device):
    from polyalign.config import FusionConfig
    from polyalign.models.fusion import FusionModel
    from polyalign.models.encoders.image import ViT
    from polyalign.models.encoders.text import TextTransformer
    from polyalign.losses.objective import itc_term, itm_term, mlm_term

    s = SIZES
    torch.manual_seed(0)
    cfg = FusionConfig(fusion_layers=s["fusion_layers"], fusion_heads=s["heads"], embed_dim=s["embed"],
                       queue_size=s["queue"], **switches)
    image = ViT(s["image_size"], s["patch"], s["width"], s["layers"], s["heads"])
    text = TextTransformer(s["vocab"], s["context"], s["width"], s["layers"], s["heads"])
    model = FusionModel(image, text, cfg, s["vocab"], SPECIAL).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        out = model(batch)
        loss = itc_term(out) + itm_term(out) + mlm_term(out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.after_step(out)

    return step


def run(device: str = "cpu", steps: int = 30, warmup: int = 3) -> dict:
    """Median seconds per step of each case and its ratio to the base model."""
    device = torch.device(device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    steps_of = {name: _case(sw, device) for name, sw in CASES.items()}
    times = {name: [] for name in CASES}
    for i in range(warmup + steps):
        for name, step in steps_of.items():  # interleaved: load changes hit every case alike
            batch = _batch(i, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = clock()
            step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(clock() - t)
    base = statistics.median(times["base"])
    return {name: {"s_per_step": statistics.median(t), "ratio": statistics.median(t) / base} for name, t in times.items()}


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {dev}, sizes {SIZES}")
    for name, r in run(dev).items():
        print(f"{name:10s} {1e3 * r['s_per_step']:8.1f} ms/step  ×{r['ratio']:.2f}")
