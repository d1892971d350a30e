"""A manifest's structural check against its published JSON Schema: a compiled validator answers, jsonschema explains.

Every submission is checked at the submitter, again at the hub (on the submit -> result path of each job) and by
each agent: jsonschema's ``iter_errors`` costs ~55 us for a small manifest, fastjsonschema's code compiled from
the same schema ~3 us. The compiled one only says yes or no: a manifest it refuses (or any surprise it raises)
goes to jsonschema, whose errors are the messages users see, so they are unchanged. The two agree on what this
schema uses (draft-07 keywords; ``tests/test_schema_check.py`` holds them to it over a corpus of good and
broken manifests); where they differ the compiled one is the stricter (a ``pattern``'s ``$`` before a final
newline, which Python's ``re`` lets by), and that only costs the slow path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import fastjsonschema
import jsonschema

__all__ = ["SchemaCheck"]


class SchemaCheck:
    """``errors(instance)``: jsonschema's errors, empty (at once) when the compiled check passes."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self.full = jsonschema.Draft202012Validator(schema)
        self._fast: Callable[[Any], Any] | None = None   # compiled on first use (~25 ms: not at import)

    def fast_ok(self, instance: Any) -> bool:
        """Whether the compiled check passes (False on any exception: jsonschema then decides)."""
        if self._fast is None:
            self._fast = fastjsonschema.compile(self.schema, use_default=False)
        try:
            self._fast(instance)
        except Exception:   # JsonSchemaException, or a surprise from generated code: the full check explains
            return False
        return True

    def errors(self, instance: Any) -> list[Any]:   # jsonschema.ValidationError, typed loosely as iter_errors is
        if self.fast_ok(instance):
            return []
        return list(self.full.iter_errors(instance))
