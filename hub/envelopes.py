"""Which assignments of a lease reply carry their job's signed manifest envelope, and each envelope decoded once.

A job's envelope is the submitter's whole signed manifest: about 9 bytes per sweep point, 900 KB for a
100k-task job. Sent with every assignment, a reply of N slots carried N copies and 1,000 agents on such a job
held the hub at 9.6 GB. So an envelope goes to an agent once: an agent lists what it holds for this board
(``LeaseRequest.have``: job id -> digest), and a reply carries a job's envelope only if the agent does not
hold that very envelope, and then only in the first of that job's assignments in the reply.

Stateless per agent: what the agent holds comes with every request, so an agent restart (it holds nothing),
a hub restart or a failover needs nothing remembered here. An agent that sends no ``have`` (an older one)
gets every envelope, as before. What is kept is one decoded :class:`SignedRecord` and its digest per active
job, built at its first lease rather than per assignment.
"""

from __future__ import annotations

from collections.abc import Mapping

from hub.records import JobRow
from jobs.protocol import envelope_digest
from security.records import SignedRecord

__all__ = ["JobEnvelopes"]


class JobEnvelopes:
    """Active jobs' envelopes as records, with their digests; and which assignments need one."""

    def __init__(self) -> None:
        # job id -> (the row it was built from, the record, its digest). The row is kept to notice a job
        # loaded anew (a restart of the board in this process): its entry is rebuilt, never trusted stale.
        self._jobs: dict[str, tuple[JobRow, SignedRecord, str]] = {}

    def record(self, job: JobRow) -> tuple[SignedRecord, str]:
        """The job's envelope as a record and its digest, decoded once per job."""
        entry = self._jobs.get(job.id)
        if entry is None or entry[0] is not job:
            record = SignedRecord.from_wire(job.envelope)
            entry = self._jobs[job.id] = (job, record, envelope_digest(record))
        return entry[1], entry[2]

    def forget(self, job_id: str) -> None:
        """The job finished: its envelope is not leased again."""
        self._jobs.pop(job_id, None)

    def __len__(self) -> int:
        return len(self._jobs)


class ReplyEnvelopes:
    """The envelopes of one lease reply: each job's at most once, and none the agent holds."""

    def __init__(self, envelopes: JobEnvelopes, have: Mapping[str, str] | None) -> None:
        self._envelopes, self._have = envelopes, have
        self._sent: set[str] = set()
        self.sent = self.omitted = 0

    def take(self, job: JobRow) -> SignedRecord | None:
        """The envelope to put in the next assignment of ``job``, or None to leave it out."""
        record, digest = self._envelopes.record(job)
        if self._have is not None and (job.id in self._sent or self._have.get(job.id) == digest):
            self.omitted += 1
            return None
        self._sent.add(job.id)   # an agent without ``have`` reads no assignment without one: it gets each
        self.sent += 1
        return record
