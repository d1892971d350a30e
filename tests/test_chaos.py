"""Chaos, with real processes: `kill -9` of the hub, frozen agents, outboxes across restarts, duplicate storms.

Every scenario ends by reading the hub's own SQLite file: one accepted result per task, nothing lost,
nothing twice, every signature verified by `panal results --verify`. Timings are never asserted:
waits are bounded and only outcomes are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import Procs, panal
from helpers import AGENT_START_S, scaled, wait_for

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from jobs.manifest import Manifest
from security.errors import PanalError
from security.identity import Identity
from security.records import SignedRecord
from security.tls import BoardAddress

#: Each test starts a hub and agents as processes (an agent imports torch twice before it leases): on a
#: loaded machine that alone takes tens of seconds, beyond the default per-test timeout (a hang detector).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(300))]

#: a hub for chaos: fast expiry sweeps, short long-polls and drains (teardown stays quick)
HUB_ENV = {"PANAL_HUB_EXPIRY_INTERVAL_S": "0.2", "PANAL_HUB_MAX_POLL_WAIT_S": "5", "PANAL_HUB_DRAIN_TIMEOUT_S": "1"}
#: a probe that calls the hub while it is down (killed, restarting) raises this: not yet, try again
HUB_DOWN = (PanalError,)


def free_port() -> int:
    """A port that was free a moment ago: bind port 0, read it, close. The hub must come back on the same
    port after `kill -9`, so port 0 at serve time will not do. Tiny race: another process may take the port
    between this close and the hub's bind; then the hub fails to start and the test fails loudly (never
    silently), which on a loopback test machine is vanishingly rare."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Hub:
    """`panal hub serve` on a fixed port, so it can be killed and restarted where agents expect it."""

    def __init__(self, procs: Procs, tmp: Path, user: Path, **env: str) -> None:
        self.procs, self.dir, self.user, self.env = procs, tmp / "hub", user, {**HUB_ENV, **env}
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None
        panal("hub", "init", "--dir", str(self.dir), "--port", str(self.port), home=user)
        self.url = panal("hub", "url", "--dir", str(self.dir), home=user).stdout.strip()
        self.db = self.dir / "board.db"

    def start(self) -> None:
        self.proc = self.procs.start("hub", "serve", "--dir", str(self.dir), "--port", str(self.port),
                                     "--bind", "127.0.0.1", home=self.user, **self.env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert f":{self.port}" in line, (line, self.procs.logs_text())

    def kill(self) -> None:
        """`kill -9`: no drain, no flush, no goodbye."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def call(self, method: str, path: str, body: Any = None, identity: Identity | None = None) -> Any:
        async def go() -> Any:
            me = identity or Identity.load(self.user / "user.key")
            async with BoardClient(BoardAddress.parse(self.url), me, retry_for_s=2.0) as client:
                return await client.call(method, path, body, timeout_s=10.0)
        return asyncio.run(go())

    def submit(self, n: int, seconds: float, retries: int = 5) -> str:
        m = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "chaos"},
                                "spec": {"task": "sleep", "sweep": {"seconds": [seconds] * n},
                                         "policy": {"retries": retries}}})

        async def go() -> str:
            me = Identity.load(self.user / "user.key")
            async with BoardClient(BoardAddress.parse(self.url), me) as client:
                return str((await submit(client, make_envelope(me, m)))["id"])
        return asyncio.run(go())

    def job(self, job_id: str) -> dict[str, Any]:
        view: dict[str, Any] = self.call("GET", f"/v1/jobs/{job_id}")["job"]
        view["task_list"] = self.call("GET", f"/v1/jobs/{job_id}/tasks")["tasks"]
        return view

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Read the hub's own database (WAL: readable while it runs, and after a kill -9)."""
        with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as conn:
            return conn.execute(sql, args).fetchall()

    def assert_done_exactly_once(self, job_id: str, n: int) -> list[dict[str, Any]]:
        """One accepted result per task, every task done, and every result's signature verifies."""
        results = self.rows("SELECT task_id, agent_id, attempt FROM results WHERE job_id = ?", job_id)
        per_task = Counter(task_id for task_id, _, _ in results)
        assert len(per_task) == n and set(per_task.values()) == {1}, per_task
        states = self.rows("SELECT state FROM tasks WHERE job_id = ?", job_id)
        assert [s for (s,) in states] == ["done"] * n
        assert self.rows("SELECT state FROM jobs WHERE id = ?", job_id) == [("succeeded",)]
        out = json.loads(panal("results", job_id, "--hub", self.url, "--verify", "--json", home=self.user).stdout)
        assert len(out["results"]) == n and all(r["verified"] for r in out["results"]), out
        rows: list[dict[str, Any]] = out["results"]
        return rows


def start_agent(procs: Procs, tmp: Path, url: str, name: str, *extra: str) -> subprocess.Popen[str]:
    home = tmp / name
    if not (home / "boards.yaml").exists():
        panal("agent", "join", url, "--name", name, home=home)
    # --no-lan: these scenarios are about the WAN hub; LAN peers (other tests' agents on this machine) stay out.
    # They run only `sleep` tasks: the warm worker need not import torch (a slow start on a loaded machine).
    return procs.start("agent", "run", "--name", name, "--drain", "1", "--no-lan", *extra, home=home,
                       PANAL_WORKER_PRELOAD="0")


def agent_id(tmp: Path, name: str) -> str:
    return str(Identity.load(tmp / name / "agent.key").id)


def outbox_files(tmp: Path, name: str) -> list[Path]:
    return sorted((tmp / name / "outbox").glob("*/*.result"))


def test_hub_kill_9_mid_job_agents_reconnect_and_every_task_is_done_once(tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    hub = Hub(procs, tmp_path, user, PANAL_HUB_LEASE_TTL_S="5")
    hub.start()
    agents = [start_agent(procs, tmp_path, hub.url, name, "--slots", "2") for name in ("a1", "a2")]
    n = 16
    job_id = hub.submit(n, seconds=1.0)

    def mid_job() -> bool:
        states = Counter(t["state"] for t in hub.job(job_id)["task_list"])
        return states["done"] >= 2 and states["leased"] >= 1
    wait_for(mid_job, "the job to be under way", timeout_s=AGENT_START_S, diagnose=procs.logs_text, ignore=HUB_DOWN)
    hub.kill()                      # with leases out and results in flight
    # The agents keep working: a task they held finishes while the hub is down and waits in an outbox.
    wait_for(lambda: outbox_files(tmp_path, "a1") + outbox_files(tmp_path, "a2"), "a result made while the hub is down",
             diagnose=procs.logs_text)
    hub.start()                     # same directory, same port: the agents find it by themselves
    wait_for(lambda: hub.job(job_id)["state"] == "succeeded", "the job to finish after the hub restart",
             diagnose=procs.logs_text, ignore=HUB_DOWN)
    assert all(a.poll() is None for a in agents), "no agent was restarted: they reconnected on their own"
    hub.assert_done_exactly_once(job_id, n)
    wait_for(lambda: not outbox_files(tmp_path, "a1") + outbox_files(tmp_path, "a2"), "the outboxes to drain",
             diagnose=procs.logs_text)


def test_frozen_agent_loses_its_lease_and_its_late_result_is_rejected(tmp_path: Path, procs: Procs) -> None:
    import psutil

    user = tmp_path / "user"
    hub = Hub(procs, tmp_path, user, PANAL_HUB_LEASE_TTL_S="3")
    hub.start()
    frozen = start_agent(procs, tmp_path, hub.url, "frozen")
    job_id = hub.submit(1, seconds=2.0)
    wait_for(lambda: hub.job(job_id)["task_list"][0]["state"] == "leased", "the frozen agent to lease the task",
             timeout_s=AGENT_START_S, diagnose=procs.logs_text, ignore=HUB_DOWN)
    # The task runs in a worker process (started once the lease reply reaches the agent).
    wait_for(lambda: psutil.Process(frozen.pid).children(), "the task's worker to start", diagnose=procs.logs_text)
    # Freeze the daemon only: its worker finishes the task, but nobody heartbeats or reports it.
    frozen.send_signal(signal.SIGSTOP)
    try:
        start_agent(procs, tmp_path, hub.url, "rescuer")
        wait_for(lambda: hub.job(job_id)["state"] == "succeeded", "the rescuer to finish the task",
                 timeout_s=AGENT_START_S, diagnose=procs.logs_text, ignore=HUB_DOWN)
    finally:
        frozen.send_signal(signal.SIGCONT)
    [task] = hub.job(job_id)["task_list"]
    assert task["attempt"] == 2  # the frozen agent's attempt expired
    [row] = hub.assert_done_exactly_once(job_id, 1)
    assert row["agent"] == agent_id(tmp_path, "rescuer")
    # Thawed, the frozen agent either reports its (now late) result, which is rejected and not kept for
    # re-sending, or first hears from its heartbeat that the lease is gone and drops the result: which
    # one depends on which timer fires first after SIGCONT. Either way it is never counted twice.
    log = next((tmp_path / "logs").glob("*-agent-frozen.log"))
    wait_for(lambda: "rejected the result of task" in log.read_text() or "no longer leased to us" in log.read_text(),
             "the late result to be rejected or dropped", diagnose=procs.logs_text)
    if "rejected the result of task" in log.read_text():
        assert hub.call("GET", "/v1/status")["stats"].get("results_rejected", 0) >= 1
    wait_for(lambda: not outbox_files(tmp_path, "frozen"), "the rejected result to leave the outbox",
             diagnose=procs.logs_text)
    hub.assert_done_exactly_once(job_id, 1)  # still exactly one
    assert frozen.poll() is None


def test_results_made_while_the_hub_is_down_survive_an_agent_restart_in_the_outbox(
        tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    hub = Hub(procs, tmp_path, user, PANAL_HUB_LEASE_TTL_S="30")
    hub.start()
    agent = start_agent(procs, tmp_path, hub.url, "keeper")
    job_id = hub.submit(1, seconds=12.0)
    # "leased" on the hub is not enough: the lease reply may still be on its way when the hub dies.
    # Progress arrives by heartbeat (every TTL/4 = 7.5 s), so the agent is surely running the task.
    wait_for(lambda: hub.job(job_id)["task_list"][0]["progress"] > 0, "the agent to report progress on the task",
             timeout_s=AGENT_START_S, diagnose=procs.logs_text, ignore=HUB_DOWN)
    hub.kill()
    [kept] = wait_for(lambda: outbox_files(tmp_path, "keeper"), "the finished result in the outbox",
                      diagnose=procs.logs_text)
    agent.send_signal(signal.SIGKILL)   # the agent dies too, with the result undelivered
    agent.wait()
    assert outbox_files(tmp_path, "keeper") == [kept]
    # The restarted hub gives each lease one fresh TTL; a long one, so that a slow agent restart on a
    # loaded machine cannot let the lease expire before the outbox delivers (this test is about the outbox).
    hub.env["PANAL_HUB_LEASE_TTL_S"] = "600"
    hub.start()
    start_agent(procs, tmp_path, hub.url, "keeper")
    wait_for(lambda: hub.job(job_id)["state"] == "succeeded", "the restarted agent's outbox to deliver",
             timeout_s=AGENT_START_S, diagnose=procs.logs_text, ignore=HUB_DOWN)
    [row] = hub.assert_done_exactly_once(job_id, 1)
    assert row["agent"] == agent_id(tmp_path, "keeper")
    assert hub.rows("SELECT attempt FROM results WHERE job_id = ?", job_id) == [(1,)]  # delivered, not re-run
    wait_for(lambda: not outbox_files(tmp_path, "keeper"), "the outbox entry to be deleted after the ack",
             diagnose=procs.logs_text)


def test_duplicate_delivery_storm_counts_once_even_across_a_hub_restart(tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    hub = Hub(procs, tmp_path, user)
    hub.start()
    me = Identity.generate()
    hub.call("POST", "/v1/agents", {"public_key": me.public.text(), "name": "stormy",
                                    "capabilities": {"kinds": ["sleep"]}}, identity=me)
    n = 3
    job_id = hub.submit(n, seconds=0.0)
    tasks = hub.call("POST", "/v1/lease", {"slots": n, "wait_s": 5}, identity=me)["tasks"]
    assert len(tasks) == n
    records = [SignedRecord.sign(me, {"task_id": t["task_id"], "job_id": t["job_id"], "lease_id": t["lease_id"],
                                      "attempt": t["attempt"], "agent_id": me.id, "status": "ok",
                                      "values": {"slept": 0.0}, "metrics": {}}).to_wire() for t in tasks]

    async def storm(copies: int) -> list[tuple[str, str]]:
        """Every record, ``copies`` times each, through all three delivery routes at once."""
        async with BoardClient(BoardAddress.parse(hub.url), me, connections=64) as client:
            async def one(i: int, record: dict[str, Any], task_id: str) -> list[dict[str, Any]]:
                if i % 3 == 0:
                    return list((await client.call("POST", "/v1/results", {"results": [record]}))["results"])
                if i % 3 == 1:
                    return [await client.call("POST", f"/v1/tasks/{task_id}/result", {"result": record})]
                reply = await client.call("POST", "/v1/lease", {"slots": 0, "results": [record]})
                return list(reply["results"])
            calls = [one(i, r, t["task_id"]) for i in range(copies) for r, t in zip(records, tasks, strict=True)]
            replies = await asyncio.gather(*calls)
        return [(o["task_id"], o["status"]) for reply in replies for o in reply]

    outcomes = asyncio.run(storm(30))
    assert len(outcomes) == 30 * n
    for task in tasks:
        mine = Counter(status for task_id, status in outcomes if task_id == task["task_id"])
        assert mine == {"accepted": 1, "duplicate": 29}, mine
    hub.assert_done_exactly_once(job_id, n)
    # After kill -9 and restart the job is finished and gone from memory: the store answers for it.
    hub.kill()
    hub.start()
    assert Counter(status for _, status in asyncio.run(storm(10))) == {"duplicate": 10 * n}
    # A different result for a settled task is refused, never a second acceptance.
    forged = SignedRecord.sign(me, {"task_id": tasks[0]["task_id"], "job_id": job_id,
                                    "lease_id": tasks[0]["lease_id"], "attempt": 1, "agent_id": me.id,
                                    "status": "ok", "values": {"slept": 99.0}, "metrics": {}}).to_wire()
    [outcome] = hub.call("POST", "/v1/results", {"results": [forged]}, identity=me)["results"]
    assert outcome["status"] == "rejected"
    hub.assert_done_exactly_once(job_id, n)
