"""Loading typed configs: YAML files plus dotted `key=value` overrides, checked key by key.

    cfg = load_config(TrainJobConfig, "conf/train.yaml", ["model.hidden_size=128"])

Unknown keys and wrong types are errors that name the dotted key; every problem in a file and
its overrides is reported at once. The dataclasses themselves (and their value checks) are in
pipeline/config.py.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError, collect


def load_config(cls: type, path: str | os.PathLike | None = None, overrides: list[str] = (),
                values: dict[str, Any] | None = None):
    """Build `cls` from a YAML file (optional), then `values` (dotted key -> value, e.g. from CLI
    options), then `key=value` overrides; validating every key and type."""
    raw: dict[str, Any] = {}
    problems: list[str] = []
    if path is not None:
        raw = _read_yaml(Path(path))
    for key, value in (values or {}).items():
        _set_dotted(raw, key.split("."), value)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"bad override {item!r}: write it as dotted.key=value")
            continue
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.split("."), parsed)
    collect(problems, ConfigError, "overrides")
    return build(cls, raw)


def build(cls: type, raw: dict[str, Any], prefix: str = ""):
    """Turn a nested dict into dataclass `cls`, reporting every unknown key and bad type."""
    problems: list[str] = []
    value = _convert(cls, raw, prefix, problems)
    # Each line says what to do, not only what is wrong.
    problems = [p if ":" in p else f"{p}: fix it in the config file or the key=value override"
                for p in problems]
    collect(problems, ConfigError, "config")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass an existing YAML file with -c")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML: fix its syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def _set_dotted(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert_dataclass(tp: type, value: Any, key: str, problems: list[str]) -> Any:
    """A nested section: every unknown key reported, every known one converted, then the
    dataclass's own value checks (__post_init__)."""
    if not isinstance(value, dict):
        problems.append(f"{key or 'config'} must be a mapping, got {value!r}")
        return None
    hints = typing.get_type_hints(tp)
    names = {f.name for f in dataclasses.fields(tp) if f.init}
    for unknown in sorted(set(value) - names):
        problems.append(f"unknown config key {key + '.' if key else ''}{unknown}: check the "
                        f"spelling (known: {', '.join(sorted(names))})")
    kwargs = {}
    before = len(problems)
    for f in dataclasses.fields(tp):  # declaration order: stable, readable messages
        if f.init and f.name in value:
            kwargs[f.name] = _convert(hints[f.name], value[f.name],
                                      f"{key}.{f.name}" if key else f.name, problems)
    if len(problems) > before:
        return None
    try:
        return tp(**kwargs)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None


def _convert(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against type `tp`; return the converted value (or None after a problem)."""
    label = key or "config"
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _convert_dataclass(tp, value, key, problems)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner:
            trial: list[str] = []
            converted = _convert(candidate, value, key, trial)
            if not trial:
                return converted
        problems.append(f"{label} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in args:
            problems.append(f"{label} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{label} must be a list, got {value!r}")
            return None
        return [_convert(args[0], item, f"{label}[{i}]", problems) for i, item in enumerate(value)]
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{label} must be a number, got {value!r}")
            return None
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{label} must be an integer, got {value!r}")
            return None
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{label} must be true or false, got {value!r}")
            return None
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{label} must be a string, got {value!r}")
            return None
        return value
    if tp is type(None):
        if value is not None:
            problems.append(f"{label} must be null, got {value!r}")
        return None
    raise TypeError(f"unsupported config type {tp!r} at {label}")
