"""``panal bench fleet``: what a big fleet of connected agents costs one hub process.

A real ``panal hub serve`` process (TLS, signed requests, SQLite) and N light simulated agents spread
over a few load processes, each agent with its own key, its own pinned TLS connection and the long-poll
of a real agent (``poll_wait_s`` 20 s, capped by the board; a ``retry_after_s`` pause honoured, as
``agent/daemon/board_link.py`` does). Agents answer ``sleep 0`` tasks at once with real signed results
riding on their next lease request; like a real agent they say which job envelopes they hold
(``LeaseRequest.have``), fetch a big one once (``GET /v1/jobs/{id}/envelope``) and check every committed task with
the agent's own :class:`~agent.daemon.assignments.ManifestCache` (the 100k-task job is signed committed, through
``make_envelope`` as ``panal submit`` signs it: each task proves its unit against the signed Merkle root,
jobs/committed.py). Phases, one after the other:

1. idle: every agent connected, no work, for ``idle_s``: the hub's CPU share of one core and its RSS per agent;
2. drain: one job of ``tasks`` ``sleep 0`` tasks (``task_s``: held a while): time to drain, hub CPU per task
   and per lease, lease wake-ups per dispatched task (``panal_lease_wakeups_total``), and lease times seen
   from both ends: the hub's own service time p50/p99 (``panal_lease_service_seconds``: its long-poll wait
   and a slow client's body left out) and the agents' round trip p50/p99 (of busy agents: requests that
   carried results and brought work; on a small machine mostly queueing in the load processes);
3. mixed: a share of the agents report a (fake) GPU; a job that needs one and a job any agent can run are
   submitted together: the same figures, and how many GPU tasks went to an agent without one.

Every task id leased is reported back, so a run also says whether any task was leased twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import random
import resource
import statistics
import tempfile
import time
from asyncio import sslproto
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit, wait_job
from agent.daemon.assignments import ManifestCache
from agent.tools.bench_dispatch import SimAgent
from agent.tools.demo import start_hub, stop
from agent.tools.hub_probe import HubProcess, pct, quantile_ms
from hub.connections import LeanSSLProtocol
from jobs.committed import UNIT_PROOFS
from jobs.manifest import Manifest
from jobs.protocol import LeaseReply, LeaseRequest
from jobs.protocol_registration import Registered, Registration
from jobs.requirements import Capabilities
from jobs.wire import MSGPACK, encode_body
from security.errors import PanalError
from security.identity import Identity
from security.tls import BoardAddress

__all__ = ["FleetSize", "run_fleet_bench", "run_until_told"]

SERVICE = "panal_lease_service_seconds"   # hub/metrics.py: a lease's time in the hub, its long-poll wait left out
NOTES = {
    "hub_lease_service_ms_p50/p99": "HUB side, from /metrics panal_lease_service_seconds: a lease request's time "
                                    "in the hub's handler less its long-poll wait (every lease in the phase); "
                                    "interpolated within histogram buckets. It includes waiting for the hub's "
                                    "one event loop behind other requests: with every agent asking again at "
                                    "once (sleep-0 tasks) it is about agents in flight / leases per second",
    "hub_cpu_ms_per_lease": "HUB side: the hub process's CPU time in the phase over the lease requests it served: "
                            "what one lease costs it, free of queueing (results riding on leases included)",
    "agent_lease_round_trip_ms_p50/p99": "CLIENT side, seen by the simulated agents: round trips of busy agents' "
                                         "leases (they carried results and brought work), including TLS, the "
                                         "network stack and queueing in the load processes, which on a small "
                                         "machine share its cores with the hub",
}
POLL_WAIT_S = 20.0     # agent/daemon/settings.py DaemonSettings.poll_wait_s: a real agent's long-poll
FAKE_GPU = {"name": "Simulated RTX 3060", "backend": "cuda", "vram_gb": 12.0, "gflops_fp32": 12_000.0}


@dataclass(frozen=True)
class FleetSize:
    """How big a fleet, and how long each phase."""

    agents: int = 1000
    idle_s: float = 60.0
    tasks: int = 100_000
    mixed_tasks: int = 10_000        # each of the two mixed jobs
    gpu_share: float = 0.25          # agents that report a GPU
    slots: int = 4                   # per agent
    procs: int = 2                   # load processes the agents are spread over
    #: seconds a simulated agent "runs" its leased tasks before it reports them, +-50% at random (0: sleep-0
    #: tasks, every agent asks again at once and the hub is saturated; > 0: the fleet offers about agents * slots
    #: / task_s tasks a second, so lease times show the hub below saturation). 1.5 * task_s must stay below the
    #: hub's lease_ttl_s (30 s): these agents send no heartbeats.
    task_s: float = 0.0


class FleetAgent(SimAgent):
    """A :class:`SimAgent` on one connection, long-polling as a real agent does, recording what it leased."""

    def __init__(self, address: BoardAddress, slots: int, gpu: bool, have: bool = True,
                 task_s: float = 0.0) -> None:
        super().__init__(address, slots, have=have)
        self.task_s = task_s
        self.client = BoardClient(address, self.identity, retry_for_s=120.0, connections=1)
        self.gpu = gpu
        self.poll_wait_s = POLL_WAIT_S
        #: (wall time, round trip ms) of a busy agent's leases: they carried results and brought work. A request
        #: parked before work appeared is left out: its round trip is mostly the wait, not the hub's service.
        self.leases: list[tuple[float, float]] = []
        self.leased: list[str] = []                     # task ids, in order
        self.jobs: Counter[str] = Counter()             # tasks leased per job
        self.outcomes: Counter[str] = Counter()
        self.manifests = ManifestCache()                # the real agent's check of each task
        self.refused = self.proofs = self.proof_bytes = self.envelope_bytes = 0

    async def register(self) -> None:
        caps: dict[str, Any] = {"kinds": ["sleep"], "cpu_cores": self.slots, "features": [UNIT_PROOFS]}
        if self.gpu:
            caps["gpus"] = [FAKE_GPU]
        registered = await self.client.post("/v1/agents", Registration(self.identity.public, "sim",
                                                                       Capabilities.from_dict(caps)),
                                            Registered.decode)
        self.poll_wait_s = min(POLL_WAIT_S, float(registered.max_poll_wait_s))

    async def hold_envelopes(self, reply: LeaseReply) -> int:
        """Envelopes held and a big one fetched (:class:`SimAgent`), then each task of a committed job checked as the
        agent checks it before running it (its unit proven against the signed root). A task of a manifest signed
        whole is not: its check (expanding the manifest once per agent and envelope) is unchanged, and would put
        2,000 agents' worth of it on the load processes that share the hub's machine."""
        fetched = await super().hold_envelopes(reply)
        self.envelope_bytes += fetched
        if self._held is not None:
            resolved, _ = self._held.resolve(reply.tasks)   # after the fetch: each task with its envelope
            for task in resolved:
                if task.proof is None:
                    continue
                self.proofs += 1
                self.proof_bytes += len(encode_body(task.proof.encode(), MSGPACK))
                try:
                    self.manifests.check(task)
                except PanalError:
                    self.refused += 1
        return fetched

    async def run(self, stop_at: asyncio.Event) -> None:
        results: tuple[Any, ...] = ()
        while not stop_at.is_set():
            t0 = time.perf_counter()
            request = LeaseRequest(self.slots, self.poll_wait_s, results, self.holding())
            reply = await self.client.post("/v1/lease", request,
                                           LeaseReply.decode, timeout_s=self.poll_wait_s + 60.0)
            await self.hold_envelopes(reply)
            self.outcomes.update(o.status.value for o in reply.results)
            if reply.tasks:
                if results:
                    self.leases.append((time.time(), (time.perf_counter() - t0) * 1000))
                self.leased.extend(t.task_id for t in reply.tasks)
                self.jobs.update(t.job_id for t in reply.tasks)
                if self.task_s:   # run times vary (+-50%), or a fleet woken together would ask together forever
                    await asyncio.sleep(self.task_s * random.uniform(0.5, 1.5))
            elif reply.retry_after_s:
                await asyncio.sleep(reply.retry_after_s)
            results = tuple(self._result(t) for t in reply.tasks)


async def run_until_told(agents: Sequence[SimAgent], conn: Connection, gate: int = 64) -> list[BaseException]:
    """Register the agents (``gate`` at a time), run them until the main process writes to ``conn``, close their
    clients; what stopped a runner early. A load process's life, shared with benchmarks/bench_envelopes.py."""
    limit = asyncio.Semaphore(gate)

    async def register(agent: SimAgent) -> None:
        async with limit:
            await agent.register()

    await asyncio.gather(*(register(a) for a in agents))
    stop_at = asyncio.Event()
    runners = [asyncio.create_task(a.run(stop_at)) for a in agents]
    conn.send("registered")
    told = asyncio.Event()
    asyncio.get_running_loop().add_reader(conn.fileno(), told.set)
    await told.wait()               # the main process says stop once every job is done
    stop_at.set()
    failed = [e for r in runners if r.done() and not r.cancelled() and (e := r.exception()) is not None]
    for runner in runners:
        runner.cancel()
    await asyncio.gather(*runners, return_exceptions=True)
    for agent in agents:
        await agent.client.close()
    return failed


async def _load(url: str, count: int, gpus: int, slots: int, conn: Connection, task_s: float = 0.0) -> None:
    address = BoardAddress.parse(url)
    agents = [FleetAgent(address, slots, gpu=i < gpus, task_s=task_s) for i in range(count)]
    failed = await run_until_told(agents, conn)
    conn.send([{"gpu": a.gpu, "leases": a.leases, "leased": a.leased, "jobs": dict(a.jobs),
                "outcomes": dict(a.outcomes), "refused": a.refused, "proofs": a.proofs, "proof_bytes": a.proof_bytes,
                "envelope_bytes": a.envelope_bytes} for a in agents]
              + [{"error": f"{type(e).__name__}: {e}"} for e in failed])


def _load_process(url: str, count: int, gpus: int, slots: int, conn: Connection, task_s: float = 0.0) -> None:
    """A load process: ``count`` agents (the first ``gpus`` with a GPU) until the main process says stop."""
    _raise_fd_limit()
    # asyncio gives each TLS connection a 256 KiB receive buffer: 5,000 simulated agents in one process would hold
    # 1.3 GB of them. Their connections share one, as the hub's do (LeanSSLProtocol); this process runs only them.
    sslproto.SSLProtocol = LeanSSLProtocol  # type: ignore[misc]
    asyncio.run(_load(url, count, gpus, slots, conn, task_s))


def _raise_fd_limit() -> None:
    """Every agent holds a connection (and the hub one per agent): lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _manifest(n_tasks: int, name: str, gpu: bool = False) -> Manifest:
    spec: dict[str, Any] = {"task": "sleep", "sweep": {"seconds": [0.0] * n_tasks}}
    if gpu:
        spec["requires"] = {"device": "gpu"}
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": name}, "spec": spec},
                              max_tasks=max(n_tasks, 1))


@dataclass
class Window:
    """One phase's clocks and counters, read at its start and its end."""

    wall: float = 0.0
    t0: float = 0.0
    cpu: float = 0.0
    wakeups: float = 0.0
    service: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    @classmethod
    async def start(cls, hub: HubProcess) -> Window:
        lines = await hub.scrape()
        return cls(time.time(), time.perf_counter(), hub.cpu_s(), hub.counter(lines, "panal_lease_wakeups_total"),
                   hub.buckets(lines, SERVICE))

    async def figures(self, hub: HubProcess, tasks: int) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.t0
        cpu = hub.cpu_s() - self.cpu
        lines = await hub.scrape()
        wakeups = hub.counter(lines, "panal_lease_wakeups_total") - self.wakeups
        service = hub.buckets(lines, SERVICE)
        leases = int(service[-1][1] - self.service[-1][1])
        return {"seconds": round(elapsed, 2), "tasks_per_s": round(tasks / elapsed, 1) if tasks else None,
                "hub_cpu_share_of_core": round(cpu / elapsed, 3),
                "hub_cpu_ms_per_task": round(cpu * 1000 / tasks, 3) if tasks else None,
                "wakeups_per_task": round(wakeups / tasks, 3) if tasks else None, "wakeups": int(wakeups),
                "hub_lease_service_ms_p50": quantile_ms(self.service, service, 0.5),
                "hub_lease_service_ms_p99": quantile_ms(self.service, service, 0.99),
                "hub_leases_served": leases,
                "hub_cpu_ms_per_lease": round(cpu * 1000 / leases, 3) if leases else None,
                "window": (self.wall, time.time())}


async def _phases(url: str, user: Identity, hub_pid: int, rss0: float, size: FleetSize,
                  loads: list[Connection]) -> dict[str, Any]:
    out: dict[str, Any] = {"size": dataclasses.asdict(size), "notes": NOTES, "load_before": os.getloadavg()}
    async with BoardClient(BoardAddress.parse(url), user, retry_for_s=120.0) as submitter:
        hub = HubProcess(hub_pid, submitter)
        out["hub_rss_mb_no_agents"] = rss0
        t0 = time.perf_counter()
        for conn in loads:
            await asyncio.to_thread(conn.recv)      # "registered"
        out["register_seconds"] = round(time.perf_counter() - t0, 2)

        idle = await Window.start(hub)
        await asyncio.sleep(size.idle_s)
        out["idle"] = await idle.figures(hub, 0)
        out["idle"]["hub_rss_mb"] = rss1 = hub.rss_mb()
        out["idle"]["hub_rss_kb_per_agent"] = round((rss1 - rss0) * 1024 / max(size.agents, 1), 1)

        drain = await Window.start(hub)
        job = await submit(submitter, make_envelope(user, _manifest(size.tasks, "fleet-drain")))
        final = await wait_job(submitter, job["id"], 3600.0)
        out["drain"] = await drain.figures(hub, size.tasks) | {"state": final["state"], "job": job["id"]}

        mixed = await Window.start(hub)
        jobs = [await submit(submitter, make_envelope(user, _manifest(size.mixed_tasks, f"fleet-{kind}", gpu)))
                for kind, gpu in (("gpu", True), ("cpu", False))]
        finals = [await wait_job(submitter, j["id"], 3600.0) for j in jobs]
        out["mixed"] = await mixed.figures(hub, 2 * size.mixed_tasks) | {
            "states": [f["state"] for f in finals], "gpu_job": jobs[0]["id"]}
        out["hub_rss_mb_end"] = hub.rss_mb()
    out["load_after"] = os.getloadavg()
    return out


def _combine(out: dict[str, Any], reports: list[dict[str, Any]], gpu_job: str) -> dict[str, Any]:
    """The agents' side: lease round trips per phase, tasks leased twice, GPU tasks on CPU-only agents."""
    out["agent_errors"] = [r["error"] for r in reports if "error" in r][:10]
    reports = [r for r in reports if "error" not in r]
    leased = Counter(task for r in reports for task in r["leased"])
    out["tasks_leased"] = len(leased)
    out["tasks_leased_twice"] = sum(1 for n in leased.values() if n > 1)
    out["outcomes"] = dict(sum((Counter(r["outcomes"]) for r in reports), Counter()))
    out["gpu_tasks_on_cpu_agents"] = sum(r["jobs"].get(gpu_job, 0) for r in reports if not r["gpu"])
    out["tasks_refused_by_agents"] = sum(r["refused"] for r in reports)   # the agent's own check: 0 on an honest hub
    proofs = sum(r["proofs"] for r in reports)
    out["proof_bytes_per_assignment"] = round(sum(r["proof_bytes"] for r in reports) / proofs, 1) if proofs else None
    out["envelope_bytes_fetched"] = sum(r["envelope_bytes"] for r in reports)
    for phase in ("drain", "mixed"):
        lo, hi = out[phase].pop("window")
        times = [ms for r in reports for at, ms in r["leases"] if lo <= at <= hi]
        out[phase]["agent_lease_round_trip_ms_p50"] = round(statistics.median(times), 2) if times else None
        out[phase]["agent_lease_round_trip_ms_p99"] = pct(times, 0.99)
    out["idle"].pop("window")
    return out


def run_fleet_bench(size: FleetSize) -> dict[str, Any]:
    if size.agents < 1 or size.procs < 1 or size.tasks < 1 or size.task_s < 0:
        raise ValueError("agents, procs and tasks must be at least 1, task_s at least 0")
    _raise_fd_limit()
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="panal-fleet-") as tmp:
        user_home = Path(tmp) / "user"
        headroom = 2 * size.agents + 256
        hub, url = start_hub(Path(tmp) / "hub", user_home, settings={
            "max_tasks_per_job": max(size.tasks, size.mixed_tasks, 10_000),
            "max_connections": max(4096, headroom), "max_long_polls": max(2048, headroom)})
        rss0 = round(psutil.Process(hub.pid).memory_info().rss / 2**20, 1)
        procs: list[Any] = []
        loads: list[Connection] = []
        try:
            per = [size.agents // size.procs + (i < size.agents % size.procs) for i in range(size.procs)]
            gpus = round(size.agents * size.gpu_share)
            for i, count in enumerate(per):
                mine, theirs = ctx.Pipe()
                share = min(count, max(0, gpus - sum(per[:i])))
                proc = ctx.Process(target=_load_process, args=(url, count, share, size.slots, theirs, size.task_s),
                                   daemon=True)
                proc.start()
                theirs.close()      # a load process that dies then ends our recv with EOFError, not a hang
                procs.append(proc)
                loads.append(mine)
            user = Identity.load(user_home / "user.key")
            out = asyncio.run(_phases(url, user, hub.pid, rss0, size, loads))
            reports: list[dict[str, Any]] = []
            for conn in loads:
                conn.send("stop")
                reports.extend(conn.recv())
            return _combine(out, reports, out["mixed"]["gpu_job"])
        finally:
            for proc in procs:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
            for conn in loads:
                conn.close()
            with contextlib.suppress(Exception):
                stop([hub])
            if hub.stdout is not None:
                hub.stdout.close()
