"""The manifest envelopes one board sent this agent, by that board's job ids: what a lease request says the
agent holds (``LeaseRequest.have``), and where an assignment that came without its envelope finds it.

A job's envelope (its submitter's whole signed manifest, 900 KB for a 100k-task sweep) crosses the wire once
per agent: the board leaves it out of assignments whose job the agent says it holds (hub/envelopes.py), and
leaves a big one out altogether: the link then fetches it from the same board (``GET /v1/jobs/{id}/envelope``).

One book per board link, on purpose. Boards choose their job ids; the verified manifests
(:class:`~agent.daemon.assignments.ManifestCache`) are keyed by the envelope itself so that one board naming
another board's job id never borrows that board's manifest or consent. An assignment without an envelope is
resolved only through the book of the link it came from, so a board can only point at an envelope *it* sent.

Nothing is evicted under a request in flight: :meth:`EnvelopeBook.held` is a snapshot that keeps every entry
its ``have`` names until that reply's assignments are resolved, whatever the book drops meanwhile.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence

from jobs.protocol import MAX_HAVE, Assignment, envelope_digest
from security.records import SignedRecord

__all__ = ["DEFAULT_BOOK_SIZE", "MAX_BOOK_BYTES", "EnvelopeBook", "HeldEnvelopes"]

#: envelopes kept per board: jobs this agent works on at once from one board are far fewer
DEFAULT_BOOK_SIZE = 32
#: and their bytes at most (the newest is always kept): a lying board's 16 MiB envelopes must not make the
#: agent hold 32 of them
MAX_BOOK_BYTES = 64 * 1024 * 1024


class HeldEnvelopes:
    """What one lease request said the agent holds, pinned until its reply is resolved."""

    def __init__(self, book: EnvelopeBook, entries: dict[str, tuple[str, SignedRecord]]) -> None:
        self._book, self._entries = book, entries

    @property
    def have(self) -> dict[str, str]:
        """The request's ``have``: job id -> envelope digest."""
        return {job_id: digest for job_id, (digest, _) in self._entries.items()}

    def add(self, job_id: str, record: SignedRecord) -> None:
        """An envelope this board sent when asked (``GET /v1/jobs/{id}/envelope``): held from now on."""
        self._entries[job_id] = self._book.learn(job_id, record)

    def resolve(self, tasks: Sequence[Assignment]) -> tuple[list[Assignment], list[Assignment]]:
        """The reply's assignments, in order, each with its envelope (one that came with it, else the one this
        board sent before: named in ``have`` or earlier in the reply); and those without one the agent holds,
        which must not run."""
        resolved: list[Assignment] = []
        missing: list[Assignment] = []
        for task in tasks:
            if task.envelope is not None:
                self._entries[task.job_id] = self._book.learn(task.job_id, task.envelope)
                resolved.append(task)
                continue
            entry = self._entries.get(task.job_id)
            if entry is None:
                missing.append(task)
                continue
            self._book.touch(task.job_id, entry)
            resolved.append(dataclasses.replace(task, envelope=entry[1]))
        return resolved, missing


class EnvelopeBook:
    """One board's envelopes by its job ids, the most recently used kept (at most ``size``, ``max_bytes``)."""

    def __init__(self, size: int = DEFAULT_BOOK_SIZE, max_bytes: int = MAX_BOOK_BYTES) -> None:
        self.size = max(1, min(size, MAX_HAVE))   # ``have`` names every entry: within the wire's bound
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[str, SignedRecord]] = OrderedDict()
        self._bytes = 0

    def held(self) -> HeldEnvelopes:
        """A snapshot for the next lease request: its ``have``, and the entries to resolve its reply with."""
        return HeldEnvelopes(self, dict(self._entries))

    def learn(self, job_id: str, record: SignedRecord) -> tuple[str, SignedRecord]:
        """Keep an envelope the board sent with job ``job_id`` (a newer one replaces the old)."""
        entry = self._entries.get(job_id)
        if entry is None or entry[1] != record:
            entry = (envelope_digest(record), record)
        self.touch(job_id, entry)
        return entry

    def touch(self, job_id: str, entry: tuple[str, SignedRecord]) -> None:
        old = self._entries.get(job_id)
        if old is not None:
            self._bytes -= len(old[1].payload)
        self._entries[job_id] = entry
        self._bytes += len(entry[1].payload)
        self._entries.move_to_end(job_id)
        while len(self._entries) > 1 and (len(self._entries) > self.size or self._bytes > self.max_bytes):
            self._bytes -= len(self._entries.popitem(last=False)[1][1].payload)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._entries
