"""The recently finished jobs the status page lists beside the active ones, read from the store.

A finished job has left the board's memory, so its row comes from the store; reading it per snapshot (every
``SNAPSHOT_INTERVAL_S``, and its task counts per job) would put the store on the page's path. Finished jobs
no longer change: the list is read again only after a job finishes (:meth:`RecentJobs.forget`), and a
finished job's task counts are read once and kept while it stays in the list.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hub.readmodel import BoardView, job_summary
from hub.records import JobRow, JobState, TaskState
from hub.status_rows import public_job

__all__ = ["RECENT_JOBS", "RecentJobs"]

RECENT_JOBS = 20               # finished jobs listed beside the active ones


class RecentJobs:
    """The finished jobs among the last :data:`RECENT_JOBS` submitted, as public rows by id (newest first)."""

    def __init__(self, view: BoardView) -> None:
        self.view = view
        self._rows: dict[str, dict[str, Any]] | None = None     # None: read again from the store
        self._final_counts: dict[str, dict[str, int]] = {}      # job id -> its tasks by state, once finished

    def forget(self) -> None:
        """A job finished: the list is read again at the next snapshot."""
        self._rows = None

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        """The rows as last loaded (empty before the first load)."""
        return self._rows or {}

    async def load(self) -> None:
        """Read the list from the store if a job finished since the last read."""
        if self._rows is None:
            finished = [job for job in await self.view.list_jobs(None, RECENT_JOBS) if job.state.terminal]
            self._final_counts = {job.id: await self._counts_of_finished(job) for job in finished}
            self._rows = {job.id: {**public_job(job_summary(job, self._final_counts[job.id])), "eta_s": None,
                                   "quorum": int(job.validation.get("quorum", 1))}
                          for job in finished}

    async def _counts_of_finished(self, job: JobRow) -> dict[str, int]:
        """A finished job's tasks by state: they no longer change, so the store is asked once per job."""
        if job.state == JobState.SUCCEEDED:
            return {TaskState.DONE.value: job.n_tasks}
        known = self._final_counts.get(job.id)
        if known is not None:
            return known
        return dict(Counter(t.state.value for t in await self.view.tasks(job.id)))
