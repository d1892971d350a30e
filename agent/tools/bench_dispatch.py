"""``panal bench dispatch``: hub throughput and submit-to-result latency, with everything real.

A real ``panal hub serve`` process (TLS, signed requests, its store) and N simulated agents in this
process that use the real client, real signatures and real signed results, but answer ``sleep 0``
tasks at once instead of starting workers: what is measured is the dispatch path, not torch.

The hub's store is its default SQLite file unless ``--store URL`` names another (``postgresql://...``:
an empty database of the bench's own); several ``--store`` run one after another in the same
invocation, so their figures compare as ratios on one machine state.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import psutil

from agent import eventloop
from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, run_job, submit, wait_job
from agent.daemon.envelopes import EnvelopeBook, HeldEnvelopes
from agent.tools.demo import start_hub, stop
from hub.admission import TOKEN_HEADER
from jobs.committed import UNIT_PROOFS
from jobs.manifest import Manifest
from jobs.protocol import Assignment, LeaseReply, LeaseRequest
from jobs.protocol_registration import Registered, Registration
from jobs.protocol_results import ResultsReply, ResultsRequest
from jobs.requirements import Capabilities
from security.identity import Identity
from security.records import SignedRecord
from security.tls import BoardAddress

__all__ = ["run_dispatch_bench"]


def _manifest(n_tasks: int, name: str) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": name},
                               "spec": {"task": "sleep", "sweep": {"seconds": [0.0] * n_tasks}}},
                              max_tasks=max(n_tasks, 1))


class SimAgent:
    """An agent that completes every task it leases immediately, with a real signed result. Like a real
    agent it says which job envelopes it holds (``LeaseRequest.have``) and fetches a big one once."""

    def __init__(self, address: BoardAddress, slots: int, *, local_address: str | None = None,
                 token: str | None = None, have: bool = True) -> None:
        self.identity = Identity.generate()
        self.client = BoardClient(address, self.identity, retry_for_s=30.0, connections=2,
                                  local_address=local_address)
        self.slots = slots
        self.token = token      # the admission token `panal agent join` would send (a token-registration hub)
        self.done = 0
        self.leased_at = 0.0    # perf_counter() when a lease last brought work (the latency steps)
        #: the envelopes it holds, in a real agent's book (agent/daemon/envelopes.py); None: it says nothing, as an
        #: agent before ``have`` (every small envelope in every assignment, a big one never)
        self.book = EnvelopeBook() if have else None
        self._held: HeldEnvelopes | None = None

    async def register(self) -> None:
        caps = Capabilities.from_dict({"kinds": ["sleep"], "features": [UNIT_PROOFS]})
        await self.client.post("/v1/agents", Registration(self.identity.public, "sim", caps), Registered.decode,
                               headers={TOKEN_HEADER: self.token} if self.token else None)

    def _result(self, task: Assignment) -> SignedRecord:
        now = time.time()
        return SignedRecord.sign(self.identity, {
            "task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id,
            "attempt": task.attempt, "agent_id": self.identity.id, "status": "ok", "values": {"slept": 0.0},
            "metrics": {"wall_s": 0.0}, "notes": [], "started_at": now, "finished_at": now})

    def holding(self) -> dict[str, str] | None:
        """The next lease request's ``have``; its entries are kept until :meth:`hold_envelopes` reads the reply."""
        if self.book is None:
            return None
        self._held = self.book.held()
        return self._held.have

    async def hold_envelopes(self, reply: LeaseReply) -> int:
        """Keep the envelopes a reply brought and fetch each one it left out that we do not hold, once, as a
        real agent does (agent/daemon/board_link.py); the bytes fetched."""
        held, fetched = self._held, 0
        if held is None:
            return fetched
        _, missing = held.resolve(reply.tasks)
        for job_id in dict.fromkeys(task.job_id for task in missing):
            record = SignedRecord.from_wire(await self.client.call("GET", f"/v1/jobs/{job_id}/envelope",
                                                                   timeout_s=300.0))
            fetched += len(record.payload)
            held.add(job_id, record)
        return fetched

    async def run(self, stop_at: asyncio.Event) -> None:
        results: tuple[SignedRecord, ...] = ()
        while not stop_at.is_set():
            reply = await self.client.post("/v1/lease", LeaseRequest(self.slots, 1.0, results, self.holding()),
                                           LeaseReply.decode, timeout_s=30.0)
            await self.hold_envelopes(reply)
            if reply.tasks:
                self.leased_at = time.perf_counter()
            results = tuple(self._result(t) for t in reply.tasks)
            self.done += len(results)
        if results:
            await self.client.post("/v1/results", ResultsRequest(results), ResultsReply.decode)


class _Path:
    """One way from submit to result: its latencies and their steps (ms)."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.steps: dict[str, list[float]] = {}

    def add(self, t0: float, t1: float, leased_at: float, t3: float, one_request: bool) -> None:
        self.latencies.append((t3 - t0) * 1000)
        steps = (("to_lease", leased_at - t0),) if one_request else (("submit", t1 - t0), ("to_lease", leased_at - t1))
        for name, s in (*steps, ("to_done", t3 - leased_at)):
            self.steps.setdefault(name, []).append(s * 1000)

    def summary(self, label: str) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {f"{label}latency_ms_p50": round(statistics.median(ordered), 2),
                f"{label}latency_ms_p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
                f"{label}latency_steps_ms_p50": {k: round(statistics.median(v), 2) for k, v in self.steps.items()}}


async def _bench(url: str, user: Identity, agents: int, tasks: int, slots: int, samples: int,
                 hub_pid: int | None = None) -> dict[str, Any]:
    address = BoardAddress.parse(url)
    out: dict[str, Any] = {"agents": agents, "tasks": tasks, "slots_per_agent": slots}
    async with BoardClient(address, user, retry_for_s=30.0) as submitter:
        # Latency: one agent, one-task jobs, submit -> result accepted -> submitter sees the job done.
        solo = SimAgent(address, 1)
        await solo.register()
        stop_solo = asyncio.Event()
        solo_task = asyncio.create_task(solo.run(stop_solo))
        await asyncio.sleep(0.2)
        # Two ways, sample by sample in turn (the machine's noise falls on both alike): one request (the
        # submit waits for the job: run_job), and the submit's reply at once, then a waiting GET.
        paths = {"": _Path(), "two_requests_": _Path()}
        for i in range(2 * samples):
            one_request = i % 2 == 0
            envelope = make_envelope(user, _manifest(1, f"lat-{i}"))
            t0 = time.perf_counter()
            if one_request:
                final = await run_job(submitter, envelope, 30.0)
                t1 = t0
            else:
                job = await submit(submitter, envelope)
                t1 = time.perf_counter()
                final = await wait_job(submitter, job["id"], 30.0)
            t3 = time.perf_counter()
            assert final["state"] == "succeeded", final
            # where the time went: the submit round trip (two requests); its reply (or its start) -> the agent
            # holds the task (wake-up, pick, lease commit, reply); the agent holds it -> the submitter sees the
            # job done (signed result on the next lease request, its commit, the job's end, the waiting reply)
            paths["" if one_request else "two_requests_"].add(t0, t1, solo.leased_at, t3, one_request)
        stop_solo.set()
        await solo_task
        await solo.client.close()
        for label, path in paths.items():
            out.update(path.summary(label))
        if tasks <= 0:      # --latency-only
            return out

        # Throughput: N agents drain one job of M sleep-0 tasks.
        fleet = [SimAgent(address, slots) for _ in range(agents)]
        await asyncio.gather(*(a.register() for a in fleet))
        stop_fleet = asyncio.Event()
        runners = [asyncio.create_task(a.run(stop_fleet)) for a in fleet]
        await asyncio.sleep(0.5)
        envelope = make_envelope(user, _manifest(tasks, "throughput"))
        hub_proc = psutil.Process(hub_pid) if hub_pid else None
        cpu0 = sum(hub_proc.cpu_times()[:2]) if hub_proc else 0.0
        t0 = time.perf_counter()
        job = await submit(submitter, envelope)
        final = await wait_job(submitter, job["id"], 600.0)
        elapsed = time.perf_counter() - t0
        if hub_proc is not None:
            # The load generator shares this machine's cores with the hub: the hub's own CPU time per
            # task says what one hub process could do with a core to itself.
            hub_ms = (sum(hub_proc.cpu_times()[:2]) - cpu0) * 1000 / tasks
            out["hub_cpu_ms_per_task"] = round(hub_ms, 3)
            out["hub_capacity_tasks_per_s_per_core"] = round(1000 / hub_ms, 0) if hub_ms else None
        stop_fleet.set()
        await asyncio.gather(*runners)
        for a in fleet:
            await a.client.close()
        out["throughput_state"] = final["state"]
        out["throughput_seconds"] = round(elapsed, 2)
        out["tasks_per_s"] = round(tasks / elapsed, 1)
    return out


def run_dispatch_bench(agents: int, tasks: int, slots: int, samples: int, store: str = "") -> dict[str, Any]:
    """One run against a fresh hub whose store is ``store`` (empty: its SQLite default)."""
    with tempfile.TemporaryDirectory(prefix="panal-bench-") as tmp:
        user_home = Path(tmp) / "user"
        hub, url = start_hub(Path(tmp) / "hub", user_home, settings={"store": store} if store else None)
        try:
            user = Identity.load(user_home / "user.key")
            return eventloop.run(_bench(url, user, agents, tasks, slots, samples, hub.pid))   # (the hub's loop too)
        finally:
            stop([hub])
            if hub.stdout is not None:
                hub.stdout.close()


def ray_baseline(python: str, samples: int, tasks: int) -> dict[str, Any]:
    """Ray's figures for the same measurement (``benchmarks/ray_baseline.py`` run by ``python``, an interpreter
    that has ray: a dev-only comparison, ray is no dependency of panal). Needs a checkout (benchmarks/)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "ray_baseline.py"
    if not script.exists():
        raise click.ClickException(f"--ray needs panal's source checkout: {script} is missing")
    try:
        proc = subprocess.run([python, str(script), "--samples", str(samples), "--tasks", str(tasks)],
                              capture_output=True, text=True, timeout=1800, check=False)
    except OSError as exc:
        raise click.ClickException(f"--ray {python}: cannot run it: {exc}") from exc
    lines = proc.stdout.strip().splitlines()
    if "No module named 'ray'" in proc.stderr:
        raise click.ClickException(f"--ray {python}: that interpreter has no ray; give it a venv of its own: "
                                   "python3 -m venv /tmp/ray && /tmp/ray/bin/pip install ray")
    if proc.returncode != 0 or not lines:
        raise click.ClickException(f"--ray {python}: the Ray baseline failed (exit {proc.returncode}):\n"
                                   f"{proc.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def versus_ray(panal: dict[str, Any], ray: dict[str, Any]) -> dict[str, Any]:
    """panal's figures as ratios to Ray's from the same run: latency panal/Ray (lower is better), throughput
    panal/Ray (higher is better). The goals: latency <= 1.5, throughput >= 1.5."""
    out = {"latency_p50_x_ray": round(panal["latency_ms_p50"] / ray["latency_ms_p50"], 2)}
    if "tasks_per_s" in panal and "tasks_per_s" in ray:
        out["tasks_per_s_x_ray"] = round(panal["tasks_per_s"] / ray["tasks_per_s"], 2)
    return out


def compare_stores(agents: int, tasks: int, slots: int, samples: int, stores: list[str]) -> dict[str, Any]:
    """The bench once per store, in order; each store's throughput also as a ratio to the first's."""
    runs = {_label(store): run_dispatch_bench(agents, tasks, slots, samples, store) for store in stores}
    base = next(iter(runs.values())).get("tasks_per_s")   # none in a latency-only run
    for run in runs.values():
        run["tasks_per_s_vs_first"] = round(run["tasks_per_s"] / base, 3) if base and "tasks_per_s" in run else None
    return runs


def _label(store: str) -> str:
    """A store URL without its password: ``postgresql://127.0.0.1:5432/db``, ``sqlite (default)``."""
    if not store:
        return "sqlite (default)"
    scheme, _, rest = store.partition("://")
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}"

