"""Board records (rows of the store) and their states."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["AgentRow", "JobRow", "JobState", "ResultRow", "TaskRow", "TaskState"]


class TaskState(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: an instance whose ok result disagreed with the canonical result of its unit (hub/trust/): settled,
    #: never retried, and not a failure of the job (its unit was answered by the other instances)
    INVALID = "invalid"

    @property
    def terminal(self) -> bool:
        return self in (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED, TaskState.INVALID)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class AgentRow:
    id: str
    public_key: str
    name: str
    capabilities: dict[str, Any]
    registered_at: float
    last_seen: float = 0.0
    #: who the agent belongs to, as the admission token that admitted it says (``tokens create --owner``);
    #: never the agent's own claim. None: unknown (each such agent counts as its own owner)
    owner: str | None = None


@dataclass
class JobRow:
    id: str
    name: str
    submitter_id: str
    kind: str
    priority: int
    state: JobState
    created_at: float
    n_tasks: int
    envelope: dict[str, Any]           # the submitter's signed manifest, as on the wire
    requires: dict[str, Any]
    timeout_s: float
    max_attempts: int
    deadline_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    #: how the job's results are validated (hub/trust/policy.py ``ValidationPolicy.to_dict``); {} = none
    validation: dict[str, Any] = field(default_factory=dict)
    #: the manifest's ``spec.report`` ({metric, mode}, jobs/report.py); {} = none
    report: dict[str, Any] = field(default_factory=dict)
    #: the best accepted task so far by that metric (hub/best.py ``BestTasks``), stored with the job
    best: dict[str, Any] | None = None


@dataclass
class TaskRow:
    id: str
    job_id: str
    idx: int
    params: dict[str, Any]
    state: TaskState = TaskState.QUEUED
    attempt: int = 1
    lease_id: str | None = None
    agent_id: str | None = None
    lease_expires_at: float | None = None
    error: str | None = None
    error_class: str | None = None
    progress: float = 0.0
    updated_at: float = 0.0
    checkpoint: str | None = None      # sha256 of the latest checkpoint blob (resume on requeue)
    #: the lessee's signed record of that checkpoint (jobs/checkpoints.py), as on the wire
    checkpoint_record: dict[str, Any] | None = None
    #: the logical unit (sweep point) this row is an instance of; None: its own index. Instances of one
    #: unit share params and are compared by the board's validator (hub/trust/)
    unit: int | None = None

    @property
    def unit_idx(self) -> int:
        return self.idx if self.unit is None else self.unit

    @property
    def shown_state(self) -> str:
        """The state as users see it: a row whose agent answered and whose result awaits its unit's
        other instances is ``validating`` (it keeps the LEASED state inside the board, with no lease)."""
        if self.state == TaskState.LEASED and self.lease_id is None:
            return "validating"
        return self.state.value


@dataclass
class ResultRow:
    task_id: str
    job_id: str
    attempt: int
    agent_id: str
    record: dict[str, Any]             # the agent's signed result, as on the wire
    digest: str
    accepted_at: float


@dataclass(frozen=True)
class HistoryBucket:
    """One interval of the status page's 24-hour history (hub/status_history.py): attempts settled in it,
    and the fleet and backlog as last seen in it. Stored so that the history survives a hub restart."""

    start: float          # epoch seconds at the interval's start (a multiple of its length)
    done: int = 0         # attempts that ended done in the interval
    failed: int = 0       # attempts that ended failed (or invalid)
    agents: int = 0       # agents connected: the most seen in the interval
    backlog: int = 0      # queued tasks: the last look in the interval
