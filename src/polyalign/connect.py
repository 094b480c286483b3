"""Connect two contrastive spaces that share a modality, from precomputed embeddings (C-MCR).

Paper: Wang et al., "Connecting Multi-modal Contrastive Representations", NeurIPS 2023, arXiv 2305.14381;
``method.mode=exmcr`` follows "Extending Multi-modal Contrastive Representations", arXiv 2310.08884.

Space X aligns modalities (A, B), space Y aligns (B, C). From B items embedded in both spaces and *unpaired*
memories of A (in X) and C (in Y), one projector per space learns a common space in which A and C compare,
although no (A, C) pair is ever seen::

    files/tensors ─► pseudo pairs (once, clean) ─► noise + projectors + loss (per step) ─► ConnectedSpaces
                                                                                         └─► evaluate ─► metrics.json

Embedding files (one matrix of N rows each):
  ``NAME.npy``          float array (N, D); ids, where needed, in ``NAME.ids.txt`` (one per line) or
                        ``NAME.ids.json`` (a JSON list)
  ``NAME.safetensors``  tensor ``embeddings`` (N, D), optionally an integer tensor ``ids`` (N,); else the ids file
B files are joined by id (by row when neither has ids). Rows are L2-normalised on load (a note says so when they
were not). Evaluation labels: ``NAME.txt`` (one class name per line) or ``NAME.json`` (a list), aligned with the items.

A config for ``polyalign connect CONFIG.yaml [key=value ...] --out DIR`` (paths relative to the YAML file)::

    inputs: {b_x: text_in_clip.npy, b_y: text_in_clap.npy, memory_a: images_in_clip.npy, memory_c: audio_in_clap.npy}
    eval: {a_test: test_images.npy, c_test: test_audio.npy}   # pairs share an id (NAME.ids.txt)
    method: {tau_memory: 0.01, noise_var: 0.004, intra_weight: 0.1}
    train: {batch_size: 4096, epochs: 36}
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from .config import parse_override, set_key, to_dict
from .errors import ConfigError, DataError, TrainingError
from .eval.retrieval import retrieval_metrics, topk_chunked
from .heads.cmcr import PROJECTOR_KINDS, CMCRProjector, FixedSpace, ResidualProjector
from .losses.cmcr import add_noise, cmcr_loss, soft_retrieve
from .train.checkpoint import _atomic_write

Log = Callable[[str], None]


# ── configuration ────────────────────────────────────────────────────────────────────────────────────────────
@dataclass
class ConnectInputs:
    b_x: str = ""  # B items embedded in X
    b_y: str = ""  # the same B items embedded in Y (joined to b_x by id)
    memory_a: str = ""  # unpaired A items in X
    memory_c: str = ""  # unpaired C items in Y
    partial_join: bool = False  # True: train on the ids both B files share; False: any mismatch is an error


@dataclass
class ConnectMethod:
    mode: str = "cmcr"  # cmcr (project both spaces) | exmcr (X fixed, Y mapped into it; X's intra term is constant)
    projector: str = "mlp"  # mlp (audio–visual setting) | linear (3D setting)
    dim: int = 0  # common-space dimension; 0 = the inputs' (exmcr: always X's)
    tau_memory: float = 0.01  # τ1 of the soft retrieval (default; not confirmed by the paper)
    tau_native: float = 0.01  # τ2 of InfoNCE(B̂x, B̂y) (default)
    tau_pseudo: float = 0.01  # τ3 of InfoNCE(Âx, Ĉy) (default)
    noise_var: float = 0.004  # σ² of the semantic-completion noise; 0 = off
    intra_weight: float = 0.1  # λ of the intra-space alignment; 0 = off
    semantic_consistency: bool = True  # False: pseudo pairs are random memory items (ablation)
    memory_precision: str = "fp32"  # fp32 | bf16: the soft retrieval's matrix products
    query_chunk: int = 1024  # B rows per retrieval block
    memory_chunk: int = 16384  # memory rows per retrieval block (the block is query_chunk × memory_chunk floats)


@dataclass
class ConnectTrain:
    batch_size: int = 4096  # capped at the number of B items; a partial last batch is dropped (BatchNorm, negatives)
    epochs: int = 36
    lr: float = 1e-3
    min_lr: float = 0.0  # cosine decay from lr to min_lr over the run
    weight_decay: float = 0.01  # AdamW's, on weight matrices only (default; not given by the paper)
    seed: int = 0
    log_every: int = 50
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 0  # 0 = torch's default


@dataclass
class ConnectEval:
    a_test: str = ""  # A items in X; an id shared with a c_test row marks a test pair
    c_test: str = ""  # C items in Y
    classes: str = ""  # class embeddings (ids = class names) in space `classes_space`
    classes_space: str = "x"  # x: classes are A-side (e.g. text prompts), items are C in Y; y: the reverse
    items: str = ""  # items to classify, in the other space
    labels: str = ""  # one class name per item row
    chunk_size: int = 8192


@dataclass
class ConnectConfig:
    inputs: ConnectInputs = field(default_factory=ConnectInputs)
    method: ConnectMethod = field(default_factory=ConnectMethod)
    train: ConnectTrain = field(default_factory=ConnectTrain)
    eval: ConnectEval = field(default_factory=ConnectEval)


CONNECT_CHOICES = {"method.mode": ("cmcr", "exmcr"), "method.projector": PROJECTOR_KINDS,
                   "method.memory_precision": ("fp32", "bf16"), "eval.classes_space": ("x", "y"),
                   "train.device": ("cpu", "cuda", "auto")}
PATH_KEYS = ("inputs.b_x", "inputs.b_y", "inputs.memory_a", "inputs.memory_c", "eval.a_test", "eval.c_test",
             "eval.classes", "eval.items", "eval.labels")


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def load_connect_config(path: str | Path | None = None, overrides: list[str] = ()) -> ConnectConfig:
    """Defaults ← YAML file ← ``a.b=c`` overrides, validated. Relative paths in the file are relative to the file;
    in overrides, to the working directory."""
    cfg = ConnectConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        for key, value in data.items():
            set_key(cfg, str(key), value)
        for key in PATH_KEYS:
            if _get(cfg, key):
                set_key(cfg, key, str((path.parent / _get(cfg, key)).absolute()))
    for text in overrides:
        set_key(cfg, *parse_override(text))
    for key in PATH_KEYS:  # absolute, so the config saved with the run works from anywhere
        if _get(cfg, key):
            set_key(cfg, key, str(Path(_get(cfg, key)).absolute()))
    validate_connect(cfg)
    return cfg


def validate_connect(cfg: ConnectConfig) -> None:
    """Choices, signs and the keys that must come together."""
    for key, choices in CONNECT_CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}, got {_get(cfg, key)!r}")
    positive = ("train.batch_size", "train.epochs", "train.lr", "train.log_every", "method.tau_memory",
                "method.tau_native", "method.tau_pseudo", "method.query_chunk", "method.memory_chunk",
                "eval.chunk_size")
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {_get(cfg, key)}")
    for key in ("method.noise_var", "method.intra_weight", "method.dim", "train.min_lr", "train.weight_decay"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {_get(cfg, key)}")
    if bool(cfg.eval.a_test) != bool(cfg.eval.c_test):
        raise ConfigError("retrieval evaluation needs both eval.a_test and eval.c_test (or neither)")
    given = [k for k in ("eval.classes", "eval.items", "eval.labels") if _get(cfg, k)]
    if given and len(given) != 3:
        raise ConfigError(f"classification needs eval.classes, eval.items and eval.labels; only {', '.join(given)} set")


# ── inputs ───────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass
class Embeddings:
    """One embedding matrix (N, D), float32 and L2-normalised, with its row ids (None: rows have no ids)."""

    vectors: torch.Tensor
    ids: list[str] | None = None
    name: str = "embeddings"


def _sibling_ids(path: Path) -> list[str] | None:
    stem = path.with_suffix("")
    if (p := stem.with_name(stem.name + ".ids.txt")).is_file():
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if (p := stem.with_name(stem.name + ".ids.json")).is_file():
        return [str(x) for x in json.loads(p.read_text())]
    return None


def check_embeddings(x, name: str, log: Log = print) -> torch.Tensor:
    """(N, D) float32 rows, checked (2-D, non-empty, finite, non-zero) and L2-normalised (noted if they were not)."""
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{name}: expected a non-empty (N, D) matrix, got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise DataError(f"{name}: expected float embeddings, got dtype {x.dtype}")
    x = x.detach().float().cpu()
    bad = ~torch.isfinite(x).all(dim=1)
    if bad.any():
        raise DataError(f"{name}: {int(bad.sum())} of {x.shape[0]} rows hold NaN or inf "
                        f"(first: row {int(bad.nonzero()[0])})")
    norms = x.norm(dim=1)
    if (norms == 0).any():
        raise DataError(f"{name}: {int((norms == 0).sum())} rows are all zeros "
                        f"(first: row {int((norms == 0).nonzero()[0])})")
    if (norms - 1).abs().max() > 1e-3:
        log(f"{name}: rows were not L2-normalised (norms {norms.min():.3g}–{norms.max():.3g}); normalised them")
    return x / norms[:, None]


def read_embeddings(path: str | Path, name: str, log: Log = print) -> Embeddings:
    """Read a ``.npy`` or ``.safetensors`` embedding file (see the module docstring) and check it."""
    if not str(path):
        raise ConfigError(f"{name} is not set: name a .npy or .safetensors embedding file")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{name}: file not found: {path}")
    ids = None
    if path.suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{name}: {path} is not a numeric .npy array ({e})") from None
    elif path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise DataError(f"{name}: cannot read {path} as safetensors ({e})") from None
        if "embeddings" not in tensors:
            raise DataError(f"{name}: {path} has no tensor 'embeddings' (found: {', '.join(tensors) or 'none'})")
        x = tensors["embeddings"]
        if "ids" in tensors:
            ids = [str(int(i)) for i in tensors["ids"].reshape(-1)]
    else:
        raise DataError(f"{name}: {path} is neither .npy nor .safetensors")
    ids = ids if ids is not None else _sibling_ids(path)
    vectors = check_embeddings(x, f"{name} ({path.name})", log)
    if ids is not None and len(ids) != vectors.shape[0]:
        raise DataError(f"{name}: {path.name} has {vectors.shape[0]} rows but {len(ids)} ids")
    return Embeddings(vectors, ids, name)


def _duplicates(ids: list[str]) -> list[str]:
    seen, dup = set(), []
    for i in ids:
        (dup.append(i) if i in seen else seen.add(i))
    return dup


def join_by_id(x: Embeddings, y: Embeddings, partial: bool = False,
               log: Log = print) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` and ``y`` that hold the same item, in ``x``'s order: (n, Dx), (n, Dy)."""
    if x.ids is None and y.ids is None:
        if x.vectors.shape[0] != y.vectors.shape[0]:
            raise DataError(f"{x.name} has {x.vectors.shape[0]} rows and {y.name} {y.vectors.shape[0]}, and neither "
                            "has ids to join them by (add NAME.ids.txt files)")
        return x.vectors, y.vectors
    for e, other in ((x, y), (y, x)):
        if e.ids is None:
            raise DataError(f"{other.name} has ids but {e.name} has none (add an ids file next to it)")
        if dup := _duplicates(e.ids):
            raise DataError(f"{e.name}: {len(dup)} duplicate ids, e.g. {dup[:3]}")
    pos_y = {i: n for n, i in enumerate(y.ids)}
    shared = [(n, pos_y[i]) for n, i in enumerate(x.ids) if i in pos_y]
    if len(shared) != len(x.ids) or len(shared) != len(y.ids):
        only_x = [i for i in x.ids if i not in pos_y]
        only_y = sorted(set(y.ids) - set(x.ids))
        msg = (f"{x.name} has {len(x.ids)} ids and {y.name} {len(y.ids)}; {len(shared)} shared, {len(only_x)} only in "
               f"{x.name} (e.g. {only_x[:3]}), {len(only_y)} only in {y.name} (e.g. {only_y[:3]})")
        if not partial or not shared:
            raise DataError(msg + ("" if partial else "; set inputs.partial_join=true to train on the shared ids"))
        log(f"joining on the shared ids only: {msg}")
    ix, iy = (torch.tensor(v) for v in zip(*shared))
    return x.vectors[ix], y.vectors[iy]


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


def load_inputs(cfg: ConnectInputs, log: Log = print) -> ConnectData:
    """Read the four training files named in ``cfg`` and join the B files by id."""
    emb = {k: read_embeddings(getattr(cfg, k), f"inputs.{k}", log) for k in ("b_x", "b_y", "memory_a", "memory_c")}
    b_x, b_y = join_by_id(emb["b_x"], emb["b_y"], cfg.partial_join, log)
    return ConnectData(b_x, b_y, emb["memory_a"].vectors, emb["memory_c"].vectors)


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
        _atomic_write(out / "connector.safetensors", lambda p: save_file(weights, str(p)))
        meta = {**self.info, "config": to_dict(config) if config is not None else None}
        _atomic_write(out / "connector.json", lambda p: p.write_text(json.dumps(meta, indent=2)))

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


# ── evaluation ───────────────────────────────────────────────────────────────────────────────────────────────
@dataclass
class RetrievalSet:
    """Test pairs: A items (in X) and C items (in Y); ``c_to_a[j]`` is the A row paired with C row j."""

    a: torch.Tensor  # (Na, Dx)
    c: torch.Tensor  # (Nc, Dy)
    c_to_a: torch.Tensor  # (Nc,) long


@dataclass
class ClassifySet:
    """Items of one space to classify against class embeddings of the other space."""

    classes: torch.Tensor  # (K, D of classes_space)
    items: torch.Tensor  # (N, D of the other space)
    labels: torch.Tensor  # (N,) long: the class row of each item
    classes_space: str = "x"


def _read_labels(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"eval.labels: file not found: {p}")
    if p.suffix == ".json":
        return [str(x) for x in json.loads(p.read_text())]
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def load_eval_sets(cfg: ConnectEval, log: Log = print) -> tuple[RetrievalSet | None, ClassifySet | None]:
    """The evaluation files named in ``cfg`` (each part optional)."""
    retrieval = classify = None
    if cfg.a_test:
        a, c = read_embeddings(cfg.a_test, "eval.a_test", log), read_embeddings(cfg.c_test, "eval.c_test", log)
        if a.ids is None or c.ids is None:
            if a.ids is not None or c.ids is not None or a.vectors.shape[0] != c.vectors.shape[0]:
                raise DataError("eval.a_test and eval.c_test: give both files ids (pairs share an id), or neither "
                                f"with the same row count ({a.vectors.shape[0]} vs {c.vectors.shape[0]})")
            c_to_a = torch.arange(a.vectors.shape[0])
        else:
            if dup := _duplicates(a.ids):
                raise DataError(f"eval.a_test: {len(dup)} duplicate ids, e.g. {dup[:3]} (each A item needs one id)")
            pos = {i: n for n, i in enumerate(a.ids)}
            missing = [i for i in c.ids if i not in pos]
            if missing:
                raise DataError(f"eval.c_test: {len(missing)} of {len(c.ids)} ids have no A item in eval.a_test, "
                                f"e.g. {missing[:3]}")
            c_to_a = torch.tensor([pos[i] for i in c.ids])
        retrieval = RetrievalSet(a.vectors, c.vectors, c_to_a)
    if cfg.classes:
        classes = read_embeddings(cfg.classes, "eval.classes", log)
        items = read_embeddings(cfg.items, "eval.items", log)
        if classes.ids is None:
            raise DataError("eval.classes needs ids: the class names (NAME.ids.txt next to it)")
        labels, pos = _read_labels(cfg.labels), {name: k for k, name in enumerate(classes.ids)}
        if len(labels) != items.vectors.shape[0]:
            raise DataError(f"eval.labels has {len(labels)} labels for {items.vectors.shape[0]} items")
        if unknown := sorted({lab for lab in labels if lab not in pos}):
            raise DataError(f"eval.labels: {len(unknown)} class names not among eval.classes' ids, e.g. {unknown[:3]}")
        classify = ClassifySet(classes.vectors, items.vectors, torch.tensor([pos[lab] for lab in labels]),
                               cfg.classes_space)
    return retrieval, classify


def _check_eval_dims(dims: tuple[int, int], retrieval: RetrievalSet | None, classify: ClassifySet | None) -> None:
    dx, dy = dims
    dim = {"x": dx, "y": dy}
    found = {}
    if retrieval is not None:
        found.update({"eval.a_test (X)": (retrieval.a.shape[1], dx), "eval.c_test (Y)": (retrieval.c.shape[1], dy)})
    if classify is not None:
        other = "y" if classify.classes_space == "x" else "x"
        space = classify.classes_space
        found.update({f"eval.classes ({space.upper()})": (classify.classes.shape[1], dim[space]),
                      f"eval.items ({other.upper()})": (classify.items.shape[1], dim[other])})
    bad = [f"{k} has dim {got}, its space {want}" for k, (got, want) in found.items() if got != want]
    if bad:
        raise DataError("evaluation dims do not match the training spaces: " + "; ".join(bad))


def _pivot(queries: torch.Tensor, b_from: torch.Tensor, b_to: torch.Tensor, chunk: int) -> torch.Tensor:
    """Pivot baseline: each query becomes the other-space embedding of its nearest B item in its own space."""
    return b_to[topk_chunked(queries, b_from, 1, chunk)[1][:, 0]]


def _recalls(a: torch.Tensor, c: torch.Tensor, c_to_a: torch.Tensor, chunk: int, ks=(1, 5, 10)) -> dict[str, float]:
    r = retrieval_metrics(a, c, c_to_a, ks, chunk)  # "images" = A, "captions" = C
    return {**{f"a2c_R@{k}": r[f"i2t_R@{k}"] for k in ks}, **{f"c2a_R@{k}": r[f"t2i_R@{k}"] for k in ks}}


def _chance_recalls(c_to_a: torch.Tensor, n_a: int, ks=(1, 5, 10)) -> dict[str, float]:
    """Expected recall@k of a random ranking: C→A has one positive among n_a; A→C has m positives among n_c."""
    n_c, counts = c_to_a.shape[0], torch.bincount(c_to_a, minlength=n_a)
    counts = counts[counts > 0].tolist()

    def hit(n: int, m: int, k: int) -> float:  # P(at least one of m positives among the first k of n)
        miss = 1.0
        for j in range(min(k, n)):
            miss *= max(0, n - m - j) / (n - j)
        return 1 - miss

    return {**{f"a2c_R@{k}": sum(hit(n_c, m, k) for m in counts) / len(counts) for k in ks},
            **{f"c2a_R@{k}": min(k, n_a) / n_a for k in ks}}


def evaluate(model: ConnectedSpaces, data: ConnectData | None = None, retrieval: RetrievalSet | None = None,
             classify: ClassifySet | None = None, chunk_size: int = 8192) -> dict[str, float]:
    """A↔C retrieval R@1/5/10 and classification accuracy of the connected model, the pivot baseline (through the
    nearest B item of ``data``; left out without it) and chance, as ``connected/…``, ``pivot/…``, ``chance/…`` keys."""
    _check_eval_dims((model.info["dim_x"], model.info["dim_y"]), retrieval, classify)
    out = {}
    if retrieval is not None:
        r = retrieval
        a_emb, c_emb = model.embed(r.a, "x"), model.embed(r.c, "y")
        out.update({f"connected/{k}": v for k, v in _recalls(a_emb, c_emb, r.c_to_a, chunk_size).items()})
        out.update({f"chance/{k}": v for k, v in _chance_recalls(r.c_to_a, r.a.shape[0]).items()})
    if retrieval is not None and data is not None:
        r = retrieval
        a_in_y = _pivot(r.a, data.b_x, data.b_y, chunk_size)  # A → nearest B (X) → its Y embedding
        c_in_x = _pivot(r.c, data.b_y, data.b_x, chunk_size)  # C → nearest B (Y) → its X embedding
        pivot = {**{k: v for k, v in _recalls(a_in_y, r.c, r.c_to_a, chunk_size).items() if k.startswith("a2c")},
                 **{k: v for k, v in _recalls(r.a, c_in_x, r.c_to_a, chunk_size).items() if k.startswith("c2a")}}
        out.update({f"pivot/{k}": v for k, v in pivot.items()})
    if classify is not None:
        s = classify
        other = "y" if s.classes_space == "x" else "x"
        classes, items = model.embed(s.classes, s.classes_space), model.embed(s.items, other)
        out["connected/classify_acc"] = (items @ classes.T).argmax(1).eq(s.labels).float().mean().item()
        out["chance/classify_acc"] = 1.0 / s.classes.shape[0]
        if data is not None:
            b = {"x": data.b_x, "y": data.b_y}
            items_there = _pivot(s.items, b[other], b[s.classes_space], chunk_size)  # item → nearest B → other space
            out["pivot/classify_acc"] = (items_there @ s.classes.T).argmax(1).eq(s.labels).float().mean().item()
    return out


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
    _check_eval_dims(data.dims, retrieval, classify)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (out / "log.jsonl").unlink(missing_ok=True)
    t0 = time.time()
    model, rows = train_connection(data, cfg, log, out / "log.jsonl")
    seconds = time.time() - t0
    model.save(out, cfg)
    metrics = evaluate(model.cpu(), data, retrieval, classify, cfg.eval.chunk_size)
    metrics.update({"train/seconds": seconds, "train/final_loss": rows[-1]["loss"] if rows else float("nan"),
                    "inputs/n_b": data.b_x.shape[0], "inputs/n_memory_a": data.memory_a.shape[0],
                    "inputs/n_memory_c": data.memory_c.shape[0]})
    _atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2, sort_keys=True)))
    (out / "inputs.json").write_text(json.dumps({"notes": notes, "dims": list(data.dims)}, indent=2))
    if rows:
        from .train.curves import plot_curves

        plot_curves(out / "log.jsonl", out / "loss.png")
    return metrics
