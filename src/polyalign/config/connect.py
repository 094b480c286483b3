"""The configuration of ``polyalign connect`` (C-MCR): typed sections, YAML + ``key=value`` overrides, validation.

A config (paths relative to the YAML file; absolute once loaded, so the copy saved with a run works anywhere)::

    inputs: {b_x: text_in_clip.npy, b_y: text_in_clap.npy, memory_a: images_in_clip.npy, memory_c: audio_in_clap.npy}
    eval: {a_test: test_images.npy, c_test: test_audio.npy}   # pairs share an id (NAME.ids.txt)
    # optional: eval.a_val + eval.c_val (the same format), val pairs that choose the soft pivot's τ
    method: {tau_memory: 0.01, noise_var: 0.004, intra_weight: 0.1, pseudo_pairs: soft}
    train: {batch_size: 4096, epochs: 36}

It shares the key machinery of :mod:`polyalign.config.tree` with the training config, not its keys or checks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from polyalign.config.tree import check_choices, get_key, parse_override, read_yaml_mapping, set_key
from polyalign.errors import ConfigError

PROJECTOR_KINDS = ("mlp", "linear")  # the C-MCR projector of each space


@dataclass
class ConnectInputs:
    b_x: str = ""  # B items embedded in X
    b_y: str = ""  # the same B items embedded in Y (joined to b_x by id)
    memory_a: str = ""  # unpaired A items in X
    memory_c: str = ""  # unpaired C items in Y
    partial_join: bool = False  # True: train on the ids both B files share; False: any mismatch is an error


@dataclass
class ConnectMethod:
    # cmcr (project both spaces) | anchor_x (X fixed; Y mapped into X by a residual projector initialised at identity;
    # X's intra term is constant; inspired by Ex-MCR, arXiv 2310.08884, not its released recipe)
    mode: str = "cmcr"
    projector: str = "mlp"  # mlp (audio–visual setting) | linear (3D setting)
    dim: int = 0  # common-space dimension; 0 = the inputs' (anchor_x: always X's)
    tau_memory: float = 0.01  # τ1 of the soft retrieval (default; not confirmed by the paper)
    tau_native: float = 0.01  # τ2 of InfoNCE(B̂x, B̂y) (default)
    tau_pseudo: float = 0.01  # τ3 of InfoNCE(Âx, Ĉy) (default)
    noise_var: float = 0.004  # σ² of the semantic-completion noise; 0 = off
    # fixed: σ² in every space | dim: σ² · 512 / d in a space of dimension d (the paper's σ² is for 512-d CLIP; at
    # d = 128 the variance is 4×), per space; the std used is logged and reported as train/noise_std_x, _y
    noise_scale: str = "fixed"
    intra_weight: float = 0.1  # λ of the intra-space alignment; 0 = off
    # soft: semantic consistency, normalize(softmax(b · Mᵀ / τ1) · M) | nearest: no consistency, the single nearest
    # memory row as it is | random: a random memory row (a harmful ablation, not an absent mechanism)
    pseudo_pairs: str = "soft"
    # false: no memories, no pseudo pairs: the projectors learn from the B pairs alone (the native InfoNCE; pseudo and
    # intra terms off; inputs.memory_a/memory_c may be omitted and are not read)
    memories: bool = True
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
    # steps between checkpoints in RUN/checkpoints (what `polyalign connect --resume` continues from); 0 = one at
    # each epoch's end. The last step always writes one.
    checkpoint_every: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 0  # 0 = torch's default


@dataclass
class ConnectEval:
    a_test: str = ""  # A items in X; an id shared with a c_test row marks a test pair
    c_test: str = ""  # C items in Y
    a_val: str = ""  # validation pairs (a_test's format), only to choose the soft pivot's τ (soft_pivot/tau)
    c_val: str = ""  # without them the soft pivot uses method.tau_memory (soft_pivot/tau_from: default)
    classes: str = ""  # class embeddings (ids = class names) in space `classes_space`
    classes_space: str = "x"  # x: classes are A-side (e.g. text prompts), items are C in Y; y: the reverse
    items: str = ""  # items to classify, in the other space
    labels: str = ""  # one class name per item row
    items_val: str = ""  # validation items + labels (eval.items' format, the same classes), only to choose the
    labels_val: str = ""  # soft pivot's τ by accuracy when there are no validation pairs (a_val, c_val)
    chunk_size: int = 8192


@dataclass
class ConnectConfig:
    inputs: ConnectInputs = field(default_factory=ConnectInputs)
    method: ConnectMethod = field(default_factory=ConnectMethod)
    train: ConnectTrain = field(default_factory=ConnectTrain)
    eval: ConnectEval = field(default_factory=ConnectEval)


CONNECT_CHOICES = {"method.mode": ("cmcr", "anchor_x"), "method.projector": PROJECTOR_KINDS,
                   "method.pseudo_pairs": ("soft", "nearest", "random"), "method.noise_scale": ("fixed", "dim"),
                   "method.memory_precision": ("fp32", "bf16"), "eval.classes_space": ("x", "y"),
                   "train.device": ("cpu", "cuda", "auto")}
PATH_KEYS = ("inputs.b_x", "inputs.b_y", "inputs.memory_a", "inputs.memory_c", "eval.a_test", "eval.c_test",
             "eval.a_val", "eval.c_val", "eval.classes", "eval.items", "eval.labels",
             "eval.items_val", "eval.labels_val")
# keys and values that were replaced: a config still using one fails with what to write instead
REMOVED_KEYS = {"method.semantic_consistency": "method.semantic_consistency was replaced by method.pseudo_pairs "
                "(soft | nearest | random): true → soft; false meant random memory rows, now pseudo_pairs=random "
                "(the harmful ablation) — pseudo_pairs=nearest is no consistency (the nearest memory row)"}
EXMCR_RENAMED = ("method.mode=exmcr was renamed method.mode=anchor_x: X fixed, Y mapped into X by a residual projector "
                 "initialised at identity, inspired by Ex-MCR (arXiv 2310.08884) but not its released recipe "
                 "(an identity-initialised Linear into two MLPs with BatchNorm, no residual, all-modality queries, "
                 "dense alignment)")


def _reject_removed(key: str, value) -> None:
    """A ``ConfigError`` naming the replacement when ``key`` (or a key below it, for a section's mapping) was removed."""
    if key in REMOVED_KEYS:
        raise ConfigError(REMOVED_KEYS[key])
    if isinstance(value, dict):
        for k, v in value.items():
            _reject_removed(f"{key}.{k}", v)


def load_connect_config(path: str | Path | None = None, overrides: list[str] = ()) -> ConnectConfig:
    """Defaults ← YAML file ← ``a.b=c`` overrides, validated. Relative paths in the file are relative to the file;
    in overrides, to the working directory."""
    cfg = ConnectConfig()
    if path is not None:
        path = Path(path)
        for key, value in read_yaml_mapping(path).items():
            _reject_removed(str(key), value)
            set_key(cfg, str(key), value)
        for key in PATH_KEYS:
            if get_key(cfg, key):
                set_key(cfg, key, str((path.parent / get_key(cfg, key)).absolute()))
    for text in overrides:
        key, value = parse_override(text)
        _reject_removed(key, value)
        set_key(cfg, key, value)
    for key in PATH_KEYS:  # absolute, so the config saved with the run works from anywhere
        if get_key(cfg, key):
            set_key(cfg, key, str(Path(get_key(cfg, key)).absolute()))
    validate_connect(cfg)
    return cfg


def validate_connect(cfg: ConnectConfig) -> None:
    """Choices, signs and the keys that must come together."""
    if cfg.method.mode == "exmcr":
        raise ConfigError(EXMCR_RENAMED)
    check_choices(cfg, CONNECT_CHOICES)
    positive = ("train.batch_size", "train.epochs", "train.lr", "train.log_every", "method.tau_memory",
                "method.tau_native", "method.tau_pseudo", "method.query_chunk", "method.memory_chunk",
                "eval.chunk_size")
    for key in positive:
        if get_key(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {get_key(cfg, key)}")
    for key in ("method.noise_var", "method.intra_weight", "method.dim", "train.min_lr", "train.weight_decay",
                "train.checkpoint_every"):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {get_key(cfg, key)}")
    if bool(cfg.eval.a_test) != bool(cfg.eval.c_test):
        raise ConfigError("retrieval evaluation needs both eval.a_test and eval.c_test (or neither)")
    if bool(cfg.eval.a_val) != bool(cfg.eval.c_val):
        raise ConfigError("the soft pivot's validation pairs need both eval.a_val and eval.c_val (or neither)")
    if bool(cfg.eval.items_val) != bool(cfg.eval.labels_val):
        raise ConfigError("the soft pivot's validation items need both eval.items_val and eval.labels_val (or neither)")
    if cfg.eval.items_val and not cfg.eval.classes:
        raise ConfigError("eval.items_val are classified against eval.classes: give eval.classes, items and labels")
    if cfg.eval.items_val and cfg.eval.a_val:
        raise ConfigError("give the soft pivot one validation set: eval.a_val + c_val (pairs) or eval.items_val + "
                          "labels_val (classification), not both")
    given = [k for k in ("eval.classes", "eval.items", "eval.labels") if get_key(cfg, k)]
    if given and len(given) != 3:
        raise ConfigError(f"classification needs eval.classes, eval.items and eval.labels; only {', '.join(given)} set")
