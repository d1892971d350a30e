"""Connection hygiene: time limits and caps below HTTP, so a stranger's idle or slow sockets cost little.

aiohttp's server has one knob here (``keepalive_timeout``): nothing bounds how long a request head may
take, nothing caps connections per address, and with ``ssl=`` handed to ``loop.create_server`` a plain
HTTP request on the TLS port is dropped without a word. So the board listens with its own protocol
factory (:class:`ConnectionGuard`), one :class:`GuardedConnection` per socket, in front of aiohttp's
``RequestHandler``:

- **caps**: a connection over ``max_connections`` (all together) or ``max_connections_per_address`` is
  closed at accept, before any TLS work (the per-address cap is off on a hub bound to loopback only,
  where every caller has the same address);
- **TLS done here**: the first byte tells a TLS ClientHello (0x16) from plain HTTP; plain HTTP gets a
  400 that says "this port speaks HTTPS"; TLS goes to asyncio's ``SSLProtocol``, fed by this guard, with
  ``head_timeout_s`` for the handshake;
- **time limits**: while no request is in progress, a connection must send its next request's first
  byte within ``idle_timeout_s`` (new and kept-alive connections alike), and once a byte arrived, the
  handshake and the whole request head within ``head_timeout_s`` (a new TLS connection's first byte is
  its ClientHello: it must have asked within ``head_timeout_s``); else it is closed. A request in
  progress (a long-poll, an SSE stream, a big download) is never cut by these timers; its body has
  ``body_timeout_s`` (hub/http.py ``read_raw``).

Long-polls and event streams are counted by :class:`StreamCaps` and refused over their caps with a 503
and ``Retry-After``.

Two private names of aiohttp's ``RequestHandler`` are read: ``_request_in_progress`` (from the handler's
start until the response is written: a busy connection) and ``_request_count`` (heads parsed: a head
arrived in time). The tests pin both: a long-poll outlives the idle limit, honest keep-alive requests
are not cut at the head limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from asyncio.sslproto import SSLProtocol
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

from hub.config import LOOPBACK_BINDS, HubConfig
from hub.http import Handler
from security.errors import Unavailable

__all__ = ["ConnectionGuard", "ConnectionLimits", "GuardedSite", "LeanSSLProtocol", "StreamCaps"]

log = logging.getLogger(__name__)
_TLS_HANDSHAKE = 0x16   # the first byte of a TLS record carrying a ClientHello
_PLAIN_HTTP_REPLY = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


class LeanSSLProtocol(SSLProtocol):
    """asyncio's ``SSLProtocol`` taking bytes in through one buffer per thread, not one per connection.

    asyncio gives every TLS connection a zero-filled 256 KiB ``bytearray`` for the bytes it receives, resident
    for the connection's whole life: times 10,000 long-polling agents, 2.5 GB of a hub's memory for buffers that
    are idle between requests. The buffer is only a landing area: whoever feeds the protocol fills it
    (``get_buffer``: :func:`_feed` here, a socket's ``recv_into`` in an asyncio transport) and ``buffer_updated``
    at once copies the bytes into the connection's own ``MemoryBIO`` before anything else runs, so the
    connections of one event loop (one thread) can share one, of the same size: no more steps per byte."""

    _landing = threading.local()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        landing = self._landing
        if not hasattr(landing, "buffer"):
            landing.buffer = bytearray(self.max_size)
            landing.view = memoryview(landing.buffer)
        self._ssl_buffer, self._ssl_buffer_view = landing.buffer, landing.view


@dataclass(frozen=True)
class ConnectionLimits:
    head_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    max_connections: int = 4096
    max_connections_per_address: int = 64      # 0: no per-address cap

    @classmethod
    def from_config(cls, config: HubConfig) -> ConnectionLimits:
        per_address = 0 if config.bind in LOOPBACK_BINDS else config.max_connections_per_address
        return cls(config.head_timeout_s, config.idle_timeout_s, config.max_connections, per_address)


class ConnectionGuard:
    """The listening socket's protocol factory: counts connections and makes a guarded one per socket."""

    def __init__(self, limits: ConnectionLimits, handler_factory: Callable[[], asyncio.Protocol],
                 ssl_context: ssl.SSLContext | None) -> None:
        self.limits = limits
        self.handler_factory = handler_factory
        self.ssl_context = ssl_context
        self.per_address: Counter[str] = Counter()
        self.open: set[GuardedConnection] = set()
        self.refused = 0          # connections closed at accept (over a cap), since start
        self.timed_out = 0        # connections closed by the idle or head time limit, since start

    def __call__(self) -> GuardedConnection:
        return GuardedConnection(self)

    def close_all(self) -> None:
        """Close what aiohttp does not know about yet (handshakes, first bytes) on shutdown."""
        for conn in list(self.open):
            if not conn.handed_over and conn.transport is not None:
                conn.transport.abort()


class GuardedConnection(asyncio.Protocol):
    """One socket: caps at accept, TLS sniffing and handshake, then bytes to aiohttp's handler."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.address = "?"
        self.counted = False
        self.handler: Any = None                  # aiohttp's RequestHandler
        self.inner: asyncio.BaseProtocol | None = None   # what bytes go to: the handler or SSLProtocol
        self.handed_over = False                  # the handler's connection_made ran (aiohttp tracks it)
        self.idle_since = self.loop.time()
        self.head_started: float | None = None    # first byte since idle_since
        self.heads_seen = 0                       # request heads the handler has parsed
        self.timer: asyncio.TimerHandle | None = None

    # -- accept ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's socket transport, or uvloop's (PANAL_EVENT_LOOP=uvloop: the same methods, not a subclass)
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        guard, limits = self.guard, self.guard.limits
        per_address_full = (limits.max_connections_per_address
                            and guard.per_address[self.address] >= limits.max_connections_per_address)
        if len(guard.open) >= limits.max_connections or per_address_full:
            guard.refused += 1
            log.debug("refused a connection from %s: %s", self.address,
                      "per-address cap" if per_address_full else "connection cap")
            transport.abort()
            return
        guard.open.add(self)
        guard.per_address[self.address] += 1
        self.counted = True
        self.handler = guard.handler_factory()
        if guard.ssl_context is None:
            self._hand_over(self.handler, transport)
        self._arm(limits.idle_timeout_s)

    def _hand_over(self, protocol: asyncio.BaseProtocol, transport: asyncio.BaseTransport) -> None:
        self.inner = protocol
        protocol.connection_made(transport)
        self.handed_over = True

    # -- bytes -------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.head_started is None and not self._busy():
            self.head_started = self.loop.time()
            self._arm(self.guard.limits.head_timeout_s)
        if self.inner is None and not self._start_tls(data):
            return
        inner = self.inner
        if isinstance(inner, asyncio.BufferedProtocol):
            _feed(inner, data)
        elif isinstance(inner, asyncio.Protocol):
            inner.data_received(data)
        heads = getattr(self.handler, "_request_count", 0)
        if heads != self.heads_seen:   # a whole request head arrived: the head limit is met
            self.heads_seen = heads
            self.idle_since, self.head_started = self.loop.time(), None

    def _start_tls(self, first: bytes) -> bool:
        """Plain HTTP on the TLS port: a clear 400, then close. TLS: an SSLProtocol in front of aiohttp."""
        assert self.transport is not None and self.guard.ssl_context is not None
        if first[0] != _TLS_HANDSHAKE:
            text = (b"This port speaks HTTPS only: use the hub's https:// join URL "
                    b"(`panal hub url` prints it).\n")
            self.transport.write(_PLAIN_HTTP_REPLY % (len(text), text))
            self.transport.close()
            return False
        waiter = self.loop.create_future()   # a failed handshake's error lands here: read, never raised
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        tls = LeanSSLProtocol(self.loop, self.handler, self.guard.ssl_context, waiter, server_side=True,
                          ssl_handshake_timeout=self.guard.limits.head_timeout_s)
        self.inner = tls
        tls.connection_made(self.transport)
        self.handed_over = True
        return True

    def eof_received(self) -> bool | None:
        if isinstance(self.inner, asyncio.Protocol | asyncio.BufferedProtocol):
            return self.inner.eof_received()
        return None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.counted:
            self.counted = False
            self.guard.open.discard(self)
            self.guard.per_address[self.address] -= 1
            if self.guard.per_address[self.address] <= 0:
                del self.guard.per_address[self.address]
        if self.inner is not None:
            self.inner.connection_lost(exc)

    # -- time limits -------------------------------------------------------------------------------
    def _busy(self) -> bool:
        return bool(getattr(self.handler, "_request_in_progress", False))

    def _arm(self, delay_s: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(delay_s, self._check)

    def _check(self) -> None:
        self.timer = None
        limits, now = self.guard.limits, self.loop.time()
        if self._busy():   # a request is being handled or answered: never cut; idle counts from its end
            self.idle_since, self.head_started = now, None
            self._arm(min(limits.head_timeout_s, limits.idle_timeout_s))
            return
        deadline = (self.head_started + limits.head_timeout_s if self.head_started is not None
                    else self.idle_since + limits.idle_timeout_s)
        if now < deadline:
            self.timer = self.loop.call_at(deadline, self._check)
            return
        self.guard.timed_out += 1
        log.debug("closing a connection from %s: %s", self.address,
                  "request head too slow" if self.head_started is not None else "idle")
        if self.transport is not None:
            self.transport.abort()


def _feed(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """Hand ``data`` to a buffered protocol (SSLProtocol) the way a transport would."""
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


class GuardedSite(web.TCPSite):
    """A TCPSite listening through a :class:`ConnectionGuard` (which also does the TLS)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: ConnectionLimits,
                 ssl_context: ssl.SSLContext | None, backlog: int = 1024) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, backlog=backlog, reuse_address=True)
        self.limits = limits
        self.guard: ConnectionGuard | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(self.limits, server, self._ssl_context)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.guard, self._host, self._port, backlog=self._backlog,
                                                reuse_address=self._reuse_address)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port

    async def stop(self) -> None:
        await super().stop()
        if self.guard is not None:
            self.guard.close_all()


class StreamCaps:
    """Counts long-polls (lease, job wait) and event streams in progress; one over its cap is a 503 with
    ``Retry-After``. Long-polls are counted only once their caller is authenticated (hub/app.py), so a
    stranger's slow unsigned body cannot fill the slots honest agents wait in."""

    def __init__(self, max_long_polls: int, max_streams: int) -> None:
        self.caps = {"long_poll": max_long_polls, "stream": max_streams}
        self.counts = {"long_poll": 0, "stream": 0}

    @contextlib.contextmanager
    def hold(self, kind: str) -> Iterator[None]:
        if self.counts[kind] >= self.caps[kind]:
            what = "long-polls" if kind == "long_poll" else "event streams"
            raise _Busy(f"the board has {self.counts[kind]} {what} open, its limit; retry shortly",
                        code=f"too_many_{kind}s")
        self.counts[kind] += 1
        try:
            yield
        finally:
            self.counts[kind] -= 1

    def room(self, kind: str) -> bool:
        """Whether one more of ``kind`` would be let in now (a submit that may wait asks before it waits:
        its job is committed already, so it answers at once rather than with a 503)."""
        return self.counts[kind] < self.caps[kind]

    def middleware(self) -> Any:
        """Event streams (``GET /v1/events``, public) are counted here, around the handler."""
        @web.middleware
        async def count_streams(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.method != "GET" or request.path != "/v1/events":
                return await handler(request)
            with self.hold("stream"):
                return await handler(request)
        return count_streams


class _Busy(Unavailable):
    retry_after_s = 5.0

