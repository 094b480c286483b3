"""Loading and saving a training config: defaults ← YAML recipe (with ``base:``) ← ``a.b=c`` overrides, validated."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from polyalign.config.checks import validate
from polyalign.config.schema import Config
from polyalign.config.tree import parse_override, read_yaml_mapping, set_key, to_dict
from polyalign.errors import ConfigError


def _apply_file(cfg: Config, path: Path, chain: list[Path]) -> None:
    """Set the keys of a YAML recipe; a top-level ``base: other.yaml`` (relative to the file) is applied first."""
    if path.resolve() in chain:
        raise ConfigError(f"config file {path} is its own base (cycle: {' -> '.join(map(str, chain + [path]))})")
    data = read_yaml_mapping(path, f"the base of {chain[-1]}" if chain else "")
    base = data.pop("base", None)
    if base is not None:
        _apply_file(cfg, path.parent / str(base), chain + [path.resolve()])
    for key, value in data.items():
        set_key(cfg, str(key), value)


def load_config(path: str | Path | None = None, overrides: list[str] = (), for_training: bool = True) -> Config:
    """Defaults ← YAML file ← overrides, validated (``for_training=False``: see ``validate``)."""
    cfg = Config()
    if path is not None:
        _apply_file(cfg, Path(path), [])
    for text in overrides:
        set_key(cfg, *parse_override(text))
    if "image_image" not in cfg.loss.temperatures:  # written out, so a saved config.yaml names the value it ran with
        cfg.loss.temperatures = {"image_image": cfg.loss.temperature("image_image"), **cfg.loss.temperatures}
    if cfg.model.fdt.anneal != 1 and not cfg.model.fdt.anneal_steps:  # written out: the schedule a run used
        cfg.model.fdt.anneal_steps = cfg.train.max_steps
    validate(cfg, for_training)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """The config as YAML at ``path``, replaced atomically (a kill leaves the old file or the new one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
