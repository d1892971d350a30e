"""Kept proofs that faster agents cover a job's queue, so a slow agent is told "none" without a walk.

Under ``fastest`` most asks end in "take none": the asking agent is slower than enough of the others. Proving
that means walking the rivals until they finish as many tasks as are queued, for each job the agent could
run: ~100 jobs x ~40 rivals on every ask. A :class:`Cover` keeps one such proof: the rivals that finish
``parts[b]`` of the job's tasks before an agent needing ``horizon`` seconds would finish one, counted at time
``at``. It stays a proof for a later agent needing at least ``horizon`` seconds, while nothing that could
lower a part has happened:

- time passing lowers no part: a rival's free time moves forward at most as fast as the clock, and so does
  the asking agent's end (``my_end - free`` does not shrink); parts are counted with a millisecond to spare
  against rounding;
- a rival's own events can: when it asks (it may be told to pause: a later free time), takes tasks or has an
  attempt settled (a new speed correction, a new error rate), its parts are taken out (:meth:`Covers.forget`);
- leaving: each part counts only until the rival would drop out of the connected fleet without asking again
  and while its predicted end still fits the job's deadline and its own window (``Cover.until``);
- a gate refusing a rival or a pause told to it (``DispatchView.noted_since``) takes its parts out too;
- a changed report (capable sets, speeds) drops every cover (``epoch``).

The answer is then the walk's: the rivals in the cover alone finish at least as many tasks as are queued
now, so the full sum would too, and the agent takes none.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

__all__ = ["MARGIN_S", "Cover", "Covers"]

#: parts are counted as if each rival had this much less time (rounding of epoch-second differences)
MARGIN_S = 1e-3


@dataclass
class Cover:
    key: Hashable            # what the rivals' runtimes depend on: the head task's cost (and dtype)
    horizon: float           # good for an agent needing at least this long for one task
    at: float                # counted at this time
    until: float             # no part holds past this
    parts: dict[str, int] = field(default_factory=dict)
    total: int = 0


class Covers:
    """Per job, at most one :class:`Cover`; per agent, the jobs whose cover counts it."""

    def __init__(self) -> None:
        self._jobs: dict[str, Cover] = {}
        self._by_agent: dict[str, set[str]] = {}
        self._epoch: Hashable = None
        self._noted = 0

    def begin(self, epoch: Hashable, noted: Callable[[int], tuple[int, list[str] | None]]) -> None:
        """A pick starts: ``epoch`` changes with reports (every cover is dropped then); ``noted(v)`` gives the
        agents whose standing changed since v (their parts are taken out)."""
        self._noted, changed = noted(self._noted)
        if epoch != self._epoch or changed is None:
            self._epoch = epoch
            self._jobs.clear()
            self._by_agent.clear()
            return
        for agent_id in changed:
            self.forget(agent_id)

    def covered(self, job_id: str, key: Hashable, horizon: float, queued: int, now: float) -> bool:
        """Whether a kept cover proves that an agent needing ``horizon`` s should take none of the job."""
        cover = self._jobs.get(job_id)
        if cover is None or cover.key != key or horizon < cover.horizon or not cover.at <= now < cover.until:
            return False
        if cover.total >= queued:
            return True
        if cover.total <= 0 or now >= cover.until:
            self._drop(job_id)
        return False

    def keep(self, job_id: str, cover: Cover) -> None:
        """Keep ``cover`` for the job (replacing the one it had)."""
        self._drop(job_id)
        if not cover.parts or cover.until <= cover.at:
            return
        self._jobs[job_id] = cover
        for agent_id in cover.parts:
            self._by_agent.setdefault(agent_id, set()).add(job_id)
        if len(self._jobs) > 4096:   # jobs long finished: start over (a cover is only ever a shortcut)
            self._jobs.clear()
            self._by_agent.clear()

    def forget(self, agent_id: str) -> None:
        """Something happened to this agent: its parts no longer prove anything."""
        for job_id in self._by_agent.pop(agent_id, ()):
            cover = self._jobs.get(job_id)
            if cover is not None:
                cover.total -= cover.parts.pop(agent_id, 0)

    def _drop(self, job_id: str) -> None:
        cover = self._jobs.pop(job_id, None)
        if cover is not None:
            for agent_id in cover.parts:
                jobs = self._by_agent.get(agent_id)
                if jobs is not None:
                    jobs.discard(job_id)
                    if not jobs:
                        del self._by_agent[agent_id]

    def __len__(self) -> int:
        return len(self._jobs)
