"""Results reach a real board in requests under its ``max_body_bytes`` (agent/daemon/result_batches.py):
many large results are split across requests, and one that can never fit becomes a signed failure
instead of wedging the outbox."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import InProcessHub
from helpers import wait_for_async

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from agent.daemon import delivery
from agent.daemon.board_link import BoardLink, Running
from agent.daemon.outbox import Outbox
from agent.daemon.result_batches import BATCH_WINDOW_S, batch_window_s, encoded_size, take_batch
from agent.daemon.settings import DaemonSettings
from agent.daemon.slots import Slots
from hub.records import TaskState
from jobs.committed import UNIT_PROOFS
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from jobs.protocol_registration import Registration
from jobs.requirements import Capabilities
from security.identity import Identity
from security.records import SignedRecord

KIB = 1024


class _Owner:
    """What a BoardLink needs of its daemon; leased tasks are only noted (the test finishes them)."""

    def __init__(self, identity: Identity, slots: int) -> None:
        self.identity = identity
        self.settings = DaemonSettings(poll_wait_s=0.2)
        self.stopping = False
        self.slots = Slots(slots, lambda: True)
        self.board_count = 1
        self.started: list[Assignment] = []

    def registration(self) -> Registration:
        caps = Capabilities.from_dict({"kinds": ["sleep"], "features": [UNIT_PROOFS]})   # as a real agent reports
        return Registration(self.identity.public, "big", caps)

    def start_task(self, link: BoardLink, assignment: Assignment) -> None:
        self.started.append(assignment)


def _result(identity: Identity, a: Assignment, pad_bytes: int) -> SignedRecord:
    now = time.time()
    payload: dict[str, Any] = {"task_id": a.task_id, "job_id": a.job_id, "lease_id": a.lease_id,
                               "attempt": a.attempt, "agent_id": identity.id, "status": "ok", "started_at": now,
                               "finished_at": now, "metrics": {}, "notes": [], "environment": {},
                               "unit": a.idx, "params": a.params, "values": {"pad": "x" * pad_bytes},
                               "outputs": {}}
    return SignedRecord.sign(identity, payload)


@dataclass
class _Rig:
    """A real in-process board with one submitted ``sleep`` job and a started link of one agent to it."""

    server: Any
    owner: _Owner
    link: BoardLink
    outbox: Outbox
    identity: Identity


@asynccontextmanager
async def _rig(tmp_path: Path, seconds: list[float], slots: int, **hub_settings: Any) -> AsyncIterator[_Rig]:
    hub = InProcessHub(tmp_path, **hub_settings)
    server = await hub.start()
    assert hub.address is not None
    submitter = Identity.generate()
    await server.add_submitter(submitter.public, "user")
    manifest = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "batch"},
                                   "spec": {"task": "sleep", "sweep": {"seconds": seconds}}})
    identity = Identity.generate()
    owner = _Owner(identity, slots=slots)
    client = BoardClient(hub.address, identity, retry_for_s=1)
    outbox = Outbox(tmp_path / "outbox", hub.address.url)
    link = BoardLink(owner, hub.address, client, outbox)
    async with BoardClient(hub.address, submitter) as sub:
        await submit(sub, make_envelope(submitter, manifest))
    link.start()
    try:
        yield _Rig(server, owner, link, outbox, identity)
    finally:
        await link.stop()
        await client.close()
        await hub.stop()


def test_a_batch_takes_what_fits_and_a_lone_oversized_result_travels_alone() -> None:
    me = Identity.generate()
    small, big = SignedRecord.sign(me, {"pad": "x" * 40 * KIB}), SignedRecord.sign(me, {"pad": "x" * 300 * KIB})
    batch, rest = take_batch([small, small, small, big], 128 * KIB)
    assert (len(batch), len(rest)) == (3, 1)
    assert sum(encoded_size(r) for r in batch) <= 128 * KIB
    assert take_batch([big, small], 128 * KIB) == ([big], [small])


async def test_large_results_reach_the_board_in_batches_and_a_too_large_one_fails_signed(tmp_path: Path) -> None:
    # Four ~100 KiB results (over the 256 KiB body limit together) and one of ~400 KiB (over it alone),
    # with max_result_bytes above both, so only the request size stands in the way.
    async with _rig(tmp_path, [0.0] * 5, slots=5, max_body_bytes=256 * KIB, max_result_bytes=1024 * KIB,
                    max_poll_wait_s=0.2) as rig:
        await wait_for_async(lambda: len(rig.owner.started) == 5, "five tasks leased")
        assert rig.link.results.max_body_bytes == 256 * KIB   # as GET /v1/limits says
        *small, big = sorted(rig.owner.started, key=lambda a: a.idx)
        for a in small:
            rig.link.results.queue_result(_result(rig.identity, a, 100 * KIB), ok=True)
        rig.link.results.queue_result(_result(rig.identity, big, 400 * KIB), ok=True)

        await wait_for_async(lambda: len(rig.outbox) == 0, "every result delivered")
        by_id = {t.id: t for t in await rig.server.board.tasks_of(big.job_id)}   # settled as the board answered
        assert {by_id[a.task_id].state for a in small} == {TaskState.DONE}
        failed = by_id[big.task_id]
        assert failed.state == TaskState.FAILED
        assert failed.error is not None and "max_body_bytes" in failed.error
        assert not rig.link.results.pending


async def test_a_board_refusing_a_batch_as_too_large_gets_smaller_batches_until_all_arrive(tmp_path: Path) -> None:
    # As with a board that does not publish its limit: the agent assumes more than the board takes,
    # hears 413 and halves what it sends until the results pass.
    async with _rig(tmp_path, [0.0] * 4, slots=4, max_body_bytes=128 * KIB, max_poll_wait_s=0.2) as rig:
        await wait_for_async(lambda: len(rig.owner.started) == 4, "four tasks leased")
        rig.link.results.max_body_bytes = 1024 * KIB   # what it would assume of a board that says nothing
        for a in rig.owner.started:
            rig.link.results.queue_result(_result(rig.identity, a, 60 * KIB), ok=True)
        await wait_for_async(lambda: len(rig.outbox) == 0, "every result delivered")
        assert rig.link.results.max_body_bytes <= 128 * KIB
        tasks = await rig.server.board.tasks_of(rig.owner.started[0].job_id)
        assert {t.state for t in tasks} == {TaskState.DONE}


async def test_a_result_waits_for_company_only_while_other_tasks_run(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush loop's batching window (5 ms) is for results finishing together; a result with nothing
    else running goes at once (a one-task job's submitter would only wait), and both reach the board."""
    windows: list[tuple[int, float]] = []

    def recorded(still_running: int) -> float:
        windows.append((still_running, batch_window_s(still_running)))
        return windows[-1][1]
    monkeypatch.setattr(delivery, "batch_window_s", recorded)
    # max_poll_wait_s=30: the free slot's lease request stays parked meanwhile
    async with _rig(tmp_path, [0.0, 0.0], slots=3, max_poll_wait_s=30) as rig:
        link, outbox = rig.link, rig.outbox
        await wait_for_async(lambda: len(rig.owner.started) == 2, "both tasks leased")
        first, second = sorted(rig.owner.started, key=lambda a: a.idx)
        link.running[second.task_id] = Running(second)        # still running: the first result waits for it
        link.results.queue_result(_result(rig.identity, first, 0), ok=True)
        await wait_for_async(lambda: len(outbox) == 0, "the first result delivered")
        del link.running[second.task_id]                      # nothing else runs: no window
        link.results.queue_result(_result(rig.identity, second, 0), ok=True)
        await wait_for_async(lambda: len(outbox) == 0, "the second result delivered")
        assert windows[0] == (1, BATCH_WINDOW_S) and windows[-1] == (0, 0.0)
        assert {t.state for t in await rig.server.board.tasks_of(first.job_id)} == {TaskState.DONE}
