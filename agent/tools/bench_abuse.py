"""``panal bench abuse``: does the hub keep serving its honest agents while strangers attack it?

A real ``panal hub serve`` process (TLS, signatures, SQLite) and honest simulated agents from
:mod:`agent.tools.bench_dispatch` drain sleep-0 tasks twice: once alone (the baseline), once while these
probes run together (the attack, :mod:`agent.tools.abuse_probes`): a registration flood of fresh keys, idle
TLS connections, slowloris connections (a request head sent one header every few seconds), live status
viewers (SSE) and a flood of unsigned 4 MB msgpack bodies. It reports honest throughput and lease latency
in both phases, the hub's peak RSS and CPU (:mod:`agent.tools.hub_probe`), and what each probe observed:
refused, closed by the hub, or still open at the end.
It reports what it sees; it does not judge a hub by what it is supposed to do.

The hub is configured as on the internet, on loopback: it serves on 127.0.0.2, which is not one of the
local-only binds (hub/config.py ``LOOPBACK_BINDS``), so registration needs an admission token and one
source address gets at most ``max_connections_per_address`` connections. Linux routes all of 127/8 to
``lo``, so every honest agent connects from its own address (127.1.x.y, as volunteers come from their
own machines), the submitter from 127.0.3.1 and the attacker from 127.0.2.1, with no token.
``--open-registration`` measures ``registration: open`` instead (no token, rate-limited per address).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from agent.tools.abuse_probes import attack
from agent.tools.bench_dispatch import SimAgent, _manifest
from agent.tools.demo import panal_cli, start_hub, stop
from agent.tools.hub_probe import CpuWatch, RssWatch, pct
from jobs.protocol import LeaseReply, LeaseRequest
from jobs.protocol_results import ResultsReply, ResultsRequest
from security.identity import Identity
from security.tls import BoardAddress, join_token

__all__ = ["PROBES", "AbuseSize", "run_abuse_bench"]

PROBES = ("registration_flood", "idle", "slowloris", "sse_viewers", "unsigned_body_flood")
HUB_HOST = "127.0.0.2"        # loopback, but not a local-only bind: the hub applies its WAN defaults
SUBMITTER_ADDRESS = "127.0.3.1"
ATTACKER_ADDRESS = "127.0.2.1"


def honest_address(i: int) -> str:
    """Honest agent ``i``'s own source address (127.1.0.1, 127.1.0.2, ...)."""
    return f"127.1.{i // 250}.{i % 250 + 1}"


@dataclass(frozen=True)
class AbuseSize:
    """How hard to attack, and for how long to measure each phase."""

    agents: int = 50
    seconds: float = 20.0
    registrations: int = 10_000     # fresh keys the flood tries to register (it stops at the phase's end)
    idle: int = 2000
    slowloris: int = 500
    viewers: int = 20
    body_flooders: int = 4          # concurrent senders of unsigned 4 MB bodies
    body_bytes: int = 4 * 1024 * 1024
    tasks_per_job: int = 10_000
    probes: tuple[str, ...] = PROBES
    open_registration: bool = False  # hub.yaml `registration: open` (rate-limited per address), not token

    @classmethod
    def quick(cls) -> AbuseSize:
        return cls(agents=5, seconds=3.0, registrations=200, idle=50, slowloris=20, viewers=3, body_flooders=1,
                   body_bytes=1024 * 1024, tasks_per_job=2000)


class TimedAgent(SimAgent):
    """A :class:`SimAgent` that times every lease round trip that brought work."""

    def __init__(self, address: BoardAddress, slots: int, local_address: str, token: str | None) -> None:
        super().__init__(address, slots, local_address=local_address, token=token)
        self.lease_ms: list[float] = []
        self.total = 0      # tasks done since start (``done`` is reset per phase)

    async def run(self, stop_at: asyncio.Event) -> None:
        results: tuple[Any, ...] = ()
        while not stop_at.is_set():
            t0 = time.perf_counter()
            reply = await self.client.post("/v1/lease", LeaseRequest(self.slots, 1.0, results), LeaseReply.decode,
                                           timeout_s=60.0)
            if reply.tasks:
                self.lease_ms.append((time.perf_counter() - t0) * 1000)
            results = tuple(self._result(t) for t in reply.tasks)
            self.done += len(results)
            self.total += len(results)
        if results:   # deliver the last ones: a lease left open would hold up the hub's drain at the end
            await self.client.post("/v1/results", ResultsRequest(results), ResultsReply.decode)


async def _feed(submitter: BoardClient, user: Identity, fleet: list[TimedAgent], per_job: int,
                stop_at: asyncio.Event) -> None:
    """Keep about two jobs of work queued ahead of the fleet, so that no lease waits for work (and the
    hub does not hold a whole benchmark's tasks in memory from the start)."""
    submitted = 0
    while not stop_at.is_set():
        if sum(a.total for a in fleet) > submitted - 2 * per_job:
            await submit(submitter, make_envelope(user, _manifest(per_job, f"abuse-{submitted // per_job}")))
            submitted += per_job
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_at.wait(), 0.1)


async def _phase(fleet: list[TimedAgent], seconds: float, rss: RssWatch) -> dict[str, Any]:
    """Honest work for ``seconds``: tasks per second, lease latency, hub peak RSS."""
    for agent in fleet:
        agent.done, agent.lease_ms = 0, []
    rss.peak = 0
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - t0
    done = sum(a.done for a in fleet)
    lease_ms = [ms for a in fleet for ms in a.lease_ms]
    return {"tasks_per_s": round(done / elapsed, 1), "leases": len(lease_ms),
            "lease_ms_p50": round(statistics.median(lease_ms), 2) if lease_ms else None,
            "lease_ms_p99": pct(lease_ms, 0.99), "hub_peak_rss_mb": round(rss.peak / 2**20, 1)}


async def _bench(url: str, user: Identity, hub_pid: int, size: AbuseSize, token: str | None) -> dict[str, Any]:
    address = BoardAddress.parse(url)
    out: dict[str, Any] = {"size": dataclasses.asdict(size), "hub": {
        "url": url.split("#")[0], "registration": "open" if size.open_registration else "token",
        "honest_sources": f"{honest_address(0)}..{honest_address(size.agents - 1)}",
        "submitter_source": SUBMITTER_ADDRESS, "attacker_source": ATTACKER_ADDRESS}}
    stop_all = asyncio.Event()
    rss = RssWatch(hub_pid)
    watcher = asyncio.create_task(rss.run(stop_all))
    async with BoardClient(address, user, retry_for_s=60.0, local_address=SUBMITTER_ADDRESS) as submitter:
        fleet = [TimedAgent(address, 4, honest_address(i), token) for i in range(size.agents)]
        await asyncio.gather(*(a.register() for a in fleet))
        honest_stop = asyncio.Event()
        feeder = asyncio.create_task(_feed(submitter, user, fleet, size.tasks_per_job, honest_stop))
        runners = [asyncio.create_task(a.run(honest_stop)) for a in fleet]
        await asyncio.sleep(0.5)
        cpu = CpuWatch({"hub": hub_pid, "bench": os.getpid()})
        out["baseline"] = await _phase(fleet, size.seconds, rss)
        out["cpu_s"] = {"cores": os.cpu_count(), "baseline": cpu.lap()}
        mp = multiprocessing.get_context("spawn")
        started, attack_stop, seen = mp.Event(), mp.Event(), mp.Queue()
        attacker = mp.Process(target=attack, args=(url, size, ATTACKER_ADDRESS, started, attack_stop, seen),
                              daemon=True)
        attacker.start()
        cpu.watch("attacker", attacker.pid)
        await asyncio.to_thread(started.wait, 120)
        cpu.lap()
        out["attack"] = await _phase(fleet, size.seconds, rss)
        out["cpu_s"]["attack"] = cpu.lap()
        attack_stop.set()
        out["probes"] = await asyncio.to_thread(seen.get, True, 120)
        await asyncio.to_thread(attacker.join, 30)
        honest_stop.set()
        await asyncio.gather(feeder, *runners, return_exceptions=True)
        for agent in fleet:
            await agent.client.close()
    stop_all.set()
    await watcher
    base, hit = out["baseline"], out["attack"]
    out["throughput_ratio"] = round(hit["tasks_per_s"] / base["tasks_per_s"], 3) if base["tasks_per_s"] else None
    out["goals"] = {"throughput_ratio>=0.8": bool(out["throughput_ratio"] and out["throughput_ratio"] >= 0.8),
                    "lease_p99<250ms": bool(hit["lease_ms_p99"] is not None and hit["lease_ms_p99"] < 250),
                    "hub_peak_rss<300MB": hit["hub_peak_rss_mb"] < 300}
    return out


def _admission_token(hub_dir: Path, user_home: Path) -> str:
    """A token for every honest agent, made as an admin makes one: `panal hub tokens create`."""
    made = panal_cli("hub", "tokens", "create", "--dir", str(hub_dir), "--uses", "0", "--expires", "2h",
                  "--label", "bench", home=user_home)
    token = join_token(made.stdout.strip().splitlines()[-1])
    if token is None:
        raise RuntimeError(f"`panal hub tokens create` printed no join URL with a token: {made.stdout!r}")
    return token


def run_abuse_bench(size: AbuseSize) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * (size.idle + size.slowloris) + 4 * size.agents + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))   # the hub inherits it: a fair fight
    with tempfile.TemporaryDirectory(prefix="panal-bench-abuse-") as tmp:
        user_home = Path(tmp) / "user"
        hub_dir = Path(tmp) / "hub"
        hub, url = start_hub(hub_dir, user_home, HUB_HOST,
                             {"registration": "open"} if size.open_registration else None)
        try:
            token = None if size.open_registration else _admission_token(hub_dir, user_home)
            user = Identity.load(user_home / "user.key")
            return asyncio.run(_bench(url, user, hub.pid, size, token))
        finally:
            stop([hub])
