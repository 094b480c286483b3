"""Connect two contrastive spaces that share a modality, from precomputed embeddings (C-MCR).

Paper: Wang et al., "Connecting Multi-modal Contrastive Representations", NeurIPS 2023, arXiv 2305.14381;
``method.mode=exmcr`` follows "Extending Multi-modal Contrastive Representations", arXiv 2310.08884.

Space X aligns modalities (A, B), space Y aligns (B, C). From B items embedded in both spaces and *unpaired*
memories of A (in X) and C (in Y), one projector per space learns a common space in which A and C compare,
although no (A, C) pair is ever seen::

    files/tensors ─► pseudo pairs (once, clean) ─► noise + projectors + loss (per step) ─► ConnectedSpaces
                                                                                         └─► evaluate ─► metrics.json

Embedding files (``.npy`` + ids file, or ``.safetensors``): see ``polyalign.data.embeddings``. B files are joined
by id (by row when neither has ids). Evaluation (``polyalign.eval.connected``) labels: ``NAME.txt`` (one class name
per line) or ``NAME.json`` (a list), aligned with the items.

``polyalign connect CONFIG.yaml [key=value ...] --out DIR`` reads a config described in ``polyalign.connect_config``.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from .config_tree import to_dict
from .connect_config import ConnectConfig, ConnectInputs, ConnectMethod, load_connect_config, validate_connect
from .errors import ConfigError, DataError, TrainingError
from .data.embeddings import Log, check_embeddings, join_by_id, read_embeddings
from .eval.connected import check_eval_dims, evaluate, load_eval_sets
from .heads.cmcr import CMCRProjector, FixedSpace, ResidualProjector
from .losses.cmcr import add_noise, cmcr_loss, soft_retrieve
from .train.checkpoint import atomic_write


# ── inputs ───────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass
class ConnectData:
    """Training inputs: B in both spaces (row-aligned) and the memories of A (in X) and C (in Y)."""

    b_x: torch.Tensor  # (N, Dx)
    b_y: torch.Tensor  # (N, Dy)
    memory_a: torch.Tensor  # (Ma, Dx)
    memory_c: torch.Tensor  # (Mc, Dy)

    def __post_init__(self):
        dims = {"b_x": self.b_x.shape[1], "memory_a": self.memory_a.shape[1]}
        if len(set(dims.values())) > 1:
            raise DataError(f"space X dimensions disagree: {dims}")
        dims = {"b_y": self.b_y.shape[1], "memory_c": self.memory_c.shape[1]}
        if len(set(dims.values())) > 1:
            raise DataError(f"space Y dimensions disagree: {dims}")
        if self.b_x.shape[0] != self.b_y.shape[0]:
            raise DataError(f"b_x has {self.b_x.shape[0]} rows, b_y {self.b_y.shape[0]}: they must hold the same items")
        if self.b_x.shape[0] < 2:
            raise DataError("need at least 2 B items to train (in-batch negatives, BatchNorm)")

    @classmethod
    def from_tensors(cls, b_x, b_y, memory_a, memory_c, log: Log = print) -> ConnectData:
        """Checked and normalised tensors (or arrays); b_x and b_y row-aligned."""
        return cls(*(check_embeddings(t, n, log) for t, n in
                     ((b_x, "b_x"), (b_y, "b_y"), (memory_a, "memory_a"), (memory_c, "memory_c"))))

    @property
    def dims(self) -> tuple[int, int]:
        return self.b_x.shape[1], self.b_y.shape[1]


def load_shared(cfg: ConnectInputs, log: Log = print) -> tuple[torch.Tensor, torch.Tensor]:
    """The B files named in ``cfg``, joined by id: (B in X, B in Y), row-aligned."""
    return join_by_id(read_embeddings(cfg.b_x, "inputs.b_x", log), read_embeddings(cfg.b_y, "inputs.b_y", log),
                      cfg.partial_join, log)


def load_inputs(cfg: ConnectInputs, log: Log = print) -> ConnectData:
    """Read the four training files named in ``cfg`` and join the B files by id."""
    b_x, b_y = load_shared(cfg, log)
    memory = [read_embeddings(getattr(cfg, k), f"inputs.{k}", log).vectors for k in ("memory_a", "memory_c")]
    return ConnectData(b_x, b_y, *memory)


# ── the connected model ──────────────────────────────────────────────────────────────────────────────────────
class ConnectedSpaces(nn.Module):
    """Two projectors into a common space; ``embed(x, space)`` maps either space's embeddings there."""

    def __init__(self, dim_x: int, dim_y: int, dim: int = 0, mode: str = "cmcr", projector: str = "mlp"):
        super().__init__()
        if mode == "exmcr":  # X is the base: Y is mapped into it
            if dim not in (0, dim_x):
                raise ConfigError(f"method.mode=exmcr maps Y into X: method.dim must be 0 or {dim_x}, got {dim}")
            dim = dim_x
            self.proj_x, self.proj_y = FixedSpace(), ResidualProjector(dim_y, dim)
        elif mode == "cmcr":
            if dim == 0 and dim_x != dim_y:
                raise ConfigError(f"the spaces have dims {dim_x} (X) and {dim_y} (Y); set method.dim (common space)")
            dim = dim or dim_x
            self.proj_x, self.proj_y = CMCRProjector(dim_x, dim, projector), CMCRProjector(dim_y, dim, projector)
        else:
            raise ConfigError(f"unknown mode {mode!r} (cmcr | exmcr)")
        self.info = {"dim_x": dim_x, "dim_y": dim_y, "dim": dim, "mode": mode, "projector": projector}

    @classmethod
    def from_config(cls, method: ConnectMethod, dim_x: int, dim_y: int) -> ConnectedSpaces:
        return cls(dim_x, dim_y, method.dim, method.mode, method.projector)

    def projector(self, space: str) -> nn.Module:
        """The module shared by both modalities of ``space`` (x: A and B; y: B and C)."""
        if space not in ("x", "y"):
            raise ValueError(f"space must be 'x' or 'y', got {space!r}")
        return self.proj_x if space == "x" else self.proj_y

    def forward(self, b_x, a_x, b_y, c_y) -> dict[str, torch.Tensor]:
        """Projected (B, dim) embeddings, keyed as :func:`cmcr_loss` takes them. Both modalities of a space go
        through its projector as one batch, so BatchNorm's statistics are those of the mixture it sees at inference."""
        n = b_x.shape[0]
        px, py = self.proj_x(torch.cat([b_x, a_x])), self.proj_y(torch.cat([b_y, c_y]))  # (2B, dim) each
        return {"b_x": px[:n], "a_x": px[n:], "b_y": py[:n], "c_y": py[n:]}

    @torch.no_grad()
    def embed(self, x: torch.Tensor, space: str = "x", batch_size: int = 8192) -> torch.Tensor:
        """Common-space embeddings (N, dim), L2-normalised, of ``space``'s embeddings (N, D); in eval mode (BatchNorm's
        running statistics), whatever mode the model is in."""
        proj, was_training = self.projector(space), self.training
        x = torch.as_tensor(x).float()
        if x.shape[-1] != self.info[f"dim_{space}"]:
            raise ValueError(f"space {space} embeddings have dim {self.info[f'dim_{space}']}, got {x.shape[-1]}")
        x = torch.nn.functional.normalize(x.reshape(-1, x.shape[-1]), dim=-1)
        device = next(self.parameters()).device
        self.eval()
        try:
            out = [proj(x[i : i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else x.new_zeros(0, self.info["dim"])

    def save(self, out_dir: str | Path, config: ConnectConfig | None = None) -> None:
        """Write ``connector.safetensors`` (weights, BN statistics), then ``connector.json`` (dims, mode, config);
        each file is replaced atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(out / "connector.safetensors", lambda p: save_file(weights, str(p)))
        meta = {**self.info, "config": to_dict(config) if config is not None else None}
        atomic_write(out / "connector.json", lambda p: p.write_text(json.dumps(meta, indent=2)))

    @classmethod
    def load(cls, out_dir: str | Path) -> ConnectedSpaces:
        """The model :meth:`save` wrote, in eval mode."""
        out = Path(out_dir)
        for name in ("connector.json", "connector.safetensors"):
            if not (out / name).is_file():
                raise DataError(f"{out} holds no connected model ({name} is missing)")
        meta = json.loads((out / "connector.json").read_text())
        model = cls(meta["dim_x"], meta["dim_y"], meta["dim"], meta["mode"], meta["projector"])
        model.load_state_dict(load_file(str(out / "connector.safetensors")))
        return model.eval()


# ── training ─────────────────────────────────────────────────────────────────────────────────────────────────
def pseudo_pairs(data: ConnectData, method: ConnectMethod,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo A (in X) and pseudo C (in Y) for every B item, from the clean embeddings: (N, Dx), (N, Dy).

    Semantic consistency: ``normalize(softmax(b · Mᵀ / τ1) · M)`` per space; switched off, a random memory row each."""
    device = generator.device
    if not method.semantic_consistency:  # ablation
        n = data.b_x.shape[0]
        pick = [torch.randint(len(m), (n,), generator=generator, device=device).cpu()
                for m in (data.memory_a, data.memory_c)]
        return data.memory_a[pick[0]], data.memory_c[pick[1]]
    kw = dict(tau=method.tau_memory, query_chunk=method.query_chunk, memory_chunk=method.memory_chunk,
              dtype=torch.bfloat16 if method.memory_precision == "bf16" else torch.float32)
    # the memories stay where they are; their chunks move to the queries' device one at a time
    return (soft_retrieve(data.b_x.to(device), data.memory_a, **kw).cpu(),
            soft_retrieve(data.b_y.to(device), data.memory_c, **kw).cpu())


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


def train_connection(data: ConnectData, cfg: ConnectConfig, log: Log = print,
                     log_path: Path | None = None) -> tuple[ConnectedSpaces, list[dict]]:
    """Train the projectors (only they learn); deterministic given ``cfg.train.seed``. Returns the model (eval mode)
    and the logged rows."""
    with _torch_threads(cfg.train.threads):
        return _train(data, cfg, log, log_path)


def _train(data: ConnectData, cfg: ConnectConfig, log: Log,
           log_path: Path | None) -> tuple[ConnectedSpaces, list[dict]]:
    t, m = cfg.train, cfg.method
    device = _device(t.device)
    torch.manual_seed(t.seed)  # projector init
    gen = torch.Generator(device=device).manual_seed(t.seed)  # pseudo-pair ablation, batch order, noise
    t0 = time.time()
    a_x, c_y = pseudo_pairs(data, m, gen)  # (N, Dx), (N, Dy), once, from clean embeddings
    log(f"pseudo pairs for {data.b_x.shape[0]} B items from memories of {data.memory_a.shape[0]} A and "
        f"{data.memory_c.shape[0]} C ({'soft retrieval' if m.semantic_consistency else 'random memory rows'}): "
        f"{time.time() - t0:.1f} s")
    embs = [e.to(device) for e in (data.b_x, a_x, data.b_y, c_y)]
    model = ConnectedSpaces.from_config(m, *data.dims).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],  # biases, BN
                            lr=t.lr)
    n = data.b_x.shape[0]
    batch = min(t.batch_size, n)
    steps_per_epoch = n // batch  # a partial last batch is dropped; the next epoch's order differs
    total, std, step, rows = t.epochs * steps_per_epoch, math.sqrt(m.noise_var), 0, []
    log(f"training {sum(p.numel() for p in params)} parameters ({m.mode}, {m.projector}): {t.epochs} epochs × "
        f"{steps_per_epoch} steps of batch {batch} on {device}")
    t_train = time.time()
    for epoch in range(t.epochs):
        order = torch.randperm(n, generator=gen, device=device)
        for i in range(steps_per_epoch):
            lr = t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * step / total))  # cosine decay
            for g in opt.param_groups:
                g["lr"] = lr
            idx = order[i * batch : (i + 1) * batch]
            views = [add_noise(e[idx], std, gen) for e in embs]  # 4 × (B, D): fresh noise every step
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
    log(f"trained {step} steps in {time.time() - t_train:.1f} s")
    return model.eval(), rows


def connect(b_x, b_y, memory_a, memory_c, cfg: ConnectConfig | None = None, log: Log = print) -> ConnectedSpaces:
    """Python entry point: connect two spaces from tensors (b_x and b_y row-aligned); returns the model in eval mode."""
    cfg = cfg or ConnectConfig()
    validate_connect(cfg)
    return train_connection(ConnectData.from_tensors(b_x, b_y, memory_a, memory_c, log), cfg, log)[0]


# ── the whole run ────────────────────────────────────────────────────────────────────────────────────────────
def run_connect(cfg: ConnectConfig, out_dir: str | Path, log: Log = print) -> dict[str, float]:
    """Load the files, train, save the model to ``out_dir``, evaluate; writes metrics.json, log.jsonl, loss.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        log(msg)

    data = load_inputs(cfg.inputs, note)
    retrieval, classify = load_eval_sets(cfg.eval, note)  # read before training: bad files fail early
    check_eval_dims(data.dims, retrieval, classify)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (out / "log.jsonl").unlink(missing_ok=True)
    t0 = time.time()
    model, rows = train_connection(data, cfg, log, out / "log.jsonl")
    seconds = time.time() - t0
    model.save(out, cfg)
    metrics = evaluate(model.cpu(), (data.b_x, data.b_y), retrieval, classify, cfg.eval.chunk_size)
    metrics.update({"train/seconds": seconds, "train/final_loss": rows[-1]["loss"] if rows else float("nan"),
                    "inputs/n_b": data.b_x.shape[0], "inputs/n_memory_a": data.memory_a.shape[0],
                    "inputs/n_memory_c": data.memory_c.shape[0]})
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2, sort_keys=True)))
    (out / "inputs.json").write_text(json.dumps({"notes": notes, "dims": list(data.dims)}, indent=2))
    if rows:
        from .train.curves import plot_curves

        plot_curves(out / "log.jsonl", out / "loss.png")
    return metrics


def is_connect_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "connector.json").is_file()


def evaluate_connect_run(run_dir: str | Path, overrides: list[str] = (), log: Log = print) -> dict[str, float]:
    """`polyalign eval` of a connect run: the saved model on the eval sets of its config.yaml (``eval.*`` overrides
    point it at other files; ``inputs.b_x``/``inputs.b_y`` feed the pivot). Merged into metrics.json, kept atomic."""
    run = Path(run_dir)
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(("eval.", "inputs."))]
    if bad:
        raise ConfigError(f"polyalign eval of a connect run takes only eval.* and inputs.* overrides, got {bad}")
    cfg = load_connect_config(run / "config.yaml", overrides)
    model = ConnectedSpaces.load(run)
    retrieval, classify = load_eval_sets(cfg.eval, log)
    if retrieval is None and classify is None:
        raise ConfigError(f"{run / 'config.yaml'} names no evaluation set: give eval.a_test + eval.c_test, or "
                          "eval.classes + eval.items + eval.labels")
    shared = load_shared(cfg.inputs, log) if cfg.inputs.b_x and cfg.inputs.b_y else None  # the pivot's; no memories
    metrics = evaluate(model, shared, retrieval, classify, cfg.eval.chunk_size)
    previous = run / "metrics.json"
    merged = {**(json.loads(previous.read_text()) if previous.exists() else {}), **metrics}
    atomic_write(previous, lambda p: p.write_text(json.dumps(merged, indent=2, sort_keys=True)))
    return merged
