"""Train-step section: our CLIP vs HF ``CLIPModel`` at identical sizes and precision, with MFU."""
from __future__ import annotations

import time

import torch

from timing import sync, timed



def matmul_peak(device, dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n×n×n matmul (median), the peak our MFU is measured against."""
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: x @ y, device, repeats)
    return 2 * n**3 / seconds


SIZES = {"image_size": 48, "patch": 8, "width": 256, "layers": 4, "heads": 4, "context": 32, "vocab": 2000,
         "embed": 128}


def _our_clip(device):
    from polyalign.config import load_config
    from polyalign.models.build import build_model
    from polyalign.losses.objective import Objective

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
    from polyalign.losses.objective import Objective

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
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        seconds = (time.perf_counter() - t0) / steps
        params = sum(p.numel() for p in model.parameters())
        rows.append({"model": name, "precision": precision, "batch": batch_size, "params": params,
                     "samples_per_s": batch_size / seconds, "step_flops": flops,
                     "mfu": flops / seconds / peak, "matmul_peak_flops": peak})
        print(f"train {name:15s} {precision}: {batch_size / seconds:.0f} samples/s, MFU {flops / seconds / peak:.1%}",
              flush=True)
    return rows
