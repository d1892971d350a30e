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

from typing import TYPE_CHECKING, Any

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
        #: (requirements, kind) -> [log entries applied, capable ids]: jobs that ask the same share one set (a
        #: submitter's thousand one-task jobs were a thousand sets of every registered agent, each built anew)
        self._jobs: dict[tuple[Requirements, str], list[Any]] = {}
        self._log: list[AgentState] = []                   # agents whose report changed since the sets were built
        #: job id -> (generation, its key): a pick asks for ~200 jobs' sets several times, and hashing their
        #: requirements was most of ``best-fit``'s pick once its absorbed counts were kept (hub/dispatch/fit_index.py)
        self._by_job: dict[str, tuple[int, tuple[Requirements, str], list[Any]]] = {}
        self._generation = 0                               # bumped whenever keys may leave ``_jobs``
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
            self._generation += 1
        elif self._jobs:
            self._log.extend(changed)

    def capable(self, job_id: str) -> set[str]:
        """The ids of registered agents meeting the job's requirements (the caller must not change it)."""
        known = self._by_job.get(job_id)
        if known is not None and known[0] == self._generation and self._fleet.reports_version == self._read and \
                known[2][0] == len(self._log):   # (asked ~200 times a pick: nothing changed since the last time)
            ids: set[str] = known[2][1]
            return ids
        self.sync()
        if known is not None and known[0] == self._generation:
            key, entry = known[1], known[2]
        else:
            key = (self._queues.requirements(job_id), self._queues.job(job_id).kind)
            found = self._jobs.get(key)
            if found is None:
                found = self._build(key)
            entry = found
            if len(self._by_job) > 2 * len(self._queues) + 64:
                self._by_job.clear()
            self._by_job[job_id] = (self._generation, key, entry)
        if entry[0] < len(self._log):
            req, kind = key
            ids = entry[1]
            for agent in self._log[entry[0]:]:
                if unmet(req, kind, agent.caps):
                    ids.discard(agent.row.id)
                else:
                    ids.add(agent.row.id)
            entry[0] = len(self._log)
        ids_now: set[str] = entry[1]
        return ids_now

    def _build(self, key: tuple[Requirements, str]) -> list[Any]:
        if len(self._jobs) > 64 and len(self._jobs) > 2 * len(self._queues):   # finished jobs: forget
            live = {(self._queues.requirements(j.id), j.kind) for j in self._queues.jobs()}
            self._jobs = {k: e for k, e in self._jobs.items() if k in live}
            self._generation += 1
        if not self._jobs:
            self._log.clear()
        req, kind = key
        ids = {a.row.id for a in self._fleet.agents.values() if not unmet(req, kind, a.caps)}
        entry: list[Any] = [len(self._log), ids]
        self._jobs[key] = entry
        return entry
