"""Typed, validated configuration: one flat dataclass per params.yaml section.

    from campe.config import load_params, DownloadParams
    p = load_params("params.yaml", "download", DownloadParams)

An unknown or misspelt key is an error naming the file, the section and the key (with a suggestion); a value of the
wrong type is an error naming the key and the expected type. Nothing is silently ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A params file or section that cannot be used as written."""


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = args or (Any,)
        return [_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp in (str, float) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str) -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"{where}: unknown key '{k}'{hint}. Known keys: {', '.join(sorted(fields))}."
        )
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return obj


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params PATH)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_params(path: str | Path, section: str, cls: type[T], overrides: dict[str, Any] | None = None) -> T:
    """Load one section of a params file into `cls`; `overrides` (e.g. from the CLI) win over the file."""
    data = read_yaml(path)
    if section not in data:
        raise ConfigError(f"{path}: missing section '{section}:' (see the params.yaml shipped with campe)")
    merged = {**(data[section] or {}), **(overrides or {})}
    return from_dict(cls, merged, f"{path}:{section}")


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
