"""The attackers of ``panal bench abuse`` (:mod:`agent.tools.bench_abuse`): what a stranger without a key the hub
knows can throw at it, and what each attack saw.

A registration flood of fresh keys, idle TLS connections, slowloris connections (a request head sent one header
every few seconds), live status viewers (SSE) and a flood of unsigned 4 MB msgpack bodies, all from one source
address. They run in a process of their own (:func:`attack`): their CPU (key generation, TLS handshakes) must not
slow the honest agents' event loop, or the bench would measure itself rather than the hub. Each probe reports
what it observed (refused, closed by the hub, still open, status codes); judging is the report reader's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import Counter
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from agent.tools.hub_probe import pct
from jobs.protocol_registration import Registration
from jobs.requirements import Capabilities
from jobs.wire import MSGPACK, encode_body
from security.httpsig import sign_request
from security.identity import Identity
from security.tls import BoardAddress

if TYPE_CHECKING:
    from agent.tools.bench_abuse import AbuseSize

__all__ = ["Probes", "attack"]


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
                                            "reply_ms_p50": pct(reply_ms, 0.5)}

    def close(self) -> None:
        for writers in self.conns.values():
            for writer in writers:
                writer.close()


def attack(url: str, size: AbuseSize, source: str, started: Any, stop_at: Any, out: Any) -> None:
    """The attack, in its own process: its CPU (key generation, TLS handshakes) must not slow the honest
    agents' own event loop, or the bench would measure itself rather than the hub."""
    async def main() -> dict[str, Any]:
        probes = Probes(BoardAddress.parse(url), size, source)
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
