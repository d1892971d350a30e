"""Which registered agents meet each active job's requirements: asked once per job, kept up to date.

Policies that reason about *other* agents (``best-fit``: how scarce the capable ones are and whether idle
smaller ones absorb a job; ``fastest`` and ``adaptive``: who else could finish it sooner) used to call
``unmet`` for every connected agent, for every candidate job, on every pick: 10,000 agents x 40 jobs is
400,000 calls a pick. Here each job's capable set is built once (one ``unmet`` per agent) and then follows
the fleet: an agent that registers or re-registers with a new report is checked against the jobs already
indexed (one ``unmet`` per indexed job). Changed reports come from the fleet's report log
(``Fleet.reports_since``: registering again and the speed check, hub/trust/speed.py, are the only ways a
report changes), so no pick walks the fleet to notice them. The answer is exactly ``unmet``'s, so a
policy's choices do not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobs.requirements import unmet

if TYPE_CHECKING:
    from hub.fleet import AgentState, Fleet
    from hub.queues import JobQueues
    from jobs.requirements import Requirements

__all__ = ["CapableIndex"]


class CapableIndex:
    """Per active job, the ids of registered agents that meet its requirements (one set per distinct
    requirements and kind)."""

    def __init__(self, queues: JobQueues, fleet: Fleet) -> None:
        self._queues, self._fleet = queues, fleet
        #: (requirements, kind) -> (log entries applied, capable ids): jobs that ask the same share one set (a
        #: submitter's thousand one-task jobs were a thousand sets of every registered agent, each built anew)
        self._jobs: dict[tuple[Requirements, str], tuple[int, set[str]]] = {}
        self._log: list[AgentState] = []                   # agents whose report changed since the sets were built
        self._read = fleet.reports_version                 # the fleet's report log, read up to here

    @property
    def version(self) -> int:
        """Changes whenever some job's capable set may have changed (a report changed)."""
        return self._fleet.reports_version

    def sync(self) -> None:
        """Take in the agents whose report changed since the last look."""
        fleet = self._fleet
        if fleet.reports_version == self._read:
            return
        changed = fleet.reports_since(self._read)
        self._read = fleet.reports_version
        if changed is None or len(self._log) + len(changed) > max(4096, 2 * len(fleet.agents)):
            self._jobs.clear()   # cheaper (or, the log being gone, only possible) to rebuild than to replay
            self._log.clear()
        elif self._jobs:
            self._log.extend(changed)

    def capable(self, job_id: str) -> set[str]:
        """The ids of registered agents meeting the job's requirements (the caller must not change it)."""
        self.sync()
        req, kind = self._queues.requirements(job_id), self._queues.job(job_id).kind
        key = (req, kind)
        entry = self._jobs.get(key)
        if entry is None:
            if len(self._jobs) > 64 and len(self._jobs) > 2 * len(self._queues):   # finished jobs: forget
                live = {(self._queues.requirements(j.id), j.kind) for j in self._queues.jobs()}
                self._jobs = {k: e for k, e in self._jobs.items() if k in live}
            if not self._jobs:
                self._log.clear()
            ids = {a.row.id for a in self._fleet.agents.values() if not unmet(req, kind, a.caps)}
            self._jobs[key] = (len(self._log), ids)
            return ids
        applied, ids = entry
        if applied < len(self._log):
            for agent in self._log[applied:]:
                if unmet(req, kind, agent.caps):
                    ids.discard(agent.row.id)
                else:
                    ids.add(agent.row.id)
            self._jobs[key] = (len(self._log), ids)
        return ids
