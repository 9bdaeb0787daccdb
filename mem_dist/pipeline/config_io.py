"""Reading configs: a YAML file and dotted ``key=value`` overrides into typed, frozen sections.

:func:`load_config` builds any config dataclass (``RunConfig`` of :mod:`mem_dist.pipeline.config`,
``EvalConfig`` of :mod:`mem_dist.evaluation.eval_config`) field by field, from its type hints: an
unknown key, a wrong type or a value out of range raises :class:`ConfigError` with one line
naming the key, before any work starts; the entry points turn it into exit code 2
(:mod:`mem_dist.errors`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key."""


T = typing.TypeVar("T")


def load_config(cls: type[T], path: Optional[str] = None, overrides: typing.Sequence[str] = (),
                base: Optional[dict[str, Any]] = None) -> T:
    """Build a ``cls`` config from an optional YAML file and ``key=value`` overrides.

    Args:
        cls: the top-level config dataclass (RunConfig, EvalConfig).
        path: a YAML file, or None for the defaults.
        overrides: dotted ``key=value`` strings; values are parsed as YAML scalars
            (``2`` is an int, ``null`` is None, ``[a, b]`` a list).
        base: raw keys to start from (a recorded config, :func:`to_dict`); the file's keys,
            then the overrides, are laid over them.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: one line naming the offending key or file.
    """
    upgrade = getattr(cls, "upgrade", lambda layer, under: layer)  # old spellings of moved keys, layer by layer
    raw: dict[str, Any] = upgrade(base, None) if base is not None else {}
    if path is not None:
        _lay_over(raw, upgrade(read_yaml(path), raw))
    for key, value in parse_overrides(overrides):
        layer: dict[str, Any] = {}
        _set_dotted(layer, key, value)
        moved = upgrade(layer, raw)
        if moved == layer:  # the value replaces what is there (a dict too: conditions={a: x} is all the conditions)
            _set_dotted(raw, key, value)
        else:  # an old spelling: laid over where the key lives now, so a later key wins whichever spelling each has
            _lay_over(raw, moved)
    return build(cls, raw, prefix="")


def read_yaml(path: str) -> dict[str, Any]:
    """A config file's raw mapping; one-line errors for a missing file, bad YAML or a non-mapping."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    return raw


def _lay_over(tree: dict[str, Any], top: dict[str, Any]) -> None:
    """``top``'s keys into ``tree``, section by section (a section in ``top`` keeps ``tree``'s other keys)."""
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _lay_over(tree[key], value)
        else:
            tree[key] = value


def parse_overrides(overrides: typing.Sequence[str]) -> list[tuple[str, Any]]:
    """``key=value`` strings as (dotted key, YAML-parsed value) pairs; one-line errors."""
    out: list[tuple[str, Any]] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key=value (for example mem.rounds=2)")
        # A later override of a key wins, but one key twice in a row is what the shell makes
        # of an unquoted data.shards=.../{00000..00009}.tar: the last shard alone would win.
        if out and key == out[-1][0]:
            raise ConfigError(f"config key '{key}' is given twice in a row on the command line "
                              "(if the value holds {a..b}, quote it so the shell does not expand it)")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        out.append((key, parsed))
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def build(cls: type, raw: Any, prefix: str) -> Any:
    """A ``cls`` config section from a raw mapping; ``prefix`` names it in errors ("mem.")."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a section (a mapping of keys)")
    if hasattr(cls, "upgrade"):  # old spellings of moved keys (RunConfig.upgrade)
        raw = cls.upgrade(raw)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        name = prefix + str(unknown[0])
        raise ConfigError(f"unknown config key '{name}' (known in this section: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    # A section given without some keys keeps the dataclass defaults for them; nested
    # sections with required keys (data.shards) validate in their own __post_init__.
    for name, f in fields.items():
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            kwargs[name] = default
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - dataclass signature problems are bugs
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'top'}': {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list; got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a string; got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")  # pragma: no cover


def check(ok: bool, key: str, what: str) -> None:
    """Raise a one-line ConfigError "config key 'KEY' WHAT" unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key '{key}' {what}")
