"""Heartbeats and releases on the wire: how an agent keeps the leases it holds, or gives one back.

Why its own module: once a task is leased, the agent and board speak about the lease only (extend it with the
task's progress and signed checkpoint, learn it was lost or cancelled, hand it back), never about the work;
these records are that conversation. The lease hand-out is in :mod:`jobs.protocol`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from jobs.committed import UnitProof
from jobs.fields import Fields, signed_field
from security.records import SignedRecord

__all__ = ["Heartbeat", "HeartbeatLease", "HeartbeatReply", "LossReason", "LostLease", "Release", "Released"]


class LossReason(StrEnum):
    """Why a heartbeat's lease is no longer the agent's."""

    LOST = "lost"              # it expired, or another agent holds the task now
    CANCELLED = "cancelled"    # the job was cancelled


@dataclass(frozen=True, slots=True)
class HeartbeatLease:
    """A lease the agent still holds, with its task's progress and latest checkpoint blob."""

    task_id: str
    lease_id: str
    progress: float | None = None
    checkpoint: str | None = None
    #: the lessee's signature over (task, attempt, checkpoint digest): jobs/checkpoints.py
    checkpoint_record: SignedRecord | None = None
    proof: UnitProof | None = None

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task_id": self.task_id, "lease_id": self.lease_id}
        if self.progress is not None:
            out["progress"] = self.progress
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint
        if self.checkpoint_record is not None:
            out["checkpoint_record"] = self.checkpoint_record.to_wire()
        return out

    @classmethod
    def decode(cls, value: Any, path: str = "") -> HeartbeatLease:
        f = Fields(value, path)
        raw = f.raw("checkpoint_record")
        record = signed_field(raw, f.at("checkpoint_record")) if raw is not None else None
        return cls(f.text("task_id"), f.text("lease_id"), f.optional_number("progress"), f.optional_text("checkpoint"),
                   record)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Extend these leases."""

    leases: tuple[HeartbeatLease, ...] = ()

    def encode(self) -> dict[str, Any]:
        return {"leases": [lease.encode() for lease in self.leases]}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> Heartbeat:
        return cls(tuple(HeartbeatLease.decode(item, at) for at, item in Fields(value, path).items("leases")))


@dataclass(frozen=True, slots=True)
class LostLease:
    """A lease of a heartbeat that is not the agent's any more: it should stop the task."""

    task_id: str
    reason: LossReason

    def encode(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "reason": self.reason.value}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> LostLease:
        f = Fields(value, path)
        return cls(f.text("task_id"), f.choice("reason", LossReason))


@dataclass(frozen=True, slots=True)
class HeartbeatReply:
    """The board's lease TTL (the next heartbeat is due well before it) and the leases lost."""

    lease_ttl_s: float = 30.0
    lost: tuple[LostLease, ...] = ()

    def encode(self) -> dict[str, Any]:
        return {"lease_ttl_s": self.lease_ttl_s, "lost": [lost.encode() for lost in self.lost]}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> HeartbeatReply:
        f = Fields(value, path)
        return cls(f.number("lease_ttl_s", 30.0), tuple(LostLease.decode(item, at) for at, item in f.items("lost")))


@dataclass(frozen=True, slots=True)
class Release:
    """Give a lease back (the agent is shutting down): the task is requeued, no attempt used."""

    lease_id: str

    def encode(self) -> dict[str, Any]:
        return {"lease_id": self.lease_id}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> Release:
        return cls(Fields(value, path).text("lease_id"))


@dataclass(frozen=True, slots=True)
class Released:
    released: str      # the task id

    def encode(self) -> dict[str, Any]:
        return {"released": self.released}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> Released:
        return cls(Fields(value, path).text("released"))
