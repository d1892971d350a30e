"""A job's signed manifest crosses the wire once per agent, as real processes: a real board over TLS in this
process (so a test can make it lie), `panal agent run` as a process.

An honest board leaves a job's envelope out of every lease reply after the first that carried it to the
agent (the agent says what it holds: ``LeaseRequest.have``); a restarted agent holds nothing and gets it again;
a big envelope is fetched, once. A board that leaves out an envelope the agent never had from it and does not
send it when asked, or names another board's job id to borrow that board's manifest, gets its task handed back,
never run.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import InProcessHub, Procs, panal
from helpers import AGENT_START_S, scaled, wait_for_async
from test_e2e import SLEEP_ONLY

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from hub.board import Board
from hub.records import TaskState
from hub.server import BoardServer
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from security.errors import NotFound
from security.identity import Identity

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(300))]


def sleeps(name: str, seconds: Sequence[float]) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": name},
                               "spec": {"task": "sleep", "sweep": {"seconds": list(seconds)}}})


async def start_board(tmp: Path, **settings: Any) -> tuple[InProcessHub, BoardServer, Identity]:
    hub = InProcessHub(tmp, **settings)
    server = await hub.start()
    user = Identity.generate()
    await server.add_submitter(user.public, "user")
    return hub, server, user


async def submit_to(hub: InProcessHub, user: Identity, manifest: Manifest) -> str:
    assert hub.address is not None
    async with BoardClient(hub.address, user, retry_for_s=5) as client:
        job = await submit(client, make_envelope(user, manifest))
    return str(job["id"])


async def join(hub: InProcessHub, home: Path) -> None:
    assert hub.address is not None
    await asyncio.to_thread(panal, "agent", "join", hub.address.join_url(), "--name", "agent", home=home)


def run_agent(procs: Procs, home: Path, *extra: str) -> Any:
    return procs.start("agent", "run", "--name", "agent", "--threads", "1", *extra, home=home, **SLEEP_ONLY)


async def polling(board: Board, home: Path, procs: Procs) -> None:
    """The running daemon registered (its registration carries ``code_from``; `join`'s does not)."""
    agent = Identity.load(home / "agent.key").public.id
    await wait_for_async(lambda: agent in board.agents and "code_from" in board.agents[agent].caps.raw,
                         "the running agent to register", timeout_s=AGENT_START_S, diagnose=procs.logs_text)


async def agent_running(hub: InProcessHub, board: Board, tmp_path: Path, procs: Procs, slots: int) -> Any:
    """A real ``panal agent run`` joined to ``hub`` with ``slots`` slots, registered and polling."""
    home = tmp_path / "agent"
    await join(hub, home)
    agent = run_agent(procs, home, "--slots", str(slots))
    await polling(board, home, procs)
    return agent


async def finished(board: Board, job_id: str, procs: Procs) -> str:
    await wait_for_async(lambda: board.view.job(job_id) is None, f"job {job_id} to finish", timeout_s=scaled(120),
                         diagnose=procs.logs_text)
    job = await board.view.find_job(job_id)
    assert job is not None
    return job.state.value


def state(board: Board, task_id: str) -> TaskState | None:
    task = board.view.task(task_id)
    return task.state if task is not None else None


def replied(board: Board, after: int) -> bool:
    """More than ``after`` leases counted, and every one has its reply built (a task is leased, then the lease
    committed and counted, then its assignment made)."""
    stats = board.view.stats
    return bool(stats["leases"] > after and stats["leases"] == stats["envelopes_sent"] + stats["envelopes_omitted"])


def lie(board: Board, monkeypatch: pytest.MonkeyPatch, change: Any) -> None:
    """Make the board lie in its lease replies: each assignment goes through ``change`` on its way out."""
    honest = board.lease

    async def lease(agent_id: str, slots: int, wait_s: float, have: Any = None) -> list[Assignment]:
        return [change(a) for a in await honest(agent_id, slots, wait_s, have)]
    monkeypatch.setattr(board, "lease", lease)


async def test_a_jobs_envelope_goes_to_an_agent_once_across_many_leases_and_again_after_a_restart(
        tmp_path: Path, procs: Procs) -> None:
    hub, server, user = await start_board(tmp_path)
    board = server.board
    try:
        agent = await agent_running(hub, board, tmp_path, procs, 1)   # one task per lease: 20 leases of one job
        job = await submit_to(hub, user, sleeps("many", [0.0] * 20))
        assert await finished(board, job, procs) == "succeeded"
        stats = board.view.stats
        assert stats["leases"] >= 20
        assert (stats["envelopes_sent"], stats["envelopes_omitted"]) == (1, stats["leases"] - 1)

        # A restarted agent holds nothing: it gets the envelope of a job it had leased from again.
        before = stats["leases"]
        second = await submit_to(hub, user, sleeps("restart", [600.0] + [0.0] * 6))
        await wait_for_async(lambda: state(board, f"{second}.0") == TaskState.LEASED and replied(board, before),
                             "the agent to lease the long task", timeout_s=scaled(60), diagnose=procs.logs_text)
        assert stats["envelopes_sent"] == 2
        agent.kill()
        await asyncio.to_thread(agent.wait)
        # one slot is still the killed process's long task's, on the board
        run_agent(procs, tmp_path / "agent", "--slots", "2")
        before = stats["leases"]
        await wait_for_async(lambda: all(state(board, f"{second}.{i}") == TaskState.DONE for i in range(1, 7))
                             and replied(board, before),
                             "the restarted agent to run the short tasks", timeout_s=AGENT_START_S,
                             diagnose=procs.logs_text)
        assert stats["envelopes_sent"] == 3
        assert stats["envelopes_omitted"] == stats["leases"] - 3
    finally:
        await hub.stop()


async def test_a_big_envelope_is_fetched_by_the_agent_once_and_its_tasks_run(tmp_path: Path, procs: Procs) -> None:
    hub, server, user = await start_board(tmp_path, inline_envelope_bytes=1024)
    board = server.board
    try:
        await agent_running(hub, board, tmp_path, procs, 2)
        job = await submit_to(hub, user, sleeps("big", [0.0] * 200))   # ~1.8 KB of envelope: fetched
        assert await finished(board, job, procs) == "succeeded"
        stats = board.view.stats
        assert (stats["envelopes_sent"], stats["envelopes_to_fetch"], stats["envelopes_fetched"]) == (0, 1, 1)
        assert stats["envelopes_omitted"] == stats["leases"] - 1
    finally:
        await hub.stop()


async def test_a_board_that_leaves_out_an_envelope_and_will_not_send_it_gets_the_task_handed_back_unrun(
        tmp_path: Path, procs: Procs, monkeypatch: pytest.MonkeyPatch) -> None:
    hub, server, user = await start_board(tmp_path)
    board = server.board
    try:
        lie(board, monkeypatch, lambda a: dataclasses.replace(a, envelope=None))

        def refuse(agent_id: str, job_id: str) -> Any:
            raise NotFound(f"no active job {job_id}", code="no_such_job")
        monkeypatch.setattr(board, "leased_envelope", refuse)
        await agent_running(hub, board, tmp_path, procs, 1)
        job = await submit_to(hub, user, sleeps("bare", [0.0]))
        said = f"handing back task {job}.0 from {hub.address.url if hub.address else ''}: it came without"
        await wait_for_async(lambda: said in procs.logs_text(), "the agent to hand the task back",
                             timeout_s=scaled(60), diagnose=procs.logs_text)
        await wait_for_async(lambda: state(board, f"{job}.0") == TaskState.QUEUED,
                             "the board to take the task back", timeout_s=scaled(30), diagnose=procs.logs_text)
        task = board.view.task(f"{job}.0")
        assert task is not None and task.attempt == 1 and task.error_class is None   # released: no attempt used
        assert board.view.stats["results_accepted"] == 0 and "failed (" not in procs.logs_text()
    finally:
        await hub.stop()


async def test_a_board_naming_another_boards_job_id_cannot_run_its_task_under_that_boards_manifest(
        tmp_path: Path, procs: Procs, monkeypatch: pytest.MonkeyPatch) -> None:
    honest, honest_server, alice = await start_board(tmp_path / "honest")
    liar, liar_server, mallory = await start_board(tmp_path / "liar")
    try:
        # The liar leases its own task as one of alice's job on the honest board, without an envelope, hoping
        # the agent takes alice's manifest (and the honest board's consent) for it: kind and params are alice's
        # first task's. In place before the agent polls: a long-poll already parked would answer honestly.
        manifest = sleeps("alices", [0.0, 0.0])
        aim: dict[str, str] = {}
        lie(liar_server.board, monkeypatch, lambda a: dataclasses.replace(
            a, job_id=aim["job"], idx=0, kind="sleep", params=manifest.points()[0], envelope=None))
        home = tmp_path / "agent"
        await join(honest, home)
        await join(liar, home)
        run_agent(procs, home, "--slots", "1")
        await polling(honest_server.board, home, procs)
        await polling(liar_server.board, home, procs)
        # The agent runs alice's job from the honest board: it holds that board's envelope of it now.
        theirs = aim["job"] = await submit_to(honest, alice, manifest)
        assert await finished(honest_server.board, theirs, procs) == "succeeded"
        mine = await submit_to(liar, mallory, sleeps("mallorys", [0.0]))
        assert liar.address is not None
        said = f"handing back task {mine}.0 from {liar.address.url}: it came without its job's signed manifest " \
               f"(job {theirs})"
        await wait_for_async(lambda: said in procs.logs_text(), "the agent to hand the liar's task back",
                             timeout_s=scaled(60), diagnose=procs.logs_text)
        board = liar_server.board
        await wait_for_async(lambda: state(board, f"{mine}.0") == TaskState.QUEUED,
                             "the liar's task to be handed back", timeout_s=scaled(30), diagnose=procs.logs_text)
        assert board.view.stats["results_accepted"] == 0 and "failed (" not in procs.logs_text()
    finally:
        await liar.stop()
        await honest.stop()
