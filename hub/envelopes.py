"""Which assignments of a lease reply carry their job's signed manifest envelope, and each envelope decoded once.

A job's envelope is the submitter's whole signed manifest: about 9 bytes per sweep point, 900 KB for a
100k-task job. Sent with every assignment, a reply of N slots carried N copies and 1,000 agents on such a job
held the hub at 9.6 GB. So an envelope goes to an agent once: an agent lists what it holds for this board
(``LeaseRequest.have``: job id -> digest), and a reply carries a job's envelope only if the agent does not
hold that very envelope, and then only in the first of that job's assignments in the reply.

A big envelope (over ``inline_envelope_bytes``) is not put in a lease reply at all: the agent fetches it
(``GET /v1/jobs/{id}/envelope``, hub/envelope_routes.py), streamed from one shared copy with back-pressure,
a bounded number at once. Inline, 10k agents woken by a new 100k-task job would each hold a 900 KB reply
(twice: encoded, then encrypted) until the agent read it; streamed, the hub holds one copy and a chunk per
stream.

Stateless per agent: what the agent holds comes with every request, so an agent restart (it holds nothing),
a hub restart or a failover needs nothing remembered here. An agent that sends no ``have`` (an older one)
gets every small envelope inline, as before, but never a big one: otherwise any agent could leave ``have``
out and make the hub build replies of ``max_tasks_per_lease`` copies of a 900 KB envelope (an older agent
hands such a task back, unrun). What is kept is one decoded :class:`SignedRecord`, its digest and
(once fetched) its encoded bytes per active job, built at its first lease rather than per assignment.

A committed job (jobs/committed.py) has a small envelope (its head and the Merkle root of its units), inlined
once per agent like any small one; each of its assignments carries its unit's proof instead
(:meth:`JobEnvelope.proof`), from the tree built at intake or, after a restart, from the stored lists at the
job's first lease. No agent fetches the lists.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from hub.records import JobRow
from jobs.committed import UnitProof, UnitProofs
from jobs.protocol import envelope_digest
from jobs.wire import MSGPACK, encode_body
from security.errors import PanalError
from security.records import SignedRecord

__all__ = ["JobEnvelope", "JobEnvelopes", "ReplyEnvelopes", "stored_proofs"]

log = logging.getLogger(__name__)


@dataclass
class JobEnvelope:
    """One active job's envelope: decoded once, its digest, and (for the fetch route) its msgpack bytes."""

    job: JobRow                   # the row it was built from: a job loaded anew gets a new entry
    record: SignedRecord
    digest: str
    big: bool                     # over ``inline_envelope_bytes``: fetched, not put in lease replies
    _encoded: bytes | None = field(default=None, repr=False)
    proofs: UnitProofs | None = field(default=None, repr=False)   # of a committed job

    def proof(self, unit: int) -> UnitProof | None:
        """What an assignment of unit ``unit`` carries to prove it against the signed root (None: signed whole)."""
        return self.proofs.proof(unit) if self.proofs is not None else None

    @property
    def encoded(self) -> bytes:
        """The envelope as the fetch route sends it (msgpack), one copy for every agent that fetches it."""
        if self._encoded is None:
            self._encoded = encode_body(self.record.to_wire(), MSGPACK)
        return self._encoded


def stored_proofs(job: JobRow) -> UnitProofs | None:
    """A stored committed job's proofs, rebuilt from the lists kept in its envelope column (None: signed whole, or
    lists this hub cannot open: a kind it no longer enables; its tasks then go out unproven and agents refuse
    them, where a raise here kept the whole board from starting)."""
    lists = job.envelope.get("units") if isinstance(job.envelope, dict) else None
    if lists is None:
        return None
    try:
        return UnitProofs.stored(SignedRecord.from_wire(job.envelope), lists)
    except (PanalError, LookupError, TypeError, ValueError) as exc:
        log.error("job %s: its committed units cannot be proven on this hub (%s): agents will refuse its tasks",
                  job.id, getattr(exc, "message", exc))
        return None


class JobEnvelopes:
    """Active jobs' envelopes by job id."""

    def __init__(self, inline_bytes: int) -> None:
        self.inline_bytes = inline_bytes
        self._jobs: dict[str, JobEnvelope] = {}

    def of(self, job: JobRow, proofs: UnitProofs | None = None) -> JobEnvelope:
        """The job's envelope entry, built at its first use (a committed job's proofs from its stored lists,
        unless ``proofs`` were built at intake)."""
        entry = self._jobs.get(job.id)
        if entry is None or entry.job is not job:
            record = SignedRecord.from_wire(job.envelope)
            size = len(record.payload) + len(record.sig)
            if proofs is None:
                proofs = stored_proofs(job)
            entry = self._jobs[job.id] = JobEnvelope(job, record, envelope_digest(record), size > self.inline_bytes,
                                                     proofs=proofs)
        return entry

    def adopt(self, job: JobRow, proofs: UnitProofs | None) -> None:
        """A committed job's proofs as intake built them, or as a starting board rebuilt them (in a thread): no
        build at its first lease."""
        self.of(job, proofs)

    def forget(self, job_id: str) -> None:
        """The job finished: its envelope is not leased again."""
        self._jobs.pop(job_id, None)

    def __len__(self) -> int:
        return len(self._jobs)


class ReplyEnvelopes:
    """The envelopes of one lease reply: each job's at most once, none the agent holds, none too big to inline."""

    def __init__(self, envelopes: JobEnvelopes, have: Mapping[str, str] | None) -> None:
        self._envelopes, self._have = envelopes, have
        self._done: set[str] = set()
        self.sent = self.omitted = self.to_fetch = 0

    def take(self, job: JobRow) -> SignedRecord | None:
        """The envelope to put in the next assignment of ``job``, or None to leave it out."""
        entry = self._envelopes.of(job)
        if self._have is None and not entry.big:   # an agent that predates ``have`` expects one in each
            self.sent += 1
            return entry.record
        have = self._have or {}
        if job.id in self._done or have.get(job.id) == entry.digest:
            self.omitted += 1
            return None
        self._done.add(job.id)
        if entry.big:            # the agent fetches it: GET /v1/jobs/{id}/envelope
            self.to_fetch += 1
            return None
        self.sent += 1
        return entry.record
