"""Two `panal hub serve` processes on one PostgreSQL database, real agents: failover without loss or split brain.

`kill -9` of the active hub mid-job: the standby takes over (loading the board from the database), the
agents move to it through their breakers, and every task is done exactly once with every result
verified. A partition of the active hub from the database (the server stopped): it stops
acknowledging, and nothing it acknowledged is missing on the hub that takes over. Outcomes only,
never timings.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from conftest import Procs, panal
from helpers import AGENT_START_S, scaled, wait_for
from pgserver import PgServer
from test_chaos import HUB_DOWN, HUB_ENV, free_port, outbox_files, start_agent

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from jobs.manifest import Manifest
from security.identity import Identity
from security.tls import BoardAddress

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(300))]


class HaHub:
    """One of two hubs of a board: its own directory, certificate and fixed port; the shared store and blobs."""

    def __init__(self, procs: Procs, tmp: Path, user: Path, name: str, store: str) -> None:
        self.procs, self.user, self.name, self.dir = procs, user, name, tmp / name
        self.port = free_port()
        self.env = {**HUB_ENV, "PANAL_HUB_STORE": store, "PANAL_HUB_BLOBS_DIR": str(tmp / "blobs"),
                    "PANAL_HUB_HUB_ID": name, "PANAL_HUB_ELECTION_CHECK_INTERVAL_S": "0.2",
                    "PANAL_HUB_LEASE_TTL_S": "5", "PANAL_HUB_STANDBY_RETRY_AFTER_S": "1"}
        panal("hub", "init", "--dir", str(self.dir), "--port", str(self.port), home=user, **self.env)
        self.own_url = panal("hub", "url", "--dir", str(self.dir), home=user, **self.env).stdout.strip()
        self.address = BoardAddress.parse(self.own_url)
        self.proc: subprocess.Popen[str] | None = None

    def start(self, peer_url: str) -> str:
        """Serve; the join URL it prints carries the peer (``also=``)."""
        self.proc = self.procs.start("hub", "serve", "--dir", str(self.dir), "--port", str(self.port), "--bind",
                                     "127.0.0.1", home=self.user, PANAL_HUB_PEER_URLS=peer_url, **self.env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "serving at" in line, (line, self.procs.logs_text())
        return line.split("serving at", 1)[1].split(" (")[0].strip()

    def active(self) -> bool:
        """What this hub says of itself on ``GET /v1/active`` (False if it does not answer)."""
        async def go() -> bool:
            assert self.address.fingerprint
            connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(self.address.fingerprint)))
            try:
                async with aiohttp.ClientSession(connector=connector) as session, \
                        session.get(f"{self.address.url}/v1/active", headers={"Accept": "application/json"},
                                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    return bool(json.loads(await resp.read())["active"])
            except (aiohttp.ClientError, TimeoutError):
                return False
        return asyncio.run(go())


class Board:
    """The board both hubs serve, as a submitter sees it through the join URL that names both hubs."""

    def __init__(self, user: Path, url: str, store: str) -> None:
        self.user, self.url, self.store = user, url, store

    def call(self, method: str, path: str, at: HaHub | None = None) -> Any:
        """A signed call through the join URL (whichever hub answers), or to one hub ``at``."""
        async def go() -> Any:
            address = at.address if at is not None else BoardAddress.parse(self.url)
            async with BoardClient(address, Identity.load(self.user / "user.key"), retry_for_s=2.0) as client:
                return await client.call(method, path, timeout_s=10.0)
        return asyncio.run(go())

    def submit(self, n: int, seconds: float) -> str:
        m = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "ha"},
                                "spec": {"task": "sleep", "sweep": {"seconds": [seconds] * n},
                                         "policy": {"retries": 5}}})

        async def go() -> str:
            me = Identity.load(self.user / "user.key")
            async with BoardClient(BoardAddress.parse(self.url), me) as client:
                return str((await submit(client, make_envelope(me, m)))["id"])
        return asyncio.run(go())

    def states(self, job_id: str) -> Counter[str]:
        return Counter(t["state"] for t in self.call("GET", f"/v1/jobs/{job_id}/tasks")["tasks"])

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        async def go() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(self.store)
            try:
                return [tuple(r) for r in await conn.fetch(sql, *args)]
            finally:
                await conn.close()
        return asyncio.run(go())

    def assert_done_exactly_once(self, job_id: str, n: int) -> None:
        per_task = Counter(t for (t,) in self.rows("SELECT task_id FROM results WHERE job_id = $1", job_id))
        assert len(per_task) == n and set(per_task.values()) == {1}, per_task
        assert [s for (s,) in self.rows("SELECT state FROM tasks WHERE job_id = $1", job_id)] == ["done"] * n
        out = json.loads(panal("results", job_id, "--hub", self.url, "--verify", "--json", home=self.user).stdout)
        assert len(out["results"]) == n and all(r["verified"] for r in out["results"]), out


def _two_hubs(tmp: Path, procs: Procs, store: str) -> tuple[HaHub, HaHub, Board]:
    user = tmp / "user"
    first, second = HaHub(procs, tmp, user, "hub-a", store), HaHub(procs, tmp, user, "hub-b", store)
    url = first.start(second.own_url)
    wait_for(first.active, "hub-a to become the active hub", diagnose=procs.logs_text)
    second.start(first.own_url)
    assert "also=" in url
    return first, second, Board(user, url, store)


def _job_under_way(tmp_path: Path, procs: Procs, board: Board, n: int) -> tuple[list[subprocess.Popen[str]], str]:
    """Two agents of two slots each, and a job of ``n`` one-second tasks some done and some leased."""
    agents = [start_agent(procs, tmp_path, board.url, name, "--slots", "2") for name in ("a1", "a2")]
    job_id = board.submit(n, seconds=1.0)

    def mid_job() -> bool:
        states = board.states(job_id)
        return states["done"] >= 2 and states["leased"] >= 1
    wait_for(mid_job, "the job to be under way", timeout_s=AGENT_START_S, diagnose=procs.logs_text, ignore=HUB_DOWN)
    return agents, job_id


def test_kill_9_of_the_active_hub_mid_job_the_standby_takes_over_and_every_task_is_done_once(
        tmp_path: Path, procs: Procs, pg: str) -> None:
    first, second, board = _two_hubs(tmp_path, procs, pg)
    n = 16
    agents, job_id = _job_under_way(tmp_path, procs, board, n)
    assert not second.active()
    assert first.proc is not None
    first.proc.kill()                  # kill -9, with leases out and results in flight
    first.proc.wait()
    wait_for(second.active, "hub-b to take over", diagnose=procs.logs_text)
    wait_for(lambda: board.call("GET", f"/v1/jobs/{job_id}")["job"]["state"] == "succeeded",
             "the job to finish on hub-b", diagnose=procs.logs_text, ignore=HUB_DOWN)
    assert all(a.poll() is None for a in agents), "the agents moved to hub-b on their own"
    board.assert_done_exactly_once(job_id, n)
    accepted_by = {a for (a,) in board.rows("SELECT DISTINCT agent_id FROM results WHERE job_id = $1", job_id)}
    assert len(accepted_by) == 2
    wait_for(lambda: not outbox_files(tmp_path, "a1") + outbox_files(tmp_path, "a2"), "the outboxes to drain",
             diagnose=procs.logs_text)


def test_an_active_hub_cut_off_from_the_database_stops_acknowledging_before_the_standby_takes_over(
        tmp_path: Path, procs: Procs, own_pg: PgServer) -> None:
    first, second, board = _two_hubs(tmp_path, procs, own_pg.url())
    n = 12
    agents, job_id = _job_under_way(tmp_path, procs, board, n)
    own_pg.stop("immediate")           # the partition: neither hub reaches the database
    assert first.proc is not None
    # hub-a notices on its own and stops (exit 75: its supervisor would restart it as a standby) ...
    wait_for(lambda: first.proc is not None and first.proc.poll() is not None, "hub-a to step down",
             diagnose=procs.logs_text)
    assert first.proc.returncode == 75
    # ... while no hub can be active: hub-b cannot take the lock of a database it cannot reach
    assert not second.active()
    own_pg.restart()
    wait_for(second.active, "hub-b to take over once the database is back", diagnose=procs.logs_text)
    wait_for(lambda: board.call("GET", f"/v1/jobs/{job_id}")["job"]["state"] == "succeeded",
             "the job to finish on hub-b", diagnose=procs.logs_text, ignore=HUB_DOWN)
    assert all(a.poll() is None for a in agents)
    board.assert_done_exactly_once(job_id, n)
    [(token, hub)] = board.rows("SELECT token, hub FROM panal_active")
    assert (token, hub) == (2, "hub-b")


def test_a_frozen_active_hub_is_replaced_and_once_thawed_acknowledges_nothing(
        tmp_path: Path, procs: Procs, pg: str) -> None:
    """A hub stopped dead (SIGSTOP: a VM pause, a long GC) still has its database socket open: the server
    ends its idle lock session, the standby takes over, and the thawed hub steps down without
    acknowledging anything it can no longer commit (the fencing token moved on)."""
    first, second, board = _two_hubs(tmp_path, procs, pg)
    n = 12
    agents, job_id = _job_under_way(tmp_path, procs, board, n)
    assert first.proc is not None
    first.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(second.active, "hub-b to take over from the frozen hub-a", diagnose=procs.logs_text)
        # (agents whose requests hang on the frozen hub move on only when those requests time out)
        wait_for(lambda: board.call("GET", f"/v1/jobs/{job_id}", at=second)["job"]["state"] == "succeeded",
                 "the job to finish on hub-b", timeout_s=scaled(200), diagnose=procs.logs_text, ignore=HUB_DOWN)
    finally:
        first.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: first.proc is not None and first.proc.poll() is not None, "the thawed hub-a to step down",
             diagnose=procs.logs_text)
    assert first.proc.returncode == 75
    assert all(a.poll() is None for a in agents)
    board.assert_done_exactly_once(job_id, n)
