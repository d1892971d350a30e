"""Results on the wire: what an agent delivers (signed result records) and what the board made of each.

Why its own module: results travel on three routes (riding along a lease request, ``POST /v1/results``, ``POST
/v1/tasks/{task_id}/result``) and come back as one outcome each on two (a lease reply, a results reply), so their
records and the rule that one unreadable item never costs a batch its other results are shared by all of them.
The lease exchange itself is in :mod:`jobs.protocol`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from jobs.fields import Fields, signed_field
from security.errors import BadRequest, PanalError
from security.records import SignedRecord

__all__ = [
    "Outcome",
    "ResultItem",
    "ResultOutcome",
    "ResultsReply",
    "ResultsRequest",
    "TaskResult",
    "UnreadableResult",
    "decode_outcomes",
    "decode_results",
]


class Outcome(StrEnum):
    """What the board made of a delivered result."""

    ACCEPTED = "accepted"      # the attempt is settled (an ok result is the answer, or a failure report)
    DUPLICATE = "duplicate"    # the same result was settled before: nothing changed
    PENDING = "pending"        # received and held until more replicas arrive
    REJECTED = "rejected"      # refused: see the error


@dataclass(frozen=True, slots=True)
class UnreadableResult:
    """A delivered result that is no signed record: refused on its own, so one bad item of a batch
    never costs the agent the batch's other results."""

    raw: Any
    error: BadRequest

    def to_wire(self) -> Any:
        return self.raw


#: one item of a batch of delivered results
ResultItem = SignedRecord | UnreadableResult


def decode_results(fields: Fields, name: str) -> tuple[ResultItem, ...]:
    """The list ``name`` of delivered results, each a signed record or, if it is none, an :class:`UnreadableResult`."""
    items: list[ResultItem] = []
    for path, raw in fields.items(name):
        try:
            items.append(signed_field(raw, path))
        except BadRequest as exc:
            items.append(UnreadableResult(raw, exc))
    return tuple(items)


@dataclass(frozen=True, slots=True)
class ResultOutcome:
    """What the board made of one delivered result. A rejected one carries the board's error; on the
    agent's side that is a plain :class:`PanalError` with the board's code and message (the wire
    carries no error class)."""

    task_id: str
    status: Outcome
    error: PanalError | None = None

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task_id": self.task_id, "status": self.status.value}
        if self.error is not None:
            out.update(self.error.to_body())
        return out

    @classmethod
    def decode(cls, value: Any, path: str = "") -> ResultOutcome:
        f = Fields(value, path)
        code, message = f.optional_text("error"), f.optional_text("message")
        error = None if code is None else PanalError(message or code, code=code, details=f.raw("details"))
        return cls(f.text("task_id"), f.choice("status", Outcome), error)


def decode_outcomes(f: Fields, name: str) -> tuple[ResultOutcome, ...]:
    """The list ``name`` of result outcomes (a lease reply's, a results reply's)."""
    return tuple(ResultOutcome.decode(item, path) for path, item in f.items(name))


@dataclass(frozen=True, slots=True)
class ResultsRequest:
    """Signed results delivered without asking for work."""

    results: tuple[ResultItem, ...] = ()

    def encode(self) -> dict[str, Any]:
        return {"results": [r.to_wire() for r in self.results]}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> ResultsRequest:
        return cls(decode_results(Fields(value, path), "results"))


@dataclass(frozen=True, slots=True)
class ResultsReply:
    """An outcome per delivered result, in order."""

    results: tuple[ResultOutcome, ...] = ()

    def encode(self) -> dict[str, Any]:
        return {"results": [o.encode() for o in self.results]}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> ResultsReply:
        return cls(decode_outcomes(Fields(value, path), "results"))


@dataclass(frozen=True, slots=True)
class TaskResult:
    """One task's signed result (the route names the task)."""

    result: SignedRecord

    def encode(self) -> dict[str, Any]:
        return {"result": self.result.to_wire()}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> TaskResult:
        f = Fields(value, path)
        return cls(signed_field(f.raw("result"), f.at("result")))
