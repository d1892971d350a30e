"""Which registered agents meet each active job's requirements: asked once per job, kept up to date.

Policies that reason about *other* agents (``best-fit``: how scarce the capable ones are and whether idle
smaller ones absorb a job; ``fastest`` and ``adaptive``: who else could finish it sooner) used to call
``unmet`` for every connected agent, for every candidate job, on every pick: 10,000 agents x 40 jobs is
400,000 calls a pick. Here each job's capable set is built once (one ``unmet`` per agent) and then follows
the fleet: an agent that registers or re-registers with a new report is checked against the jobs already
indexed (one ``unmet`` per indexed job). A changed report is noticed by identity: registering again and
the speed check (hub/trust/speed.py) both put a new ``Capabilities`` on the agent, and :meth:`sync` (run on
the connected agents each time a policy asks who is connected) replays those agents. The answer is exactly
``unmet``'s, so a policy's choices do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from jobs.requirements import Capabilities, unmet

if TYPE_CHECKING:
    from hub.fleet import AgentState
    from hub.queues import JobQueues

__all__ = ["CapableIndex"]


class CapableIndex:
    """Per active job, the ids of registered agents that meet its requirements."""

    def __init__(self, queues: JobQueues, agents: Callable[[], Mapping[str, AgentState]]) -> None:
        self._queues, self._agents = queues, agents
        self._jobs: dict[str, tuple[int, set[str]]] = {}   # job id -> (log entries applied, capable ids)
        self._log: list[AgentState] = []                   # agents whose report changed since the sets were built
        self._seen: dict[str, Capabilities] = {}           # agent id -> the report the sets hold it by

    def sync(self, agents: Iterable[AgentState]) -> None:
        """Notice agents whose report changed (a new ``Capabilities`` object) since they were indexed."""
        seen = self._seen
        for agent in agents:
            if seen.get(agent.row.id) is not agent.caps:
                seen[agent.row.id] = agent.caps
                if self._jobs:
                    self._log.append(agent)
        if len(self._log) > max(4096, 2 * len(seen)):   # cheaper to rebuild than to replay
            self._jobs.clear()
            self._log.clear()

    def capable(self, job_id: str) -> set[str]:
        """The ids of registered agents meeting the job's requirements (the caller must not change it)."""
        req, kind = self._queues.requirements(job_id), self._queues.job(job_id).kind
        entry = self._jobs.get(job_id)
        if entry is None:
            if len(self._jobs) > 64 and len(self._jobs) > 2 * len(self._queues):   # finished jobs: forget
                self._jobs = {j: e for j, e in self._jobs.items() if j in self._queues}
            if not self._jobs:
                self._log.clear()
            agents = self._agents().values()
            self.sync(agents)
            ids = {a.row.id for a in agents if not unmet(req, kind, a.caps)}
            self._jobs[job_id] = (len(self._log), ids)
            return ids
        applied, ids = entry
        if applied < len(self._log):
            for agent in self._log[applied:]:
                if unmet(req, kind, agent.caps):
                    ids.discard(agent.row.id)
                else:
                    ids.add(agent.row.id)
            self._jobs[job_id] = (len(self._log), ids)
        return ids
