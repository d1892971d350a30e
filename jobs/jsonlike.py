"""Is a value JSON-like and small? The check for free-form params and for values submitted code returns.

Free-form data crosses the wire, is signed and stored, and is compared on the board, so it must be
plain (maps with text keys, lists, text, numbers, booleans, null) and bounded. NaN and infinities are
allowed: a diverged training run reporting ``loss: nan`` is a legitimate result of a sweep point.
Iterative (an explicit stack), so a deeply nested value cannot recurse to death.
"""

from __future__ import annotations

from typing import Any

__all__ = ["jsonlike_problem"]


def jsonlike_problem(value: Any, where: str, *, max_depth: int = 16, max_items: int = 10_000,
                     max_text: int = 65_536) -> tuple[str, str] | None:
    """``(field path, message)`` of the first problem of ``value``, or None when it is JSON-like and
    within the bounds: nesting ``max_depth``, ``max_items`` values in all, ``max_text`` characters per text."""
    stack: list[tuple[Any, str, int]] = [(value, where, 1)]
    items = 0
    while stack:
        item, path, depth = stack.pop()
        items += 1
        if items > max_items:
            return where, f"holds more than {max_items:,} values"
        if depth > max_depth:
            return path, f"nests deeper than {max_depth} levels"
        if item is None or isinstance(item, bool | int | float):
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) >= 2**63:
                return path, f"integer {item} does not fit in 64 bits"
            continue
        if isinstance(item, str):
            if len(item) > max_text:
                return path, f"text of {len(item):,} characters (at most {max_text:,})"
            continue
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return path, f"map key {key!r} is not text"
                if len(key) > 256:
                    return path, f"map key of {len(key)} characters (at most 256)"
                stack.append((child, f"{path}.{key}", depth + 1))
            continue
        if isinstance(item, list | tuple):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
            continue
        hint = " (call .item() or .tolist() on tensors and arrays)" if hasattr(item, "tolist") else ""
        return path, f"expected text, a number, a boolean, null, a list or a map, got {type(item).__name__}{hint}"
    return None
