"""A new job whose insert committed but whose acknowledgement was lost (PostgreSQL's connection dropped at COMMIT:
the committer reports the write failed, yet it is in the store) still runs.

``Board.submit`` inserts a new job without reading the store first and, when the insert fails, answers with the
stored job. A stored job that is queued, yet not on the board, is one whose own insert was answered with an error
after it committed: it is queued now, else the submitter is told it exists (and its retry is told the same) while
no agent ever gets its tasks until a hub restart. A lost acknowledgement cannot be made to happen here on demand,
so the real SQLite store's ``create_job`` is wrapped: it commits, then raises what the committer raises then."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from test_single_task_path import Short, manifest

from agent.client.submitting import make_envelope
from jobs.requirements import Capabilities
from security.errors import Unavailable


async def test_a_job_committed_but_answered_with_an_error_is_queued_by_the_next_submit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = Short(tmp_path)
    await short.board.start()
    try:
        await short.board.register_agent(short.agent.public, "a", Capabilities.from_dict({"kinds": ["sleep"]}))
        store, committed = short.board.store, short.board.store.create_job

        async def lost_ack(*args: Any) -> None:
            await committed(*args)
            raise Unavailable("store: lost PostgreSQL at pg://x: ConnectionResetError")
        monkeypatch.setattr(store, "create_job", lost_ack)
        envelope = make_envelope(short.user, manifest(2))
        first = None
        with contextlib.suppress(Unavailable):   # an error is a fair answer to it; a job that never runs is not
            first, _ = await short.board.submit(envelope, short.user.id)
        monkeypatch.setattr(store, "create_job", committed)
        job, created = await short.board.submit(envelope, short.user.id)   # the submitter's retry
        assert not created and (first is None or first.id == job.id)
        leased = await short.board.lease(short.agent.id, 8, 0)
        assert sorted(t.task_id for t in leased) == [f"{job.id}.0", f"{job.id}.1"]
    finally:
        await short.board.stop()
