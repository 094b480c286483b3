"""Training a connection (C-MCR): pseudo pairs once, then noisy views, the projectors and the loss at every step, on
the shared trainer pieces (AdamW grouping, cosine schedule, checkpoints), resumable exactly from a checkpoint.

Paper: Wang et al., "Connecting Multi-modal Contrastive Representations", NeurIPS 2023, arXiv 2305.14381.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from polyalign.config.connect import ConnectConfig, ConnectMethod, validate_connect
from polyalign.connect.data import ConnectData
from polyalign.connect.embeddings import Log
from polyalign.connect.model import ConnectedSpaces
from polyalign.errors import ConfigError, TrainingError
from polyalign.losses.cmcr import add_noise, cmcr_loss, nearest_index, soft_retrieve
from polyalign.train.checkpoint import (find_checkpoint, load_state, load_weights, rng_state, save_checkpoint,
                                        set_rng_state)
from polyalign.train.files import truncate_log
from polyalign.train.optim import adamw, cosine_lr, set_lr


def pseudo_pairs(data: ConnectData, method: ConnectMethod,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo A (in X) and pseudo C (in Y) for every B item, from the clean embeddings: (N, Dx), (N, Dy).

    ``method.pseudo_pairs``: soft (semantic consistency): ``normalize(softmax(b · Mᵀ / τ1) · M)`` per space;
    nearest (no consistency): the memory row with the highest dot product, as it is; random (ablation): a random
    memory row (drawn from ``generator``)."""
    if not data.has_memories:
        raise ConfigError("pseudo pairs need inputs.memory_a and inputs.memory_c (or method.memories=false)")
    device = generator.device
    if method.pseudo_pairs == "random":  # ablation
        n = data.b_x.shape[0]
        pick = [torch.randint(len(m), (n,), generator=generator, device=device).cpu()
                for m in (data.memory_a, data.memory_c)]
        return data.memory_a[pick[0]], data.memory_c[pick[1]]
    kw = dict(query_chunk=method.query_chunk, memory_chunk=method.memory_chunk,
              dtype=torch.bfloat16 if method.memory_precision == "bf16" else torch.float32)
    # the memories stay where they are; their chunks move to the queries' device one at a time
    if method.pseudo_pairs == "nearest":
        return (data.memory_a[nearest_index(data.b_x.to(device), data.memory_a, **kw)],
                data.memory_c[nearest_index(data.b_y.to(device), data.memory_c, **kw)])
    if method.pseudo_pairs != "soft":
        raise ConfigError(f"unknown method.pseudo_pairs {method.pseudo_pairs!r} (soft | nearest | random)")
    return (soft_retrieve(data.b_x.to(device), data.memory_a, method.tau_memory, **kw).cpu(),
            soft_retrieve(data.b_y.to(device), data.memory_c, method.tau_memory, **kw).cpu())


def noise_stds(method: ConnectMethod, dims: tuple[int, int]) -> tuple[float, float]:
    """The std of the semantic-completion noise in X and in Y: ``sqrt(noise_var)`` (noise_scale fixed), or
    ``sqrt(noise_var · 512 / d)`` for a space of dimension d (dim: the paper's σ² is for 512-d CLIP)."""
    if method.noise_scale == "fixed":
        return math.sqrt(method.noise_var), math.sqrt(method.noise_var)
    if method.noise_scale != "dim":
        raise ConfigError(f"unknown method.noise_scale {method.noise_scale!r} (fixed | dim)")
    return tuple(math.sqrt(method.noise_var * 512 / d) for d in dims)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run with ``n`` torch threads (0: leave them), then restore the previous count."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_connection(data: ConnectData, cfg: ConnectConfig, log: Log = print, log_path: Path | None = None,
                     ckpt_dir: Path | None = None) -> tuple[ConnectedSpaces, list[dict]]:
    """Train the projectors (only they learn); deterministic given ``cfg.train.seed``. With ``ckpt_dir``: a checkpoint
    every ``train.checkpoint_every`` steps and at the end; when it already holds one, the run continues from the
    latest exactly as if never stopped (``log_path`` cut back to it). Returns the model (eval mode) and all rows."""
    with _torch_threads(cfg.train.threads):
        return _train(data, cfg, log, log_path, None if ckpt_dir is None else Path(ckpt_dir))


def _resume(ckpt_dir: Path, step: int, model: ConnectedSpaces, opt: torch.optim.Optimizer, gen: torch.Generator,
            shape: list[int], log_path: Path | None) -> dict:
    """Load checkpoint ``step`` into the model, the optimizer, the generator and the global RNG; drop log rows past it.
    Returns its state."""
    state = load_state(ckpt_dir, step)
    if state["shape"] != shape:
        was, now = (dict(zip(("B items", "batch", "steps"), s)) for s in (state["shape"], shape))
        raise ConfigError(f"{ckpt_dir} was written by a run of {was}, this config gives {now}: resume with the run's "
                          "inputs and train.* keys (see its config.yaml), or start another --out")
    model.load_state_dict(load_weights(ckpt_dir, step))
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])  # after the pseudo pairs, which drew from it (ablation) as in the first run
    set_rng_state(state["rng"])
    if log_path is not None:
        truncate_log(log_path, step)
    return state


def _train(data: ConnectData, cfg: ConnectConfig, log: Log, log_path: Path | None,
           ckpt_dir: Path | None) -> tuple[ConnectedSpaces, list[dict]]:
    t, m = cfg.train, cfg.method
    device = _device(t.device)
    t0 = time.time()
    torch.manual_seed(t.seed)  # projector init
    gen = torch.Generator(device=device).manual_seed(t.seed)  # pseudo-pair ablation, batch order, noise
    if m.memories:
        a_x, c_y = pseudo_pairs(data, m, gen)  # (N, Dx), (N, Dy), once, from clean embeddings (again on resume)
        how = {"soft": "soft retrieval", "nearest": "nearest memory rows", "random": "random memory rows"}
        log(f"pseudo pairs for {data.b_x.shape[0]} B items from memories of {data.memory_a.shape[0]} A and "
            f"{data.memory_c.shape[0]} C ({how[m.pseudo_pairs]}): {time.time() - t0:.1f} s")
        embs = [e.to(device) for e in (data.b_x, a_x, data.b_y, c_y)]
    else:  # no memories: B pairs alone, the native InfoNCE
        log(f"method.memories=false: no pseudo pairs; training on the {data.b_x.shape[0]} B pairs alone")
        embs = [data.b_x.to(device), None, data.b_y.to(device), None]
    std_x, std_y = noise_stds(m, data.dims)
    log(f"noise std {std_x:.4g} in X (d = {data.dims[0]}), {std_y:.4g} in Y (d = {data.dims[1]}) "
        f"(method.noise_scale={m.noise_scale}, noise_var {m.noise_var:g})")
    model = ConnectedSpaces.from_config(m, *data.dims).to(device).train()
    opt = adamw(model, t.lr, t.weight_decay)  # decay on weight matrices, not biases or BatchNorm; torch's betas, eps
    n = data.b_x.shape[0]
    batch = min(t.batch_size, n)
    per_epoch = n // batch  # a partial last batch is dropped; the next epoch's order differs
    total, every = t.epochs * per_epoch, t.checkpoint_every or per_epoch
    stds = (std_x, std_x, std_y, std_y)  # of b_x, a_x, b_y, c_y
    # where the run stands: steps done, the epoch and batch of the next step, that epoch's order (None: not drawn)
    step, first_epoch, first_batch, order, rows, seconds = 0, 0, 0, None, [], 0.0
    last = find_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    if last is not None:
        s = _resume(ckpt_dir, last, model, opt, gen, [n, batch, total], log_path)
        step, first_epoch, first_batch, rows, seconds = s["step"], s["epoch"], s["batch"], s["rows"], s["seconds"]
        order = s["order"].to(device) if s["order"] is not None else None
        log(f"resuming from the checkpoint at step {step} (epoch {first_epoch + 1}, batch {first_batch + 1})")
    log(f"training {sum(p.numel() for p in model.parameters() if p.requires_grad)} parameters ({m.mode}, "
        f"{m.projector}): {t.epochs} epochs × {per_epoch} steps of batch {batch} on {device}")
    t_train = time.time()
    for epoch in range(first_epoch, t.epochs):
        if order is None:
            order = torch.randperm(n, generator=gen, device=device)  # (N,)
        for i in range(first_batch, per_epoch):
            lr = set_lr(opt, cosine_lr(step, total, t.lr, t.min_lr))
            idx = order[i * batch : (i + 1) * batch]
            views = [None if e is None else add_noise(e[idx], std, gen)  # 4 × (B, D): fresh noise every step
                     for e, std in zip(embs, stds)]
            terms = cmcr_loss(**model(*views), tau_native=m.tau_native, tau_pseudo=m.tau_pseudo,
                              intra_weight=m.intra_weight)
            if not torch.isfinite(terms["loss"]):
                raise TrainingError(f"non-finite loss at step {step}: {({k: v.item() for k, v in terms.items()})}")
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            step += 1
            if step % t.log_every == 0 or step in (1, total):
                row = {"step": step, "epoch": epoch + 1, "lr": lr, **{k: v.item() for k, v in terms.items()}}
                rows.append(row)
                log(f"step {step}/{total} epoch {epoch + 1} loss {row['loss']:.4f} (native {row['native_loss']:.4f} "
                    f"pseudo {row['pseudo_loss']:.4f} intra {row['intra_loss']:.4f}) lr {lr:.2e}")
                if log_path is not None:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
            if ckpt_dir is not None and (step % every == 0 or step == total):
                end = i + 1 == per_epoch  # the next step starts the next epoch, with an order not drawn yet
                state = {"optimizer": opt.state_dict(), "step": step, "epoch": epoch + end,
                         "batch": 0 if end else i + 1, "order": None if end else order.cpu(),
                         "generator": gen.get_state(), "rng": rng_state(), "rows": rows,
                         "seconds": seconds + time.time() - t0, "shape": [n, batch, total]}
                save_checkpoint(ckpt_dir, step, model, state)
        first_batch, order = 0, None
    log(f"trained {step} steps in {time.time() - t_train:.1f} s")
    return model.eval(), rows


def connect(b_x, b_y, memory_a=None, memory_c=None, cfg: ConnectConfig | None = None,
            log: Log = print) -> ConnectedSpaces:
    """Python entry point: connect two spaces from tensors (b_x and b_y row-aligned; memories None only with
    method.memories=false, and ignored then); returns the model in eval mode."""
    cfg = cfg or ConnectConfig()
    validate_connect(cfg)
    memories = (memory_a, memory_c) if cfg.method.memories else (None, None)
    return train_connection(ConnectData.from_tensors(b_x, b_y, *memories, log=log), cfg, log)[0]
