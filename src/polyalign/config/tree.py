"""Typed dataclass config trees addressed by dotted keys: set a key from YAML or ``a.b=c`` text with its type
checked, read one, list them all, check choices and value ranges (``Range``), and turn the tree back into plain data.
YAML files are read with a key given twice in one mapping rejected (PyYAML would keep the last silently).

Shared by the training config (:mod:`polyalign.config`) and the connect config (:mod:`polyalign.config.connect`);
each owns its schema and validation. Unknown keys and ill-typed values raise :class:`ConfigError` naming the key and
its closest valid spellings.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path

import yaml

from polyalign.errors import ConfigError


def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def flat_items(obj, prefix="") -> dict[str, object]:
    """Every leaf of the config tree as ``{"dotted.key": value}``."""
    out = {}
    for name in _fields(obj):
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            out.update(flat_items(value, f"{prefix}{name}."))
        else:
            out[prefix + name] = value
    return out


def get_key(cfg, key: str):
    """The value at a dotted key (``train.batch_size``)."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_choices(cfg, choices: dict[str, tuple]) -> None:
    """Every ``{dotted key: allowed values}`` entry holds one of its values."""
    for key, allowed in choices.items():
        value = get_key(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key: from ``lo`` to ``hi``, each end open or closed; NaN and ±inf never pass."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""  # appended to the message, e.g. what the bound protects

    def __contains__(self, x: float) -> bool:
        finite = isinstance(x, int) or math.isfinite(x)  # an int always is (and may be too large for a float)
        above = x > self.lo if self.lo_open else x >= self.lo
        return finite and above and (x < self.hi if self.hi_open else x <= self.hi)

    def __str__(self) -> str:
        if (self.lo, self.lo_open, self.hi) == (0, True, math.inf):
            return "positive"
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"


def _num(x: float):
    return int(x) if float(x).is_integer() else x  # 4294967295, not 4.29497e+09


def check_ranges(cfg, ranges: dict[str, Range], section: str = "") -> None:
    """Every ``{dotted key: Range}`` entry holds a value in its range (a tuple: each element; a dict: each value,
    named ``key.name``). With ``section`` (e.g. ``model.fusion``), ``cfg`` is that section alone and only its keys
    are checked, still named in full."""
    start = f"{section}." if section else ""
    for key, rule in ranges.items():
        if not key.startswith(start):
            continue
        value = get_key(cfg, key[len(start):])
        for name, v in ([(f"{key}.{k}", x) for k, x in value.items()] if isinstance(value, dict) else [(key, value)]):
            parts = tuple(v) if isinstance(v, (tuple, list)) else (v,)
            if not all(x in rule for x in parts):
                each = "each value of " if isinstance(v, (tuple, list)) else ""
                finite = "finite and " if any(isinstance(x, float) for x in parts) else ""
                why = f" ({rule.why})" if rule.why else ""
                raise ConfigError(f"{each}config key '{name}' must be {finite}{rule}{why}, got {v!r}")


def _unknown(cfg, key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(flat_items(cfg)), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value, typ):
    """Check ``value`` against the annotation ``typ`` and convert where it is safe (int → float, list → tuple)."""
    origin = typing.get_origin(typ)
    bad = ConfigError(f"config key '{key}' expects {getattr(typ, '__name__', str(typ))}, got {value!r}")
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise bad
        return int(value)
    if typ is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if typ is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad
        return str(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(typ)
        if origin is tuple:
            if len(value) != len(args):
                raise bad
            return tuple(_coerce(key, v, t) for v, t in zip(value, args))
        return [_coerce(key, v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        kt, vt = typing.get_args(typ)
        return {_coerce(key, k, kt): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    return value


def set_key(cfg, key: str, value) -> None:
    """Set a dotted key (``train.batch_size``) with type checking; dict-valued fields accept sub-keys."""
    parts = key.split(".")
    node = cfg
    hints_of = lambda obj: typing.get_type_hints(type(obj))  # noqa: E731
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or part not in _fields(node):
            raise _unknown(cfg, key)
        typ = hints_of(node)[part]
        current = getattr(node, part)
        last = i == len(parts) - 1
        if last:
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{key}' is a section; give it a mapping")
                for k, v in value.items():
                    set_key(cfg, f"{key}.{k}", v)
                return
            setattr(node, part, _coerce(key, value, typ))
        elif typing.get_origin(typ) is dict and i == len(parts) - 2:
            _, vt = typing.get_args(typ)
            current = dict(current)
            current[parts[-1]] = _coerce(key, value, vt)
            setattr(node, part, current)
            return
        node = current


def parse_override(text: str) -> tuple[str, object]:
    """Parse ``a.b=c``; the value is read as YAML (``3`` → int, ``[1,2]`` → list, ``bf16`` → str)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


class _DuplicateKey(yaml.YAMLError):
    """A mapping gives ``key`` (dotted from the top) twice, on lines ``first`` and ``second`` (1-based)."""

    def __init__(self, key: str, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


def _reject_duplicates(node: yaml.Node, prefix: str, seen: set[int]) -> None:
    """Raise ``_DuplicateKey`` for the first mapping below ``node`` that gives a key twice (``<<`` merges aside)."""
    if id(node) in seen:  # an alias: checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in lines:
                    raise _DuplicateKey(prefix + key.value, lines[key.value], key.start_mark.line + 1)
                lines[key.value] = key.start_mark.line + 1
            _reject_duplicates(value, f"{prefix}{getattr(key, 'value', '?')}.", seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _reject_duplicates(item, prefix, seen)


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error (SafeLoader keeps the last)."""

    def construct_document(self, node):
        _reject_duplicates(node, "", set())
        return super().construct_document(node)


def read_yaml_mapping(path: Path, what: str = "") -> dict:
    """The top-level mapping of a YAML config file, or a ``ConfigError`` (missing, invalid YAML, a key given twice,
    not a mapping); ``what`` adds context to the not-found message."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" ({what})" if what else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read as UTF-8 text: {e}") from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader) or {}
    except _DuplicateKey as e:
        raise ConfigError(f"config file {path}: key '{e.key}' is given twice (lines {e.first} and {e.second}); YAML "
                          f"would silently keep only the last: merge them into one") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def to_dict(cfg) -> dict:
    """The config as plain YAML-able data (tuples become lists)."""
    def conv(v):
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v
    return conv(dataclasses.asdict(cfg))
