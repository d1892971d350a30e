"""LAN clusters end to end: real `panal agent run` processes on separate network-namespace hosts find
each other over real mDNS, pull work from each other's embedded boards over pinned TLS, and obey
their trust stores. No hub anywhere: `panal submit` goes to the local agent's board."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import netns
import pytest
from conftest import ROOT
from helpers import AGENT_START_S, DEFAULT_DEADLINE_S, scaled, wait_for
from netns import NetnsLab

#: Each test starts agents as processes (an agent imports torch twice before it leases): on a
#: loaded machine that alone takes tens of seconds, beyond the default per-test timeout (a hang detector).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(300))]
netns_lab, lan_lab = netns.netns_lab, netns.lan_lab  # the lab fixtures, for this module
T = TypeVar("T")

LAN_TTL_S = 4.0
#: short TTLs so the tests stay fast: peers drop after 4 s of silence (re-announced every second),
#: boards long-poll for at most 1 s. Leases expire after 10 s: heartbeats (every TTL / 4) of an agent
#: on a loaded machine must not miss one, or a task is redone once more than a test expects.
FAST_ENV = {
    "PANAL_WORKER_PRELOAD": "0", "PANAL_LAN_INTERFACES": "eth0", "PANAL_LAN_TTL_S": str(LAN_TTL_S),
    "PANAL_LAN_REFRESH_S": "1", "PANAL_LAN_SYNC_S": "1", "PANAL_LAN_PEER_RETRY_FOR_S": "1",
    "PANAL_HUB_LEASE_TTL_S": "10", "PANAL_HUB_MAX_POLL_WAIT_S": "1", "PANAL_HUB_EXPIRY_INTERVAL_S": "0.2",
    "PANAL_HUB_DRAIN_TIMEOUT_S": "2", "PANAL_HUB_RETRY_BACKOFF_S": "0.2",
}


@dataclass
class Agent:
    host: int
    home: Path
    proc: subprocess.Popen[str]
    id: str


class Cluster:
    """Agents and CLI commands on the hosts of a lab; every agent is killed at teardown."""

    def __init__(self, lab: NetnsLab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.agents: list[Agent] = []
        (tmp / "logs").mkdir()

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        return {**os.environ, **FAST_ENV, "PANAL_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}

    def panal(self, host: int, home: Path, *args: str, check: bool = True,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.lab.argv(host, [sys.executable, "-m", "agent", *args]), env=self.env(home),
                              text=True, capture_output=True, timeout=scaled(timeout), cwd=ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"host {host}: panal {' '.join(args)} -> {proc.returncode}\n"
                                 f"{proc.stdout}\n{proc.stderr}\n{self.logs()}")
        return proc

    def json(self, host: int, home: Path, *args: str, timeout: float = 60) -> Any:
        return json.loads(self.panal(host, home, *args, "--json", timeout=timeout).stdout)

    def start(self, host: int, name: str, *extra: str, **env: str) -> Agent:
        home = self.tmp / name
        log = open(self.tmp / "logs" / f"{name}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(self.lab.argv(host, [sys.executable, "-m", "agent", "-v", "agent", "run",
                                                     "--slots", "1", "--name", name, *extra]),
                                env=self.env(home, **env), text=True, stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
        log.close()
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("panal agent "), (line, self.logs())
        agent = Agent(host, home, proc, line.split()[2])
        self.agents.append(agent)
        return agent

    def ready(self, agent: Agent) -> None:
        """Until the agent's LAN board is up (it writes the board's join URL)."""
        self.wait_for(lambda: (agent.home / "lan-board.url").exists(), f"agent {agent.id} LAN board",
                      timeout_s=AGENT_START_S)

    def wait_for(self, probe: Callable[[], T], what: str, *, timeout_s: float = DEFAULT_DEADLINE_S,
                 every_s: float = 0.3) -> T:
        """:func:`helpers.wait_for`, with the agents' logs in the failure message."""
        return wait_for(probe, what, timeout_s=timeout_s, every_s=every_s, diagnose=self.logs)

    def peers(self, agent: Agent) -> list[dict[str, Any]]:
        peers: list[dict[str, Any]] = self.json(agent.host, agent.home, "peers")
        return peers

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted((self.tmp / "logs").glob("*.log")))

    def stop(self) -> None:
        for agent in self.agents:
            if agent.proc.poll() is None:
                agent.proc.kill()
            agent.proc.wait()
            if agent.proc.stdout is not None:
                agent.proc.stdout.close()


@pytest.fixture
def cluster(lan_lab: NetnsLab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(lan_lab, tmp_path)
    yield c
    c.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(c.logs())


def trusted_trio(cluster: Cluster, **env: str) -> tuple[Agent, Agent, Agent]:
    """Three agents on hosts 1-3, each trusting the user of host 1 (the lab's submitter)."""
    user_key = cluster.panal(1, cluster.tmp / "h1", "keys", "show").stdout.strip()
    for name in ("h1", "h2", "h3"):
        cluster.panal(1, cluster.tmp / name, "trust", "add", user_key, "--name", "labuser")
    agents = (cluster.start(1, "h1", **env), cluster.start(2, "h2", **env), cluster.start(3, "h3", **env))
    for agent in agents:
        cluster.ready(agent)
    return agents


def sleep_manifest(tmp: Path, name: str, seconds: list[float]) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(f"apiVersion: panal/v1\nkind: Job\nmetadata: {{name: {name}}}\n"
                    f"spec: {{task: sleep, params: {{seconds: 1}}, sweep: {{seconds: {seconds}}}, "
                    f"resources: {{timeout: 60s}}, policy: {{retries: 3}}}}\n")
    return path


def sees_all(cluster: Cluster, agent: Agent, others: list[Agent]) -> bool:
    return {p["id"] for p in cluster.peers(agent)} == {o.id for o in others}


# ------------------------------------------------------------------ the tests


def test_three_agents_form_a_cluster_share_a_job_and_a_stopped_one_says_goodbye(cluster: Cluster) -> None:
    # Here peers never expire and never fail out of the lists: a peer that leaves them left by its goodbye.
    a1, a2, a3 = trusted_trio(cluster, PANAL_LAN_TTL_S="3600", PANAL_LAN_MAX_FAILURES="1000000")
    up = time.monotonic()   # the last of the three boards is announced
    trio = [a1, a2, a3]
    for agent in trio:
        cluster.wait_for(lambda agent=agent: sees_all(cluster, agent, [o for o in trio if o is not agent]),
                         f"{agent.id} to list the two others", every_s=0.1)
    print(f"cluster of 3 formed {time.monotonic() - up:.1f}s after the last agent came up")

    peers = cluster.peers(a1)
    assert [p["id"] for p in peers] == sorted([a2.id, a3.id])
    for p, other in zip(peers, sorted([a2, a3], key=lambda a: a.id), strict=True):
        assert p["addresses"] == [cluster.lab.addr(other.host)] and p["state"] == "alive"
        assert p["breaker"] == "closed" and len(p["fingerprint"]) == 64
        assert p["url"] == f"https://{cluster.lab.addr(other.host)}:{p['port']}"
        assert p["trusted"] in (None, True)   # None: that board has offered no task yet

    manifest = sleep_manifest(cluster.tmp, "lanjob", [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7])
    # no --hub, no PANAL_HUB, no client.yaml: the local agent's LAN board takes it
    wait_s = int(scaled(DEFAULT_DEADLINE_S))
    [job] = cluster.json(1, a1.home, "submit", str(manifest), "--wait", "--timeout", str(wait_s),
                         timeout=DEFAULT_DEADLINE_S + 30)
    assert job["state"] == "succeeded" and job["tasks"] == {"done": 8}
    results = cluster.json(1, a1.home, "results", job["id"], "--verify")
    assert len(results["results"]) == 8 and all(r["verified"] for r in results["results"])
    ran = {r["agent"] for r in results["results"]}
    assert ran <= {a.id for a in trio} and len(ran) >= 2, ran
    print(f"8 tasks ran on {len(ran)} agents")
    # peers that pulled from host 1's board saw only trusted work from it
    assert all(p["trusted"] is True for p in cluster.peers(a2) if p["id"] == a1.id and p["trusted"] is not None)

    # a clean stop says goodbye, and the others drop the peer on hearing it
    asked = time.monotonic()
    a3.proc.send_signal(signal.SIGTERM)
    assert a3.proc.wait(timeout=scaled(60)) == 0
    assert not (a3.home / "lan-board.url").exists()
    for agent in (a1, a2):
        cluster.wait_for(lambda agent=agent: a3.id not in {p["id"] for p in cluster.peers(agent)},
                         f"{agent.id} to hear {a3.id}'s goodbye", every_s=0.1)
    print(f"stopped peer gone {time.monotonic() - asked:.1f}s after SIGTERM")


def test_untrusted_submitters_work_is_run_only_by_agents_that_trust_it(cluster: Cluster) -> None:
    a1, a2, a3 = trusted_trio(cluster)
    rogue = cluster.start(4, "h4")   # its owner's key is in nobody else's trust store
    cluster.ready(rogue)
    for agent in (a1, a2, a3):
        cluster.wait_for(lambda agent=agent: rogue.id in {p["id"] for p in cluster.peers(agent)},
                         f"{agent.id} to discover the rogue host")
    # the rogue's own agent steps aside: only the trusted trio could run its job now
    cluster.panal(4, rogue.home, "agent", "pause", "--reason", "test")
    manifest = sleep_manifest(cluster.tmp, "roguejob", [0.2, 0.3, 0.4])
    [job] = cluster.json(4, rogue.home, "submit", str(manifest))

    # every agent of the trio leases from the rogue's board, sees an untrusted submitter, hands it back
    cluster.wait_for(lambda: all(p["trusted"] is False for a in (a1, a2, a3) for p in cluster.peers(a)
                                 if p["id"] == rogue.id), "the trio to refuse the rogue's tasks")
    view = cluster.json(4, rogue.home, "job", job["id"])
    assert view["state"] in ("queued", "running") and not view["tasks"].get("done"), view
    assert all(t["state"] in ("queued", "leased") and t["attempt"] == 1 for t in view["task_list"]), view
    # nor can the rogue submit to a trusted board directly
    board1 = (a1.home / "lan-board.url").read_text().strip()
    refused = cluster.panal(4, rogue.home, "submit", str(manifest), "--hub", board1, check=False)
    assert refused.returncode == 1 and "not an authorised submitter" in refused.stderr, refused.stderr

    # its own agent (which trusts its owner) runs it when resumed, and nobody else does
    cluster.panal(4, rogue.home, "agent", "resume")
    cluster.wait_for(lambda: cluster.json(4, rogue.home, "job", job["id"])["state"] == "succeeded",
                     "the rogue's own agent to finish its job", every_s=1.0)
    results = cluster.json(4, rogue.home, "results", job["id"], "--verify")
    assert {r["agent"] for r in results["results"]} == {rogue.id}


def test_sigkilled_agent_leaves_peer_lists_and_its_task_is_redone_by_another(cluster: Cluster) -> None:
    a1, a2, a3 = trusted_trio(cluster)
    for agent in (a1, a2):
        cluster.wait_for(lambda agent=agent: a3.id in {p["id"] for p in cluster.peers(agent)},
                         f"{agent.id} to discover {a3.id}")
    manifest = sleep_manifest(cluster.tmp, "victimjob", [4.0, 4.1, 4.2, 4.3, 4.4, 4.5])
    [job] = cluster.json(1, a1.home, "submit", str(manifest))

    def victim_task() -> dict[str, Any] | None:
        tasks = cluster.json(1, a1.home, "job", job["id"])["task_list"]
        return next((t for t in tasks if t["state"] == "leased" and t["agent"] == a3.id), None)

    task = cluster.wait_for(victim_task, f"{a3.id} to lease a task")
    killed = time.monotonic()
    a3.proc.send_signal(signal.SIGKILL)   # no goodbye, no release: only silence (the TTL) or failed calls tell
    a3.proc.wait()
    for agent in (a1, a2):
        cluster.wait_for(lambda agent=agent: a3.id not in {p["id"] for p in cluster.peers(agent)},
                         f"{agent.id} to drop the killed peer", every_s=0.2)
        print(f"killed peer gone from {agent.id}'s list after {time.monotonic() - killed:.1f}s (ttl {LAN_TTL_S}s)")

    cluster.wait_for(lambda: cluster.json(1, a1.home, "job", job["id"])["state"] == "succeeded",
                     "the job to finish without the killed agent", every_s=1.0)
    tasks = {t["idx"]: t for t in cluster.json(1, a1.home, "job", job["id"])["task_list"]}
    redone = tasks[task["idx"]]
    assert redone["attempt"] == 2 and redone["agent"] in (a1.id, a2.id), redone
    results = cluster.json(1, a1.home, "results", job["id"], "--verify")
    assert len(results["results"]) == 6 and all(r["verified"] for r in results["results"])
    assert next(r for r in results["results"] if r["task_id"] == redone["id"])["agent"] == redone["agent"]


# ------------------------------------------------------------------ settings (no lab needed)


def test_lan_settings_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    from agent.lan.settings import LanSettings
    from security.errors import BadRequest

    config = tmp_path / "agent.yaml"
    config.write_text("lan:\n  open: true\n  port: 7000\n  interfaces: [eth0, 10.0.0.0/8]\n  ttl_s: 8\n")
    from_file = LanSettings.load(config, env={})
    assert (from_file.open, from_file.port, from_file.interfaces, from_file.ttl_s) == (
        True, 7000, ("eth0", "10.0.0.0/8"), 8.0)
    from_env = LanSettings.load(config, env={"PANAL_LAN_PORT": "7001", "PANAL_LAN_INTERFACES": "wlan0"})
    assert (from_env.port, from_env.interfaces, from_env.open) == (7001, ("wlan0",), True)
    flagged = LanSettings.load(config, env={"PANAL_LAN_PORT": "7001"}, port=7002, open=None, interfaces=())
    assert (flagged.port, flagged.open, flagged.interfaces) == (7002, True, ("eth0", "10.0.0.0/8"))
    assert LanSettings.load(None, env={}, enabled=False).enabled is False
    for bad_env in ({"PANAL_LAN_OPEN": "maybe"}, {"PANAL_LAN_TTL_S": "2", "PANAL_LAN_REFRESH_S": "3"},
                    {"PANAL_LAN_PORT": "many"}):
        with pytest.raises(BadRequest):
            LanSettings.load(None, env=bad_env)
    config.write_text("lan: {colour: blue}\n")
    with pytest.raises(BadRequest, match="colour"):
        LanSettings.load(config, env={})
