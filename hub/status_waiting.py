"""Why work waits, for the whole board: one explanation per group of queued jobs with the same kind and
requirements, over capability classes of the connected fleet, bounded per snapshot.

``panal job`` explains one job (:func:`hub.dispatch.explain.explain_waiting`: a pass over every connected
agent). The status page has thousands of jobs and 10k agents, so explaining each job row per view was the
cost of a page. Here the connected agents are folded into capability classes once per snapshot (an agent's
class is computed again only when it re-registers), queued jobs are grouped by (kind, requirements), and
each group is explained with :func:`jobs.requirements.explain_counts` over the classes. A group's lines
are kept while the fleet's classes stay as they were (and at most ``EXPLAIN_TTL_S``); each snapshot
explains at most ``EXPLAIN_BUDGET`` (group x class) pairs, stalest groups first, so the cost per snapshot
is bounded whatever the board holds. Beyond the requirement clauses it says what BOINC's page never did:
every capable agent busy, capable agents quarantined, and, on a small fleet, the job-level reasons
(deadlines, availability windows, one agent per unit) of the group's first job.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hub.fleet import AgentState
from hub.records import JobRow
from jobs.requirements import Capabilities, Requirements, explain_counts, unmet

__all__ = ["EXPLAIN_TTL_S", "MAX_GROUPS", "WaitGroup", "WaitingExplainer"]

EXPLAIN_TTL_S = 20.0       # a group's explanation is reused this long
EXPLAIN_BUDGET = 20_000    # (group, capability class) pairs explained per snapshot
MAX_GROUPS = 50            # groups tracked (the largest backlogs); the rest are counted, not explained
JOB_LEVEL_FLEET_MAX = 2000  # up to this many connected agents, a group's first job gets the per-job reasons
_VOLATILE = ("available_until",)   # report fields that differ per agent but never decide a requirement


@dataclass
class CapClass:
    caps: Capabilities
    connected: int = 0
    busy: int = 0
    quarantined: int = 0


@dataclass
class WaitGroup:
    """Queued jobs of one kind with the same requirements."""

    kind: str
    requirements: Requirements
    jobs: list[str] = field(default_factory=list)
    queued: int = 0
    lines: list[str] = field(default_factory=list)


class WaitingExplainer:
    """Capability classes of the connected fleet and cached explanations of the queued groups."""

    def __init__(self, job_reasons: Callable[[str], list[str]]) -> None:
        self.job_reasons = job_reasons             # the per-job explanation (BoardView.waiting_because)
        self._class_key: dict[str, tuple[Capabilities, str]] = {}     # agent id -> (its caps, their key)
        self._cache: dict[tuple[str, str], tuple[float, int, list[str]]] = {}  # group -> (when, fleet, lines)
        self.classes: dict[str, CapClass] = {}
        self.groups: dict[tuple[str, str], WaitGroup] = {}
        self.by_job: dict[str, tuple[str, str]] = {}
        self._job_key: dict[str, tuple[str, str]] = {}    # job id -> its group key (requirements never change)

    def fold(self, agents: Iterable[AgentState]) -> None:
        """The connected agents as capability classes (call once per snapshot, in chunks if need be)."""
        for agent in agents:
            known = self._class_key.get(agent.row.id)
            if known is None or known[0] is not agent.caps:
                raw = {k: v for k, v in agent.caps.raw.items() if k not in _VOLATILE}
                known = self._class_key[agent.row.id] = (agent.caps, json.dumps(raw, sort_keys=True, default=str))
            cls = self.classes.get(known[1])
            if cls is None:
                cls = self.classes[known[1]] = CapClass(agent.caps)
            cls.connected += 1
            cls.busy += bool(agent.running)
            cls.quarantined += agent.refused is not None

    def begin(self) -> None:
        self.classes, self.groups, self.by_job = {}, {}, {}

    def add_job(self, job: JobRow, requirements: Requirements, queued: int) -> None:
        key = self._job_key.get(job.id)
        if key is None:
            key = self._job_key[job.id] = (job.kind, json.dumps(requirements.to_dict(), sort_keys=True, default=str))
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = WaitGroup(job.kind, requirements)
        group.jobs.append(job.id)
        group.queued += queued
        self.by_job[job.id] = key

    def explain(self, now: float) -> None:
        """Explain the largest groups, reusing fresh cached lines, within the budget."""
        ranked = sorted(self.groups.items(), key=lambda kv: -kv[1].queued)[:MAX_GROUPS]
        fleet = hash(tuple(sorted((k, c.connected, c.busy, c.quarantined) for k, c in self.classes.items())))
        never: tuple[float, int, list[str]] = (float("-inf"), 0, [])
        stale = sorted((self._cache.get(key, never)[0], i) for i, (key, _) in enumerate(ranked)
                       if (cached := self._cache.get(key, never))[1] != fleet or now - cached[0] >= EXPLAIN_TTL_S)
        spent = 0
        for _, i in stale:
            key, group = ranked[i]
            if spent + len(self.classes) > max(EXPLAIN_BUDGET, len(self.classes)):
                break
            spent += len(self.classes)
            self._cache[key] = (now, fleet, self._explain(group))
        for key, group in ranked:
            group.lines = self._cache.get(key, never)[2]
        live = set(self.groups)
        for key in [k for k in self._cache if k not in live]:
            del self._cache[key]
        for job_id in [j for j in self._job_key if j not in self.by_job]:   # finished or no longer queued
            del self._job_key[job_id]

    def _explain(self, group: WaitGroup) -> list[str]:
        classes = list(self.classes.values())
        capable = [c for c in classes if not unmet(group.requirements, group.kind, c.caps)]
        if not capable:     # the requirement clauses nobody connected meets, with how many meet each
            return explain_counts(group.requirements, group.kind, [(c.caps, c.connected) for c in classes])
        lines = []
        n = sum(c.connected for c in capable)
        quarantined = sum(c.quarantined for c in capable)
        busy = sum(c.busy for c in capable)
        if quarantined:
            lines.append(f"{quarantined} of {n} capable connected agents {'is' if quarantined == 1 else 'are'} "
                         "quarantined")
        if busy + quarantined >= n:
            lines.append("every other capable connected agent is busy" if quarantined
                         else "the one capable connected agent is busy" if n == 1
                         else f"all {n} capable connected agents are busy")
        elif sum(c.connected for c in classes) <= JOB_LEVEL_FLEET_MAX:
            lines.extend(self.job_reasons(group.jobs[0]))
        return lines

    def job_lines(self, job_id: str) -> list[str]:
        key = self.by_job.get(job_id)
        group = self.groups.get(key) if key else None
        return group.lines if group else []

    def kind_lines(self, kind: str, limit: int = 3) -> list[str]:
        """The explained groups of a kind, largest backlog first: ``312 tasks of 4 jobs: needs ...``."""
        out = []
        for group in sorted((g for g in self.groups.values() if g.kind == kind and g.lines), key=lambda g: -g.queued):
            jobs = f" of {len(group.jobs)} jobs" if len(group.jobs) > 1 else ""
            out.append(f"{group.queued} task{'s' if group.queued != 1 else ''}{jobs} wait: " + "; ".join(group.lines))
            if len(out) == limit:
                break
        return out
