"""Typed, validated configuration: one flat dataclass per params.yaml section, checked by pydantic v2.

    from campe.core.config import load_params, DownloadParams
    p = load_params("params.yaml", "download", DownloadParams)

Each section is a plain dataclass (what the code passes around); `section_model(cls)` derives its pydantic model
(strict types, `extra="forbid"`), which does the checking at the boundary (params files, CLI overrides) and gives
the JSON Schema. An unknown or misspelt key is an error naming the file, the section and the key (with a
suggestion); a value of the wrong type is an error naming the key and the expected type. Nothing is silently
ignored. The sections of a whole params file and the checks across them live with the stages (stages/params.py).

Old keys (params files and saved runs written before a rename) stay readable: a section class may declare
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"old": "new_field"}        # the value goes to new_field (must agree)
    DERIVED_KEYS: ClassVar[dict[str, tuple[type, str]]] = {"key": (int, "other.key")}   # lives in another section now
Both are type-checked like fields; a derived key is dropped here and checked against where it lives by the checks
across sections (campe.train.run_config, stages/params.py).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import pydantic
import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A params file or section that cannot be used as written."""


@functools.cache
def section_model(cls: type) -> type[pydantic.BaseModel]:
    """The pydantic model of dataclass `cls`: same fields, types and defaults; strict (no "64" for 64, no 1 for
    true; an int is a valid float) and closed (unknown keys are errors)."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], f.default)
        else:
            fields[f.name] = (hints[f.name], pydantic.Field(default_factory=f.default_factory))
    for old, new in renamed_keys(cls).items():
        fields[old] = (typing.Optional[hints[new]], pydantic.Field(None, description=f"old name of {new}"))
    for key, (kind, lives) in derived_keys(cls).items():
        fields[key] = (typing.Optional[kind], pydantic.Field(None, description=f"derived from {lives}; leave it out"))
    return pydantic.create_model(cls.__name__, __config__=pydantic.ConfigDict(extra="forbid", strict=True),
                                 __doc__=cls.__doc__, **fields)


def renamed_keys(cls: type) -> dict[str, str]:
    """Old key -> the field that replaced it (a section's RENAMED_KEYS)."""
    return dict(getattr(cls, "RENAMED_KEYS", {}))


def derived_keys(cls: type) -> dict[str, tuple[type, str]]:
    """Key -> (type, where it lives now) for keys a section still accepts but no longer holds (DERIVED_KEYS)."""
    return dict(getattr(cls, "DERIVED_KEYS", {}))


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


_EXPECTED = {"int_type": "an integer", "float_type": "float", "string_type": "str", "bool_type": "true/false",
             "list_type": "a list", "dict_type": "a mapping"}


def _error_line(err: dict[str, Any], where: str) -> str:
    """One pydantic error -> `where.key[0]: expected an integer, got '64'` (the project's one-line format)."""
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
    kind = err["type"]
    if kind in _EXPECTED:
        return f"{where}{loc}: expected {_EXPECTED[kind]}, got {err['input']!r}"
    return f"{where}{loc}: {err['msg']}"


def _plain(value: Any) -> Any:
    """Tuples (from code) as lists, recursively: the models take YAML's types."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str, validate: bool = True) -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types; then its own `validate()` (the
    checks across its fields) unless validate=False."""
    data = dict(data or {})
    fields = [f.name for f in dataclasses.fields(cls)]
    renamed = renamed_keys(cls)
    unknown = [k for k in data if k not in fields and k not in renamed and k not in derived_keys(cls)]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{where}: unknown key '{k}'{_suggest(k, fields)}. Known keys: {', '.join(sorted(fields))}.")
    try:
        checked = section_model(cls).model_validate(_plain(data))
    except pydantic.ValidationError as e:
        raise ConfigError(_error_line(e.errors()[0], where)) from None
    values = {k: getattr(checked, k) for k in data if k in fields}  # only the given keys: the defaults stay its own
    for old, new in renamed.items():
        if old in data:
            if new in values and values[new] != getattr(checked, old):
                raise ConfigError(f"{where}: {old} (the old name of {new}) is {getattr(checked, old)!r} but {new} is "
                                  f"{values[new]!r}; state only {new}")
            values[new] = getattr(checked, old)
    obj = cls(**values)
    if validate and hasattr(obj, "validate"):
        try:
            obj.validate()
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return obj


def json_schema(sections: dict[str, type], title: str = "params.yaml") -> dict[str, Any]:
    """JSON Schema of a params file made of `sections` (name -> dataclass): a closed object of closed objects."""
    props, defs = {}, {}
    for name, cls in sections.items():
        schema = section_model(cls).model_json_schema(ref_template="#/$defs/{model}")
        defs.update(schema.pop("$defs", {}))
        props[name] = schema
    out: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title,
                           "type": "object", "properties": props, "additionalProperties": False}
    if defs:
        out["$defs"] = defs
    return out


def read_yaml(path: str | Path, sections: Iterable[str] | None = None) -> dict[str, Any]:
    """The params file as a dict of sections; with `sections`, any other top-level key is an error naming it."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params PATH)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if sections is not None:
        known = list(sections)
        for key in data:
            if key not in known:
                raise ConfigError(f"{path}: unknown section '{key}:'{_suggest(key, known)}. Known sections: "
                                  f"{', '.join(known)}.")
        for key, value in data.items():
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{path}:{key}: expected a mapping of keys, got {value!r}")
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
