"""The config of a resumed run: the run's saved ``config.yaml``, with only the overrides that keep the run the same
run (how long it trains, how often it logs and checkpoints, loader and evaluation settings). Any other change
would continue the saved weights on other data or with another recipe, and mix two runs in one directory."""
from __future__ import annotations

import copy
from pathlib import Path

from polyalign.config.checks import validate
from polyalign.config.load import load_config
from polyalign.config.schema import Config
from polyalign.config.tree import flat_items, parse_override, set_key
from polyalign.errors import ConfigError

SAFE_ON_RESUME = ("train.max_steps", "train.threads", "train.log_every", "train.checkpoint_every", "train.report_to",
                  "data.num_workers", "data.cache_dir",
                  # recovery from a non-finite loss, as its message suggests: same data and recipe, but from then on
                  # not the continuation an uninterrupted run would have been (the resume notice lists them)
                  "train.lr", "train.min_lr", "train.precision", "train.grad_clip")
SAFE_PREFIXES = ("eval.",)


def changed_keys(old, new) -> dict[str, tuple]:
    """``{dotted key: (old value, new value)}`` for every leaf that differs between two config trees."""
    a, b = flat_items(old), flat_items(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def unsafe_changes(saved: Config, cfg: Config) -> dict[str, tuple]:
    """The changed keys that a resumed run may not change (all but ``SAFE_ON_RESUME`` and ``eval.*``)."""
    return {k: v for k, v in changed_keys(saved, cfg).items()
            if k not in SAFE_ON_RESUME and not k.startswith(SAFE_PREFIXES)}


def unsafe_message(changes: dict[str, tuple], saved_path: Path) -> str:
    """Why a resumed run refuses ``changes``, naming each key, and what to do instead."""
    why = "; ".join(f"{k} is {a!r} there, and {b!r} would " + ("train it on other data" if k.startswith("data.")
                                                               else "make it no longer exact")
                    for k, (a, b) in changes.items())
    safe = ", ".join(SAFE_ON_RESUME + tuple(p + "*" for p in SAFE_PREFIXES))
    return (f"--resume continues the run saved in {saved_path}: {why}. A resumed run may change only {safe}; "
            f"to train with other settings, pass another --out")


def resume_config(saved_path: str | Path, recipe: str | Path | None, overrides: list[str] = ()) -> Config:
    """The saved config of the run at ``saved_path`` with ``overrides`` applied, validated; a ``ConfigError``
    naming an override that a resumed run may not change. The ``recipe`` is not used (a notice names the keys
    where it differs)."""
    saved_path = Path(saved_path)
    saved = load_config(saved_path)
    cfg = copy.deepcopy(saved)
    for text in overrides:
        set_key(cfg, *parse_override(text))
    if bad := unsafe_changes(saved, cfg):
        raise ConfigError(unsafe_message(bad, saved_path))
    validate(cfg)
    _notice_recipe(saved_path, recipe, overrides, cfg)
    return cfg


def _notice_recipe(saved_path: Path, recipe, overrides, cfg: Config) -> None:
    """One line when the recipe (with the same overrides) would give another config than the resumed one."""
    try:
        differ = list(changed_keys(load_config(recipe, overrides), cfg))
    except ConfigError:  # a recipe that no longer loads: nothing to compare, the saved config is used anyway
        differ = []
    if differ:
        shown = ", ".join(differ[:4]) + (", …" if len(differ) > 4 else "")
        print(f"note: resuming with {saved_path}; {recipe or 'the defaults'} differs from it in {len(differ)} "
              f"key(s) ({shown}), which keep their saved values")


def check_resume_step(cfg: Config, step: int, run_dir: str | Path) -> None:
    """A resumed run cannot end before the step of the checkpoint it continues."""
    if cfg.train.max_steps < step:
        raise ConfigError(f"train.max_steps={cfg.train.max_steps} is below step {step} of the latest checkpoint in "
                          f"{run_dir}: a resumed run cannot go back; pass train.max_steps={step} or more")
