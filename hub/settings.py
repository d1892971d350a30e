"""One settings loader for hub and agent files: YAML file, then env, then flags, into a frozen dataclass.

Precedence is flag > env > file > default (DESIGN.md). Values are checked against the dataclass's
field types, so a typo or a wrong type is one clear error at start-up rather than a crash later:
``bool`` takes only true/false, numbers are coerced to the field's type, ``tuple[str, ...]``
takes a list (or, from env, comma-separated text), ``dict[str, V]`` a map whose values are checked
as ``V``, and ``str`` takes text (from env: the text as written).
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from security.errors import BadRequest

__all__ = ["load_settings"]

S = TypeVar("S")


def load_settings(cls: type[S], *, what: str, env_prefix: str, path: Path | None = None,
                  section: str | None = None, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> S:
    """Build ``cls`` (a frozen dataclass) from ``path`` (its ``section`` map, if given), then env
    ``<env_prefix><NAME>`` (``os.environ`` unless ``env``), then ``overrides`` (flags: ``None`` or
    an empty tuple means "not given"). ``what`` names the settings in errors ("hub", "lan")."""
    assert is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    values: dict[str, Any] = dict(_from_file(path, section)) if path is not None and path.exists() else {}
    environ = os.environ if env is None else env
    for name in known:
        text = environ.get(env_prefix + name.upper())
        if text is not None:
            values[name] = _from_env(hints[name], text)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None and v != ()})
    unknown = sorted(str(k) for k in set(values) - set(known))  # YAML keys may be any scalar
    if unknown:
        raise BadRequest(f"unknown {what} setting(s): {', '.join(unknown)} (known: {', '.join(known)})")
    return cls(**{name: _check(f"{what} setting {name}", hints[name], value) for name, value in values.items()})


def _from_file(path: Path, section: str | None) -> Mapping[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise BadRequest(f"{path}: expected a map of settings")
    if section is None:
        return data
    part = data.get(section) or {}
    if not isinstance(part, dict):
        raise BadRequest(f"{path}: '{section}' must be a map of settings")
    return part


def _from_env(hint: Any, text: str) -> Any:
    if hint is str:
        return text
    if typing.get_origin(hint) is tuple:
        return text.split(",")
    return yaml.safe_load(text)


def _check(where: str, hint: Any, value: Any) -> Any:
    """``value`` as the type ``hint`` asks for, or a BadRequest naming ``where``."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise BadRequest(f"{where}: expected true or false, got {value!r}")
    elif hint in (int, float):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise BadRequest(f"{where}: expected a number, got {value!r}")
        return hint(value)
    elif hint is str:
        if not isinstance(value, str):
            raise BadRequest(f"{where}: expected text, got {value!r}")
    elif origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise BadRequest(f"{where}: expected a list, got {value!r}")
        return tuple(str(v).strip() for v in items if str(v).strip())
    elif origin is dict:
        if not isinstance(value, dict):
            raise BadRequest(f"{where}: expected a map, got {value!r}")
        _, value_hint = typing.get_args(hint)
        return {str(k): _check(f"{where}.{k}", value_hint, v) for k, v in value.items()}
    return value
