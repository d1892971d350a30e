"""Reading one decoded wire map: each field's type checked once, every error naming the field's path.

A wire record's ``decode`` reads its map through :class:`Fields`. A value of the wrong type is one
:class:`~security.errors.BadRequest` (code ``bad_field``) whose message starts with the path, e.g.
``leases[2].lease_id: expected text, got 5``, and whose ``details`` are ``{"field": path}``. Absent and
null are the same (JSON clients write null for "none"). Numbers keep the type they came with (an int
stays an int), so a decoded record encodes to the bytes it was decoded from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum
from typing import Any, TypeGuard, TypeVar

from security.errors import BadRequest
from security.records import SignedRecord

__all__ = ["Fields", "field_error", "shown", "signed_field"]

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)
_ABSENT: Any = object()


def shown(value: Any) -> str:
    """How a wrong value is named in an error: short scalars as they are, containers by their kind."""
    if value is _ABSENT:
        return "nothing"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, bytes | bytearray):
        return "bytes"
    if isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:37] + "...")
    return type(value).__name__


def field_error(path: str, message: str) -> BadRequest:
    """The 400 for the field at ``path`` (the whole body when empty)."""
    where = path or "body"
    return BadRequest(f"{where}: {message}", code="bad_field", details={"field": where})


def signed_field(value: Any, path: str) -> SignedRecord:
    """A field that holds a signed record (an envelope, a result, a checkpoint's record): a malformed one is an
    error naming the field's path."""
    try:
        return SignedRecord.from_wire(value)
    except BadRequest as exc:
        raise field_error(path, exc.message) from exc


def _text(value: Any) -> TypeGuard[str]:
    return isinstance(value, str)


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _map(value: Any) -> TypeGuard[dict[str, Any]]:
    return isinstance(value, dict)


def _list(value: Any) -> TypeGuard[list[Any]]:
    return isinstance(value, list | tuple)


class Fields:
    """One map of a wire body at ``path`` ("" for the body itself)."""

    __slots__ = ("_map", "path")

    def __init__(self, value: Any, path: str = "") -> None:
        if not isinstance(value, dict):
            raise field_error(path, f"expected a map, got {shown(value)}")
        self._map: dict[str, Any] = value
        self.path = path

    def at(self, name: str) -> str:
        """The path of field ``name`` of this map."""
        return f"{self.path}.{name}" if self.path else name

    def _get(self, name: str, check: Callable[[Any], TypeGuard[T]], expected: str, required: bool) -> T | None:
        value = self._map.get(name, _ABSENT)
        if value is _ABSENT or value is None:
            if required:
                raise field_error(self.at(name), f"expected {expected}, got {shown(value)}")
            return None
        if not check(value):
            raise field_error(self.at(name), f"expected {expected}, got {shown(value)}")
        return value

    def raw(self, name: str) -> Any:
        """A field taken as it is (None when absent)."""
        return self._map.get(name)

    def text(self, name: str) -> str:
        value = self._get(name, _text, "text", True)
        assert value is not None
        return value

    def optional_text(self, name: str) -> str | None:
        return self._get(name, _text, "text", False)

    def number(self, name: str, default: float | None = None) -> float:
        """A number; required unless a ``default`` is given."""
        value = self._get(name, _number, "a number", default is None)
        if value is None:
            assert default is not None
            return default
        return value

    def optional_number(self, name: str) -> float | None:
        return self._get(name, _number, "a number", False)

    def integer(self, name: str, default: int | None = None) -> int:
        """An integer; required unless a ``default`` is given."""
        value = self._get(name, _integer, "an integer", default is None)
        if value is None:
            assert default is not None
            return default
        return value

    def mapping(self, name: str, *, required: bool = False) -> dict[str, Any]:
        """A map (an absent optional one is empty)."""
        value = self._get(name, _map, "a map", required)
        return {} if value is None else value

    def items(self, name: str) -> list[tuple[str, Any]]:
        """A list (absent: empty), each item with its own path: ``name[i]``."""
        value = self._get(name, _list, "a list", False) or []
        at = self.at(name)
        return [(f"{at}[{i}]", item) for i, item in enumerate(value)]

    def choice(self, name: str, enum: type[E]) -> E:
        """One of a string enum's values."""
        text = self.text(name)
        try:
            return enum(text)
        except ValueError:
            options = ", ".join(e.value for e in enum)
            raise field_error(self.at(name), f"expected one of {options}, got {shown(text)}") from None
