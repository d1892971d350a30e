"""``panal bench abuse``: does the hub keep serving its honest agents while strangers attack it?

A real ``panal hub serve`` process (TLS, signatures, SQLite) and honest simulated agents from
:mod:`agent.tools.bench_dispatch` drain sleep-0 tasks twice: once alone (the baseline), once while these
probes run together (the attack): a registration flood of fresh keys, idle TLS connections, slowloris
connections (a request head sent one header every few seconds), live status viewers (SSE) and a flood
of unsigned 4 MB msgpack bodies. It reports honest throughput and lease latency in both phases, the
hub's peak RSS, and what each probe observed: refused, closed by the hub, or still open at the end.
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
import ssl
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psutil

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from agent.tools.bench_dispatch import SimAgent, _manifest
from agent.tools.demo import panal_cli, start_hub, stop
from jobs.protocol import LeaseReply, LeaseRequest
from jobs.protocol_registration import Registration
from jobs.protocol_results import ResultsReply, ResultsRequest
from jobs.requirements import Capabilities
from jobs.wire import MSGPACK, encode_body
from security.httpsig import sign_request
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


class RssWatch:
    """The hub's peak resident memory, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0

    async def run(self, stop_at: asyncio.Event) -> None:
        while not stop_at.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_at.wait(), 0.2)


class CpuWatch:
    """CPU seconds (user + system) each process spent since the last lap: on a machine whose cores the
    hub shares with the load generator and the attacker, they say who the cores went to."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.procs: dict[str, psutil.Process] = {}
        self.last: dict[str, float] = {}
        for name, pid in pids.items():
            self.watch(name, pid)
        self.last["machine"] = self._machine_busy()

    def watch(self, name: str, pid: int | None) -> None:
        with contextlib.suppress(psutil.Error, TypeError):
            self.procs[name] = psutil.Process(pid)
            self.last[name] = self._total(self.procs[name])

    @staticmethod
    def _total(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    def lap(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                now = self._total(proc)
                out[name] = round(now - self.last[name], 1)
                self.last[name] = now
        # everything else on the machine (other work sharing the cores): busy CPU seconds not counted above
        busy = self._machine_busy()
        out["others"] = round(max(0.0, busy - self.last.get("machine", busy) - sum(out.values())), 1)
        self.last["machine"] = busy
        return out

    @staticmethod
    def _machine_busy() -> float:
        times = psutil.cpu_times()   # user includes guest time on Linux; steal is not this machine's work
        return float(sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq")))


def _tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE   # probes need no pinning
    return ctx


_TLS: ssl.SSLContext | None = None


def _tls() -> ssl.SSLContext:
    """One shared client context (making one loads the CA store: ~10 ms each, too slow per connection)."""
    global _TLS
    if _TLS is None:
        _TLS = _tls_context()
    return _TLS


class Probes:
    """The attackers; each writes what it saw into ``seen``."""

    def __init__(self, address: BoardAddress, size: AbuseSize, source: str) -> None:
        self.address, self.size = address, size
        self.local_addr = (source, 0)   # every probe connects from the attacker's one address
        parts = urlsplit(address.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 443
        self.seen: dict[str, Any] = {}
        self.conns: dict[str, list[asyncio.StreamWriter]] = {"idle": [], "slowloris": []}
        self.closed: Counter[str] = Counter()

    async def connections(self, kind: str, n: int, stop_at: asyncio.Event) -> None:
        """Open ``n`` TLS connections; slowloris ones trickle a request head, one header per 5 s."""
        refused: Counter[str] = Counter()
        gate = asyncio.Semaphore(100)

        async def one(i: int) -> None:
            async with gate:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port, ssl=_tls(), local_addr=self.local_addr), 30)
                except (OSError, TimeoutError, ssl.SSLError) as exc:
                    refused[type(exc).__name__] += 1
                    return
            self.conns[kind].append(writer)
            try:
                if kind == "slowloris":
                    writer.write(b"POST /v1/lease HTTP/1.1\r\nHost: hub\r\n")
                while not stop_at.is_set():
                    if kind == "slowloris":
                        writer.write(f"X-Slow-{i}: a\r\n".encode())
                        await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        if await asyncio.wait_for(reader.read(4096), 5.0) == b"":
                            self.closed[kind] += 1      # the hub closed it
                            return
            except (OSError, ssl.SSLError):
                self.closed[kind] += 1
        await asyncio.gather(*(one(i) for i in range(n)))
        self.seen[kind] = {"attempted": n, "refused_at_connect": dict(refused),
                           "closed_by_hub": self.closed[kind],
                           "open_at_end": n - sum(refused.values()) - self.closed[kind]}

    async def registrations(self, stop_at: asyncio.Event) -> None:
        statuses: Counter[int] = Counter()
        caps = Capabilities.from_dict({"kinds": ["sleep"]})
        connector = aiohttp.TCPConnector(ssl=_tls(), limit=32, local_addr=self.local_addr)
        t0 = time.perf_counter()
        async with aiohttp.ClientSession(self.address.url, connector=connector) as session:
            todo = iter(range(self.size.registrations))

            async def worker() -> None:
                for _ in todo:
                    if stop_at.is_set():
                        return
                    ident = Identity.generate()
                    data = encode_body(Registration(ident.public, "flood", caps).encode())
                    headers = {**sign_request(ident, "POST", "/v1/agents", "", data), "Content-Type": MSGPACK}
                    try:
                        async with session.post("/v1/agents", data=data, headers=headers) as resp:
                            await resp.read()
                            statuses[resp.status] += 1
                    except (aiohttp.ClientError, TimeoutError):
                        statuses[0] += 1
            await asyncio.gather(*(worker() for _ in range(32)))
        elapsed = time.perf_counter() - t0
        self.seen["registration_flood"] = {"sent": sum(statuses.values()), "statuses": dict(statuses),
                                           "registered": statuses[200],
                                           "registered_per_s": round(statuses[200] / elapsed, 1)}

    async def viewers(self, stop_at: asyncio.Event) -> None:
        statuses: Counter[int] = Counter()
        received = [0]
        connector = aiohttp.TCPConnector(ssl=_tls(), limit=0, local_addr=self.local_addr)
        async with aiohttp.ClientSession(self.address.url, connector=connector) as session:
            async def one() -> None:
                try:
                    async with session.get("/v1/events", timeout=aiohttp.ClientTimeout(total=None)) as resp:
                        statuses[resp.status] += 1
                        while resp.status == 200 and not stop_at.is_set():
                            with contextlib.suppress(TimeoutError):
                                chunk = await asyncio.wait_for(resp.content.readany(), 1.0)
                                if not chunk:
                                    return
                                received[0] += len(chunk)
                except (aiohttp.ClientError, TimeoutError):
                    statuses[0] += 1
            await asyncio.gather(*(one() for _ in range(self.size.viewers)))
        self.seen["sse_viewers"] = {"attempted": self.size.viewers, "statuses": dict(statuses),
                                    "streamed": statuses[200], "bytes_received": received[0]}

    async def bodies(self, stop_at: asyncio.Event) -> None:
        """Unsigned POST /v1/lease bodies: a msgpack array of empty maps, as big as the board takes."""
        n = self.size.body_bytes - 5
        body = b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n
        statuses: Counter[int] = Counter()
        reply_ms: list[float] = []
        connector = aiohttp.TCPConnector(ssl=_tls(), limit=self.size.body_flooders,
                                         local_addr=self.local_addr)
        async with aiohttp.ClientSession(self.address.url, connector=connector) as session:
            async def worker() -> None:
                while not stop_at.is_set():
                    t0 = time.perf_counter()
                    try:
                        async with session.post("/v1/lease", data=body, headers={"Content-Type": MSGPACK}) as resp:
                            await resp.read()
                            statuses[resp.status] += 1
                    except (aiohttp.ClientError, TimeoutError):
                        statuses[0] += 1
                    reply_ms.append((time.perf_counter() - t0) * 1000)
            await asyncio.gather(*(worker() for _ in range(self.size.body_flooders)))
        self.seen["unsigned_body_flood"] = {"sent": len(reply_ms), "statuses": dict(statuses),
                                            "body_bytes": self.size.body_bytes,
                                            "reply_ms_p50": _pct(reply_ms, 0.5)}

    def close(self) -> None:
        for writers in self.conns.values():
            for writer in writers:
                writer.close()


def _attack(url: str, size: AbuseSize, started: Any, stop_at: Any, out: Any) -> None:
    """The attack, in its own process: its CPU (key generation, TLS handshakes) must not slow the honest
    agents' own event loop, or the bench would measure itself rather than the hub."""
    async def main() -> dict[str, Any]:
        probes = Probes(BoardAddress.parse(url), size, ATTACKER_ADDRESS)
        stop = asyncio.Event()
        chosen = {"idle": lambda: probes.connections("idle", size.idle, stop),
                  "slowloris": lambda: probes.connections("slowloris", size.slowloris, stop),
                  "registration_flood": lambda: probes.registrations(stop),
                  "sse_viewers": lambda: probes.viewers(stop), "unsigned_body_flood": lambda: probes.bodies(stop)}
        tasks = [asyncio.create_task(chosen[name]()) for name in size.probes]
        started.set()
        await asyncio.to_thread(stop_at.wait)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        probes.close()
        return probes.seen
    out.put(asyncio.run(main()))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 2)


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
            "lease_ms_p99": _pct(lease_ms, 0.99), "hub_peak_rss_mb": round(rss.peak / 2**20, 1)}


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
        attacker = mp.Process(target=_attack, args=(url, size, started, attack_stop, seen), daemon=True)
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
