"""Loading a scenario: TOML -> dict -> ``--set`` overrides -> typed dataclasses.

The loader refuses unknown keys, wrong types and impossible values before anything
runs, naming the key by its dotted path.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from fedfuse.config.scenario import FedfuseConfig
from fedfuse.config.sections import EMBEDDED_DATASETS
from fedfuse.errors import ConfigError


def load_config(path: str | Path, overrides: list[str] | None = None,
                rounds: int | None = None) -> FedfuseConfig:
    """Read a scenario file, apply ``key.path=value`` overrides, validate, return the config."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(None, f"scenario file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(None, f"malformed TOML in {path}: {exc}") from None
    for item in overrides or []:
        apply_override(raw, item)
    if rounds is not None:
        raw["rounds"] = rounds
    cfg = config_from_dict(raw)
    cfg.data.source = resolve_source(cfg.data.source, Path.cwd())
    if cfg.code_dir is None:
        cfg.code_dir = str(path.resolve().parent)
    return cfg


def resolve_source(source: str, base_dir: Path) -> str:
    """A data file path made absolute against ``base_dir``; embedded names pass unchanged."""
    if source in EMBEDDED_DATASETS or Path(source).is_absolute():
        return source
    return str((base_dir / source).resolve())


def config_from_dict(raw: dict[str, Any]) -> FedfuseConfig:
    return build(FedfuseConfig, raw, "")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in ``raw``; the value is read as TOML, else as a plain string.

    List entries are addressed by index: ``cohorts.0.clients=5``.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(None, f"override {item!r} is not of the form key.path=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = _list_item(node, part, where)
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(where, "is a value, not a table; cannot set a key inside it")
    last = parts[-1]
    if isinstance(node, list):
        _list_item(node, last, key)
        node[int(last)] = value
    else:
        node[last] = value


def _list_item(items: list[Any], index: str, where: str) -> Any:
    if not index.isdigit() or int(index) >= len(items):
        raise ConfigError(where, f"no list entry {index!r} (the list has {len(items)} entries)")
    return items[int(index)]


def build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(path or None, f"expected a table, got {_tname(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(_join(path, unknown[0]),
                          f"unknown key (known keys here: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(key, "is required")
            continue
        kwargs[name] = _coerce(hints[name], raw[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise exc.within(path) from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {_tname(value)}")
        return {k: _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin is list or (origin is tuple and args[1:] == (Ellipsis,)):
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {_tname(value)}")
        items = [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {_tname(value)} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {_tname(value)} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_tname(value)} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_tname(value)} {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _tname(value: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)

