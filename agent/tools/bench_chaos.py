"""``panal bench chaos``: a randomized soak of a real hub and real agents while things break.

A stream of ``sleep`` jobs runs on ``agents`` real agent processes joined to a real hub (TLS, signed
calls, its SQLite file or, with ``store``, a PostgreSQL database). Meanwhile, every few seconds,
something goes wrong at random: an agent is killed (``SIGKILL`` of its whole process group: the
machine died) and restarted on the same home, an agent is frozen (``SIGSTOP`` past the lease TTL: a
laptop lid closed) and thawed, or the hub is killed with ``kill -9`` and restarted on the same
directory and port. At the end the chaos stops, the queue drains, and the hub's store itself is
audited (agent/tools/chaos_audit.py): every task of every submitted job done exactly once, one result
row per task, every result's signature verified. ``lost`` must be 0.

Counters of what the hub saw (duplicate deliveries answered idempotently, late results rejected)
are read from ``/v1/status`` throughout and summed over the hub's lives (a ``kill -9`` resets them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agent.client.board import BoardClient
from agent.client.submitting import job_id_of, make_envelope, submit, verify_results
from agent.tools.chaos_audit import figures, read_store
from hub.home import HubHome
from jobs.manifest import Manifest
from security.errors import PanalError
from security.identity import Identity
from security.tls import BoardAddress

__all__ = ["run_chaos_bench"]

log = logging.getLogger(__name__)

LEASE_TTL_S = 4.0
SLOTS = 2
TASKS_PER_JOB = 10
TASK_S = (0.1, 0.8)
#: a chaos event every this many seconds (uniform); the hub is killed at most once per HUB_EVERY_S
EVENT_EVERY_S = (1.5, 4.0)
HUB_EVERY_S = 20.0
DRAIN_TIMEOUT_S = 180.0
HUB_ENV = {"PANAL_HUB_LEASE_TTL_S": str(LEASE_TTL_S), "PANAL_HUB_EXPIRY_INTERVAL_S": "0.2",
           "PANAL_HUB_MAX_POLL_WAIT_S": "5", "PANAL_HUB_DRAIN_TIMEOUT_S": "1",
           "PANAL_HUB_RETRY_BACKOFF_S": "0.2"}


def _free_port() -> int:
    """A port free a moment ago (bind 0, close): the hub must restart on the same one. Tiny race: someone
    else may take it before the hub binds; the hub's start then fails and the bench says so."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Lab:
    root: Path
    agents: int
    rng: random.Random
    store: str = ""     # hub.yaml `store`: empty for the SQLite default, else a postgresql:// URL
    port: int = field(default_factory=_free_port)
    hub: subprocess.Popen[str] | None = None
    fleet: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    frozen: dict[str, float] = field(default_factory=dict)     # agent name -> thaw at (monotonic)
    counts: Counter[str] = field(default_factory=Counter)
    hub_downs: list[tuple[float, float]] = field(default_factory=list)  # (killed at, back at), epoch s
    stats_seen: Counter[str] = field(default_factory=Counter)   # summed over the hub's past lives
    stats_now: dict[str, int] = field(default_factory=dict)
    url: str = ""
    _logs: list[IO[str]] = field(default_factory=list)

    # -- processes ------------------------------------------------------------------------------
    @property
    def user(self) -> Path:
        return self.root / "user"

    def _env(self, home: Path, **extra: str) -> dict[str, str]:
        return {**os.environ, "PANAL_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}

    def _cli(self, *args: str, home: Path) -> str:
        out = subprocess.run([sys.executable, "-m", "agent", *args], env=self._env(home), text=True,
                             capture_output=True, timeout=120, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"panal {' '.join(args)} failed: {out.stderr.strip()[-500:]}")
        return out.stdout

    def _spawn(self, name: str, args: list[str], home: Path, **env: str) -> subprocess.Popen[str]:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        sink = open(logs / f"{name}.log", "a")  # noqa: SIM115 - closed in close()
        self._logs.append(sink)
        return subprocess.Popen([sys.executable, "-m", "agent", "-v", *args], env=self._env(home, **env), text=True,
                                stdout=subprocess.PIPE if name == "hub" else subprocess.DEVNULL, stderr=sink,
                                start_new_session=True)   # its own group: killing it takes its workers too

    def init(self) -> None:
        hub_dir = self.root / "hub"
        self._cli("hub", "init", "--dir", str(hub_dir), "--port", str(self.port), home=self.user)
        if self.store:   # init authorised the user in the default store: again in this one
            HubHome(hub_dir).configure(store=self.store)
            self._cli("hub", "init", "--dir", str(hub_dir), home=self.user)
        self.url = self._cli("hub", "url", "--dir", str(hub_dir), home=self.user).strip()
        self.start_hub()
        for i in range(self.agents):
            name = f"agent{i}"
            self._cli("agent", "join", self.url, "--name", name, home=self.root / name)
            self.start_agent(name)

    def start_hub(self) -> None:
        self.hub = self._spawn("hub", ["hub", "serve", "--dir", str(self.root / "hub"), "--port", str(self.port),
                                      "--bind", "127.0.0.1"],
                               self.user, **HUB_ENV)
        assert self.hub.stdout is not None
        line = self.hub.stdout.readline()
        if "serving at" not in line:
            raise RuntimeError(f"the hub did not start on port {self.port} (taken meanwhile?); see {self.root}/logs")

    def start_agent(self, name: str) -> None:
        self.fleet[name] = self._spawn(name, ["agent", "run", "--name", name, "--slots", str(SLOTS), "--drain", "1",
                                              "--no-lan"], self.root / name)

    @staticmethod
    def _signal(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    # -- chaos ----------------------------------------------------------------------------------
    def kill_agent(self) -> None:
        awake = [n for n in self.fleet if n not in self.frozen]
        if not awake:
            return
        name = self.rng.choice(awake)
        proc = self.fleet[name]
        self._signal(proc, signal.SIGKILL)
        proc.wait()
        self.counts["agent_kills"] += 1
        log.info("chaos: SIGKILL %s and restart it", name)
        self.start_agent(name)

    def freeze_agent(self, now: float) -> None:
        awake = [n for n in self.fleet if n not in self.frozen]
        if len(awake) <= 1 < self.agents:   # keep one agent awake so work keeps flowing
            return
        name = self.rng.choice(awake)
        self._signal(self.fleet[name], signal.SIGSTOP)
        self.frozen[name] = now + LEASE_TTL_S + self.rng.uniform(0.5, 3.0)
        self.counts["agent_freezes"] += 1
        log.info("chaos: SIGSTOP %s past its lease TTL", name)

    def thaw(self, now: float, everyone: bool = False) -> None:
        for name, at in list(self.frozen.items()):
            if everyone or at <= now:
                self._signal(self.fleet[name], signal.SIGCONT)
                del self.frozen[name]

    def restart_hub(self) -> None:
        assert self.hub is not None
        self._signal(self.hub, signal.SIGKILL)
        self.hub.wait()
        if self.hub.stdout is not None:
            self.hub.stdout.close()
        killed = time.time()
        self.stats_seen.update(self.stats_now)   # what this life counted is gone with it
        self.stats_now = {}
        self.counts["hub_kills"] += 1
        log.info("chaos: kill -9 the hub and restart it")
        time.sleep(self.rng.uniform(0.5, 3.0))
        self.start_hub()
        self.hub_downs.append((killed, time.time()))

    def close(self) -> None:
        self.thaw(0.0, everyone=True)
        procs = [*self.fleet.values(), *([self.hub] if self.hub else [])]
        for proc in procs:
            self._signal(proc, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for sink in self._logs:
            sink.close()


class _Submitter:
    """Submits sleep jobs idempotently (an envelope is re-sent until the hub acknowledges it)."""

    def __init__(self, lab: _Lab) -> None:
        self.lab = lab
        self.identity = Identity.load(lab.user / "user.key")
        self.jobs: list[str] = []
        self.pending: dict[str, Any] | None = None

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with BoardClient(BoardAddress.parse(self.lab.url), self.identity, retry_for_s=1.0) as client:
            return await client.call(method, path, body, timeout_s=10.0)

    async def tick(self) -> None:
        """Note the hub's counters; submit another job when the queue runs low."""
        status = await self.call("GET", "/v1/status")
        self.lab.stats_now = {k: int(v) for k, v in status.get("stats", {}).items() if isinstance(v, int | float)}
        tasks = status.get("tasks", {})
        if self.pending is None and tasks.get("queued", 0) + tasks.get("leased", 0) < 2 * SLOTS * self.lab.agents:
            seconds = [round(self.lab.rng.uniform(*TASK_S), 2) for _ in range(TASKS_PER_JOB)]
            manifest = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job",
                                           "metadata": {"name": f"chaos-{len(self.jobs)}"},
                                           "spec": {"task": "sleep", "sweep": {"seconds": seconds},
                                                    "policy": {"retries": 20}}})
            self.pending = make_envelope(self.identity, manifest)
        if self.pending is not None:
            async with BoardClient(BoardAddress.parse(self.lab.url), self.identity, retry_for_s=1.0) as client:
                await submit(client, self.pending)
            self.jobs.append(job_id_of(self.pending))
            self.pending = None

    async def unfinished(self) -> int:
        status = await self.call("GET", "/v1/status")
        return int(status["jobs"]["active"])

    async def unverified(self) -> int:
        bad = 0
        async with BoardClient(BoardAddress.parse(self.lab.url), self.identity) as client:
            for job_id in self.jobs:
                reply = dict(await client.call("GET", f"/v1/jobs/{job_id}/results"))
                bad += sum(1 for check in verify_results(reply) if not check.ok)
        return bad


def run_chaos_bench(minutes: float, agents: int, seed: int | None = None,
                    workdir: Path | None = None, store: str = "") -> dict[str, Any]:
    """Soak for ``minutes`` of chaos with ``agents`` agents, drain, audit; return the figures.

    ``store`` is the hub's store (hub.yaml ``store``): empty for its SQLite file, or the URL of an empty
    PostgreSQL database of the soak's own; the audit reads the figures from that store."""
    if agents < 1 or minutes <= 0:
        raise ValueError("need at least one agent and a positive duration")
    seed = seed if seed is not None else random.randrange(2**32)
    with contextlib.ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="panal-chaos-")))
        lab = _Lab(root, agents, random.Random(seed), store)
        stack.callback(lab.close)
        return asyncio.run(_soak(lab, minutes, seed))
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns


async def _soak(lab: _Lab, minutes: float, seed: int) -> dict[str, Any]:
    await asyncio.to_thread(lab.init)
    sub = _Submitter(lab)
    started = time.monotonic()
    end = started + minutes * 60
    next_event = started + lab.rng.uniform(*EVENT_EVERY_S)
    last_hub_kill = started
    while (now := time.monotonic()) < end:
        lab.thaw(now)
        if now >= next_event:
            roll = lab.rng.random()
            if roll < 0.15 and now - last_hub_kill >= HUB_EVERY_S:
                await asyncio.to_thread(lab.restart_hub)
                last_hub_kill = time.monotonic()
            elif roll < 0.6:
                await asyncio.to_thread(lab.kill_agent)
            else:
                lab.freeze_agent(now)
            next_event = time.monotonic() + lab.rng.uniform(*EVENT_EVERY_S)
        with contextlib.suppress(PanalError):
            await sub.tick()
        await asyncio.sleep(0.5)
    chaos_s = time.monotonic() - started
    lab.thaw(0.0, everyone=True)
    while sub.pending is not None:   # the last envelope must be acknowledged before we audit
        with contextlib.suppress(PanalError):
            await sub.tick()
    drain_started = time.monotonic()
    while time.monotonic() - drain_started < DRAIN_TIMEOUT_S:
        with contextlib.suppress(PanalError):
            if await sub.unfinished() == 0:
                break
        await asyncio.sleep(1.0)
    drain_s = time.monotonic() - drain_started
    with contextlib.suppress(PanalError):
        status = await sub.call("GET", "/v1/status")
        lab.stats_now = {k: int(v) for k, v in status.get("stats", {}).items() if isinstance(v, int | float)}
    unverified = await sub.unverified()
    held = await asyncio.to_thread(read_store, lab.store, lab.root / "hub", sub.jobs, [b for _, b in lab.hub_downs])
    audit = figures(held, len(sub.jobs), TASKS_PER_JOB, lab.hub_downs)
    seen = lab.stats_seen + Counter(lab.stats_now)
    total_s = chaos_s + drain_s
    return {
        "seed": seed, "store": "postgresql" if lab.store else "sqlite",
        "minutes": minutes, "agents": lab.agents, "slots_per_agent": SLOTS, "lease_ttl_s": LEASE_TTL_S,
        "jobs": len(sub.jobs), **audit, "unverified": unverified,
        "agent_kills": lab.counts["agent_kills"], "agent_freezes": lab.counts["agent_freezes"],
        "hub_kills": lab.counts["hub_kills"],
        "leases_expired": seen["expired"], "duplicate_deliveries": seen["results_duplicate"],
        "late_results_rejected": seen["results_rejected"],
        "chaos_s": round(chaos_s, 1), "drain_s": round(drain_s, 1),
        "throughput_tasks_per_s": round(audit["done"] / total_s, 2) if total_s > 0 else 0.0,
        "ok": audit["lost"] == 0 and audit["duplicates"] == 0 and unverified == 0,
    }
