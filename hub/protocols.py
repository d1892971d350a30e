"""The shapes of everything that plugs into a board, named once.

A :class:`DispatchPolicy` chooses which queued tasks an asking agent gets; it sees the board only
through a :class:`DispatchView` (ask the queues for candidates, take the ones it chooses).
:class:`BoardObserver` objects hear every settled attempt (results and expired leases): how
policies learn observed speeds and how black-hole detection learns failure rates. A
:class:`LeaseGate` may refuse an agent work with a reason the agent and the status page show. A
:class:`Holdback` keeps particular queued tasks from a particular agent for one lease request (an
OOM retry waits for more memory). A :class:`ResultValidator` decides whether an ok result is the
answer: accept it, reject it (the attempt failed), or hold it pending until more replicas arrive.

Everything here is registered on a board explicitly (constructor arguments, ``Board.add_*``).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from hub.config import HubConfig
    from hub.dispatch.predict import Predictor
    from hub.fleet import AgentState
    from hub.records import JobRow, ResultRow, TaskRow
    from jobs.requirements import Requirements

__all__ = ["ACCEPT", "PENDING", "BoardObserver", "Decision", "DispatchPolicy", "DispatchTimer", "DispatchView",
           "Event", "EventListener", "Holdback", "LeaseGate", "QueueView", "ResultValidator", "Verdict"]

#: a board event (``{"type": ..., "at": ..., ...}``) as listeners and the live status feed get it
Event = dict[str, Any]
EventListener = Callable[[Event], None]
#: told how many seconds each dispatch decision (one ``DispatchPolicy.pick``) took
DispatchTimer = Callable[[float], None]


class BoardObserver(Protocol):
    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        """One attempt ended: a result (ok or failed) or an expired lease (failure "agent_lost")."""


class LeaseGate(Protocol):
    def refuse(self, agent: AgentState) -> str | None:
        """A reason to give this agent no work now, or None."""


class QueueView(Protocol):
    """The queued work of the active jobs, as a policy may see and take it."""

    def waiting(self) -> Iterator[str]:
        """Ids of active jobs with queued tasks: highest priority first, then the oldest."""

    def jobs(self) -> Iterable[JobRow]:
        """Every active job, with queued tasks or not."""

    def __len__(self) -> int:
        """How many jobs are active (indexes kept per job forget finished ones as this falls)."""

    def job(self, job_id: str) -> JobRow: ...

    def requirements(self, job_id: str) -> Requirements: ...

    def queued(self, job_id: str) -> int:
        """How many of the job's tasks wait in its queue now."""

    def leased(self, job_id: str) -> int:
        """How many of the job's tasks are out on lease."""

    def task(self, task_id: str) -> TaskRow | None:
        """An active job's task by id (None: its job is over)."""

    def is_queued(self, task_id: str) -> bool:
        """Whether the task waits in a queue now (not leased, settled, or in retry backoff)."""

    def peek(self, job_id: str, limit: int) -> list[TaskRow]:
        """The first ``limit`` queued tasks of the job, in queue order, left in the queue."""

    def take(self, job_id: str, tasks: Sequence[TaskRow]) -> None:
        """Remove these queued tasks (seen with ``peek``) from the job's queue; the rest keep their order."""

    def take_first(self, job_id: str, limit: int) -> list[TaskRow]:
        """Remove and return the first ``limit`` queued tasks of the job."""


class DispatchView(Protocol):
    """What a policy sees when an agent asks for work."""

    @property
    def queues(self) -> QueueView: ...

    @property
    def config(self) -> HubConfig: ...

    def now(self) -> float: ...

    def connected(self) -> list[AgentState]:
        """Agents that can take work now: seen recently or holding a lease, and not past their window."""

    def is_connected(self, agent: AgentState) -> bool:
        """Whether :meth:`connected` would list this agent (no list built: for policies that visit a few)."""

    def connected_ids(self) -> Container[str]:
        """The ids of the agents :meth:`connected` would list (a live view: read it within one pick)."""

    def stays_until(self, agent: AgentState) -> float | None:
        """Until when the agent stays connected without asking again (None: only while it holds a lease)."""

    def noted_since(self, version: int) -> tuple[int, list[str] | None]:
        """The current version, and the ids of agents whose standing changed outside a pick of their own after
        ``version`` (a gate began refusing one, one was told to pause; None: too far back): what a policy keeps
        about other agents must be redone for them."""

    def idle(self) -> Iterable[AgentState]:
        """The connected agents with a free slot (kept as leases come and go, not filtered per call)."""

    def idle_ids(self) -> Container[str]:
        """The ids of the agents :meth:`idle` would list (a live view: read it within one pick)."""

    def slots_version(self) -> int:
        """Counts changes to connected agents' free slots (an index over free slots follows it)."""

    def slots_since(self, version: int) -> list[str] | None:
        """Ids of connected agents whose free slots changed after ``version`` (None: too far back)."""

    def agents(self) -> Mapping[str, AgentState]:
        """Every registered agent by id, connected or not."""

    def reports_version(self) -> int:
        """Counts registrations and changed capability reports (an index over reports follows it)."""

    def reports_since(self, version: int) -> list[AgentState] | None:
        """The agents registered or with a changed report after ``version`` (None: too far back; rebuild)."""

    def presence_version(self) -> int:
        """Counts changes to who is connected (an index over connected agents follows it)."""

    def presence_since(self, version: int) -> list[tuple[str, bool]] | None:
        """(agent id, joined) for each change to who is connected after ``version`` (None: too far back)."""

    def capable(self, job_id: str) -> set[str]:
        """Ids of the registered agents meeting the active job's requirements (``unmet`` is empty), kept up to
        date as reports change; read it, do not change it."""

    def capable_connected(self, job_id: str) -> int:
        """How many connected agents meet the active job's requirements."""


class DispatchPolicy(BoardObserver, Protocol):
    """Chooses the tasks an agent gets; hears every settled attempt (a policy may learn from them)."""

    name: str

    @property
    def predictor(self) -> Predictor | None:
        """What the policy learned of agents' speeds (explains why a job waits), if it predicts runtimes."""

    def pick(self, view: DispatchView, agent: AgentState, slots: int) -> list[TaskRow]:
        """Take up to ``slots`` queued tasks the agent can run from ``view.queues`` and return them."""


class Holdback(Protocol):
    def held_back(self, agent: AgentState, view: DispatchView) -> Iterable[str]:
        """Ids of queued tasks to keep from this agent for this request; they go back to the front after."""


class Decision(StrEnum):
    ACCEPT = "accept"        # the result is the task's answer
    REJECT = "reject"        # the result is wrong: the attempt failed (retried while attempts remain)
    PENDING = "pending"      # no verdict yet: hold the result until more replicas arrive
    INVALID = "invalid"      # the result disagrees with its unit's validated answer: the instance ends invalid
    FAIL = "fail"            # the unit's instances found no consensus: the task fails, not retried


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str = ""         # why, for a rejection: the task's error and the agent's answer

    @classmethod
    def reject(cls, reason: str) -> Verdict:
        return cls(Decision.REJECT, reason)


ACCEPT = Verdict(Decision.ACCEPT)
PENDING = Verdict(Decision.PENDING)


class ResultValidator(Protocol):
    def judge(self, job: JobRow, task: TaskRow, result: ResultRow) -> Verdict:
        """Judge an ok result of ``task``. A held (pending) result is judged again each time another
        ok result of its job arrives, until the verdict is accept or reject; held results live in
        memory only (after a restart their tasks run again)."""
