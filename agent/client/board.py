"""A signed, pinned, retrying HTTP client for one board.

Every call is signed (RFC 9421) with a fresh nonce per attempt, goes over TLS pinned to the
board's certificate fingerprint (or plain HTTP to loopback), is retried by tenacity on connection
errors, 5xx and 429 (exponential backoff with full jitter, ``Retry-After`` honoured, capped total
time), and passes through the board's circuit breaker. Errors come back as :class:`PanalError`
leaves rebuilt from the board's error body, so callers and the CLI see the board's own message.
:meth:`BoardClient.post` speaks the agent protocol (:mod:`jobs.protocol` and its ``protocol_*`` siblings): a
typed record out, the reply decoded into its typed record here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_delay

from agent.client.breaker import Breaker
from jobs.wire import MSGPACK, decode_body, encode_body
from security.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PanalError,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
)
from security.httpsig import sign_request
from security.identity import Identity
from security.tls import BoardAddress

__all__ = ["BoardClient", "Encodes", "HealthListener", "error_from_response"]

R = TypeVar("R")

log = logging.getLogger(__name__)
_BY_STATUS: dict[int, type[PanalError]] = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                                          409: Conflict, 413: PayloadTooLarge}
#: Told the outcome of every call that reached the breaker: True when the board answered (even with an
#: error), False when it could not be reached. LAN mode keeps its peer table's liveness with it.
HealthListener = Callable[[bool], None]


class Encodes(Protocol):
    """A request record of the agent protocol (:mod:`jobs.protocol`, ``jobs.protocol_*``)."""

    def encode(self) -> dict[str, Any]: ...


class RetryLater(Unavailable):
    """A 5xx/429 or a connection failure: worth another attempt, after ``retry_after_s`` if given."""

    def __init__(self, message: str, retry_after_s: float | None = None, active_hub: str | None = None) -> None:
        super().__init__(message, code="unavailable")
        self.retry_after_s = retry_after_s
        self.active_hub = active_hub   # a standby's answer: the join URL of the active hub, as it knows


def error_from_response(status: int, body: Any) -> PanalError:
    message = body.get("message") if isinstance(body, dict) else None
    code = body.get("error") if isinstance(body, dict) else None
    cls = _BY_STATUS.get(status, Unavailable if status >= 500 else BadRequest)
    return cls(str(message or f"HTTP {status}"), code=str(code) if code else None,
               details=body.get("details") if isinstance(body, dict) else None)


def _backoff(exc: BaseException | None, attempts: int) -> float:
    """Full jitter exponential backoff after ``attempts`` failed attempts, unless the board said when to come back."""
    if isinstance(exc, RetryLater) and exc.retry_after_s is not None:
        return min(exc.retry_after_s, 30.0)
    return random.uniform(0, min(10.0, 0.1 * 2 ** attempts))


def _wait_after_first(state: RetryCallState) -> float:
    """tenacity's wait in :meth:`BoardClient.call`, whose first attempt ran before tenacity's loop."""
    return _backoff(state.outcome.exception() if state.outcome else None, state.attempt_number + 1)


class BoardClient:
    """Calls to one board as one identity. Use as an async context manager (owns its session)."""

    def __init__(self, address: BoardAddress, identity: Identity, *, insecure: bool = False,
                 retry_for_s: float = 30.0, breaker: Breaker | None = None, connections: int = 16,
                 on_health: HealthListener | None = None, local_address: str | None = None) -> None:
        """``local_address``: the source address to connect from (None: the system's choice); a bench
        gives each simulated agent its own, as real agents come from their own addresses."""
        address.check_transport(insecure)
        self.address = address
        #: every hub of the board (one active, the others standbys: hub/election.py); calls go to
        #: ``hubs[_at]`` and move on to the next when it cannot be reached or answers 5xx
        self.hubs = address.hubs()
        self._at = 0
        self.identity = identity
        self.retry_for_s = retry_for_s
        self.breaker = breaker or Breaker()
        self.on_health = on_health
        self._connections = connections
        self._local_addr = (local_address, 0) if local_address else None
        self._sessions: dict[int, aiohttp.ClientSession] = {}   # one per hub: each pins its own certificate

    async def __aenter__(self) -> BoardClient:
        self.session()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        """The base URL of the hub calls go to now (blob transfers use it with :meth:`session`)."""
        return self.hubs[self._at].url

    def session(self) -> aiohttp.ClientSession:
        """The session of the hub calls go to now (pinned to that hub's certificate)."""
        session = self._sessions.get(self._at)
        if session is None:
            hub = self.hubs[self._at]
            ssl_arg: aiohttp.Fingerprint | ssl.SSLContext | bool = True
            if hub.is_tls and hub.fingerprint:
                ssl_arg = aiohttp.Fingerprint(bytes.fromhex(hub.fingerprint))
            connector = aiohttp.TCPConnector(ssl=ssl_arg, limit=self._connections, local_addr=self._local_addr)
            # No cookie jar: every call is signed, a board has no use for cookies, and keeping them costs each
            # request a jar lookup and each reply a parse (~30 us a call on the one-task path).
            session = self._sessions[self._at] = aiohttp.ClientSession(hub.url, connector=connector,
                                                                        cookie_jar=aiohttp.DummyCookieJar())
        return session

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    def _move_on(self, exc: RetryLater) -> None:
        """After a failed attempt, aim the next one at the hub the board said is active (only one of those
        pinned in our address: a standby cannot point us anywhere new), else at the next hub in turn."""
        if len(self.hubs) < 2:
            return
        named = exc.active_hub
        if named:
            with contextlib.suppress(BadRequest):
                active = BoardAddress.parse(named)
                for i, hub in enumerate(self.hubs):
                    if (hub.url, hub.fingerprint) == (active.url, active.fingerprint) and i != self._at:
                        self._at = i
                        return
        self._at = (self._at + 1) % len(self.hubs)
        log.info("board %s: trying hub %s", self.address.url, self.base_url)

    async def call(self, method: str, path: str, body: Any = None, *, query: str = "",
                   timeout_s: float = 30.0, retry: bool = True, headers: dict[str, str] | None = None,
                   max_reply_bytes: int | None = None) -> Any:
        """One logical call: retried while transient, refused at once while the breaker is open.
        ``max_reply_bytes``: read no more of the reply than this (a reply whose size only the board bounds,
        e.g. a job's envelope: a lying board's endless body must not fill this agent's memory)."""
        if not self.breaker.allow():
            raise Unavailable(f"{self.address.url} is failing; circuit breaker open for another "
                              f"{self.breaker.retry_in():.0f} s", code="breaker_open")
        try:
            started = time.monotonic()
            try:   # the first attempt without tenacity's machinery (set up per call: most calls need one try)
                result = await self._attempt_here(method, path, body, query, timeout_s, headers, max_reply_bytes)
            except RetryLater as first:
                if not retry or time.monotonic() - started >= self.retry_for_s:
                    raise
                await asyncio.sleep(_backoff(first, 1))
                result = None
                left = max(0.0, self.retry_for_s - (time.monotonic() - started))
                async for attempt in AsyncRetrying(retry=retry_if_exception(lambda e: isinstance(e, RetryLater)),
                                                   wait=_wait_after_first, stop=stop_after_delay(left),
                                                   reraise=True):
                    with attempt:
                        result = await self._attempt_here(method, path, body, query, timeout_s, headers,
                                                          max_reply_bytes)
        except RetryLater:
            self._heard(answered=False)
            raise
        except PanalError:
            self._heard(answered=True)  # the board answered: it is alive, the request was wrong
            raise
        self._heard(answered=True)
        return result

    async def post(self, path: str, body: Encodes, reply: Callable[[Any], R], *, timeout_s: float = 30.0,
                   retry: bool = True, headers: dict[str, str] | None = None) -> R:
        """``POST`` a protocol record; its reply decoded by ``reply`` (a record's ``decode``). A reply of the
        wrong shape is the board's fault, not ours: :class:`Unavailable` (code ``malformed_reply``)."""
        value = await self.call("POST", path, body.encode(), timeout_s=timeout_s, retry=retry, headers=headers)
        try:
            return reply(value)
        except BadRequest as exc:
            raise Unavailable(f"board {self.address.url} sent a malformed reply to {path}: {exc.message}",
                              code="malformed_reply") from exc

    def _heard(self, *, answered: bool) -> None:
        if answered:
            self.breaker.success()
        else:
            self.breaker.failure()
        if self.on_health is not None:
            self.on_health(answered)

    async def _attempt_here(self, method: str, path: str, body: Any, query: str, timeout_s: float,
                            extra_headers: dict[str, str] | None, max_reply_bytes: int | None = None) -> Any:
        try:
            return await self._attempt(method, path, body, query, timeout_s, extra_headers, max_reply_bytes)
        except RetryLater as exc:
            self._move_on(exc)
            raise

    async def _attempt(self, method: str, path: str, body: Any, query: str, timeout_s: float,
                       extra_headers: dict[str, str] | None = None, max_reply_bytes: int | None = None) -> Any:
        here = self.base_url
        data = encode_body(body) if body is not None else b""
        headers = {**(extra_headers or {}), **sign_request(self.identity, method, path, query, data)}
        headers["Content-Type"] = MSGPACK
        headers["Accept"] = MSGPACK
        url = path + (f"?{query}" if query else "")
        try:
            async with self.session().request(method, url, data=data, headers=headers,
                                              timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                if max_reply_bytes is None:
                    raw = await resp.read()
                else:
                    raw = await _read_at_most(resp, max_reply_bytes, here, path)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except aiohttp.ServerFingerprintMismatch as exc:
            raise Unauthorized(f"{here}: the board's TLS certificate does not match the pinned "
                               "fingerprint (a different server, or the hub was re-initialised: get a new "
                               "join URL)", code="fingerprint_mismatch") from exc
        except aiohttp.ClientSSLError as exc:
            raise Unauthorized(f"{here}: TLS failed: {exc}", code="tls_error") from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise RetryLater(f"cannot reach board {here}: {exc or type(exc).__name__}") from exc
        try:
            value = decode_body(raw, resp.content_type or MSGPACK)
        except BadRequest as exc:
            if status == 400 and resp.content_type == "text/plain":   # e.g. plain HTTP sent to a TLS port
                raise BadRequest(f"{here}: {raw[:300].decode(errors='replace').strip()}",
                                 code="wrong_protocol") from exc
            raise RetryLater(f"board {here} sent an unreadable reply (HTTP {status})") from exc
        if status >= 500 or status == 429:
            error = error_from_response(status, value)
            details = error.details if isinstance(error.details, dict) else {}
            active = details.get("active_hub")
            raise RetryLater(str(error), _retry_after(retry_after), active if isinstance(active, str) else None)
        if status >= 400:
            raise error_from_response(status, value)
        return value


async def _read_at_most(resp: aiohttp.ClientResponse, most: int, here: str, path: str) -> bytes:
    """The reply's body, refused once it is (or says it will be) over ``most`` bytes, decompressed bytes
    counted: the connection is dropped rather than read to its end."""
    def too_large(size: str) -> Unavailable:
        return Unavailable(f"board {here} sent a reply to {path} of {size}, over the {most} bytes this agent reads",
                           code="reply_too_large")
    if resp.content_length is not None and resp.content_length > most:
        raise too_large(f"{resp.content_length} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > most:
            raise too_large("more bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _retry_after(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        return None
