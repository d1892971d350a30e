"""Group commit over asyncpg: the PostgreSQL store's writer connection and its reader pool.

Writes go through one connection owned by a writer task: the writes queued while a COMMIT is in
flight are committed together in the next transaction (one WAL flush for many requests), as the
SQLite store does with its writer thread. A batch first runs without savepoints (the common case:
nothing fails); if one write fails, the batch is rolled back and run again with each write in its
own savepoint, so one bad write cannot undo its neighbours. A lone write that is one statement runs
without BEGIN/COMMIT round trips (PostgreSQL commits a single statement atomically). A caller's future
resolves only after COMMIT returned: that is the moment a board may acknowledge.

One writer keeps commits in the order writes were queued (a later write to a row never lands before
an earlier one). Reads use a small pool of other connections, so a long read never holds up a commit;
every read sees every write acknowledged before it started. A connection the server dropped (a restart)
fails the writes in flight and is replaced on the next batch; a read retries once on a fresh connection.

``guard``, when set, runs first in every write transaction: a hub that must prove it still holds its
place (an active/standby lease with a fencing token) raises there, and nothing of the batch commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
from asyncpg.exceptions import PostgresConnectionError
from asyncpg.pool import PoolConnectionProxy

from hub.pg_schema import describe_url
from security.errors import Unavailable

__all__ = ["Conn", "PgConnections", "Reader"]

log = logging.getLogger(__name__)
T = TypeVar("T")
Conn = asyncpg.Connection
Reader = PoolConnectionProxy
Op = Callable[[Conn], Awaitable[Any]]
#: errors that mean the connection is gone, not that the statement was wrong
DROPPED = (PostgresConnectionError, asyncpg.InterfaceError, OSError)

_STOP = object()
#: how long :meth:`PgConnections.close` waits for queued writes and a clean goodbye before cutting the line
CLOSE_S = 10.0


class PgConnections:
    """The writer (group commit) and the readers of one database URL."""

    def __init__(self, url: str, readers: int = 4) -> None:
        self.url = url
        self.readers = readers
        self.commits = 0
        self.guard: Callable[[Conn], Awaitable[None]] | None = None
        #: PostgreSQL settings for every connection (a hub of several: :meth:`hub.election.Election.store_settings`)
        self.server_settings: dict[str, str] = {}
        self._conn: Conn | None = None
        self._pool: asyncpg.Pool | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._inflight: list[tuple[Op, asyncio.Future[Any], bool]] = []

    async def connect(self) -> Conn:
        """A new connection; a clear :class:`Unavailable` (naming no password) if there is none to be had."""
        try:
            return await asyncpg.connect(self.url, server_settings=self.server_settings or None)
        except (*DROPPED, asyncpg.PostgresError, TimeoutError) as exc:
            raise Unavailable(f"store: cannot reach PostgreSQL at {describe_url(self.url)}: "
                              f"{type(exc).__name__}: {exc}") from None

    async def open(self, prepare: Callable[[Conn], Awaitable[None]]) -> None:
        """Connect, run ``prepare`` (the migrations) on the writer connection, start the writer."""
        self._queue = asyncio.Queue()
        self._conn = await self.connect()
        try:
            await prepare(self._conn)
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.readers,
                                                   server_settings=self.server_settings or None)
        except BaseException:
            await self._conn.close()
            raise
        self._writer = asyncio.create_task(self._write_loop(), name="panal-pg-store")

    async def close(self, timeout_s: float = CLOSE_S) -> None:
        """Finish the writes already queued, then disconnect, within ``timeout_s``: a server that stopped
        answering without a reset (a partition) must not keep a stopping hub from exiting (a fenced hub
        exits for its supervisor). Past it the connections are cut and the writes still waiting fail with
        :class:`Unavailable`: none of them was acknowledged, so nothing acknowledged is lost."""
        cut = False
        if self._writer is not None:
            self._queue.put_nowait(_STOP)
            done, _ = await asyncio.wait({self._writer}, timeout=timeout_s)
            if not done:
                cut = True
                log.warning("store: PostgreSQL at %s did not answer for %.0f s while closing: cutting the "
                            "connection", describe_url(self.url), timeout_s)
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._writer
                self._fail_unfinished()
            self._writer = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                if cut:
                    raise TimeoutError
                await asyncio.wait_for(pool.close(), timeout_s)
            except (TimeoutError, *DROPPED):
                pool.terminate()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            if cut:
                conn.terminate()
            else:
                try:
                    await conn.close(timeout=timeout_s)
                except (TimeoutError, *DROPPED):
                    conn.terminate()

    def _fail_unfinished(self) -> None:
        """The batch in flight and every queued write, once the writer is gone: failed, never acknowledged."""
        waiting = list(self._inflight)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not _STOP:
                waiting.append(item)
        self._inflight = []
        for _, fut, _ in waiting:
            if not fut.done():
                fut.set_exception(Unavailable(f"store: closed before this write was committed "
                                              f"(PostgreSQL at {describe_url(self.url)} stopped answering)"))

    async def write(self, fn: Callable[[Conn], Awaitable[T]], *, one_statement: bool = False) -> T:
        """Queue a write; return its result once it is committed. ``one_statement``: ``fn`` runs exactly
        one statement (an ``executemany`` counts: asyncpg makes it atomic), so alone it needs no BEGIN."""
        return await self.queue(fn, one_statement=one_statement)

    def queue(self, fn: Callable[[Conn], Awaitable[T]], *, one_statement: bool = False) -> asyncio.Future[T]:
        """:meth:`write`, queued now (its place in the commit order is taken here, not when awaited)."""
        if self._writer is None:
            raise RuntimeError("store is not open")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((fn, fut, one_statement))
        return fut

    async def read(self, fn: Callable[[Reader], Awaitable[T]]) -> T:
        """Run ``fn`` on a pooled connection; once more on a fresh one if the server dropped the first."""
        if self._pool is None:
            raise RuntimeError("store is not open")
        try:
            async with self._pool.acquire() as conn:
                return await fn(conn)
        except DROPPED:
            pass
        try:
            async with self._pool.acquire() as conn:
                return await fn(conn)
        except DROPPED as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: BaseException) -> Unavailable:
        """What a caller gets when the server is gone: 503, retry later (not a 500)."""
        return Unavailable(f"store: lost PostgreSQL at {describe_url(self.url)}: {type(exc).__name__}")

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            stop = any(item is _STOP for item in batch)
            await self._run_batch([item for item in batch if item is not _STOP])
            if stop:
                return

    async def _run_batch(self, batch: list[tuple[Op, asyncio.Future[Any], bool]]) -> None:
        if not batch:
            return
        self._inflight = batch   # failed by close() if the server never answers
        try:
            if self._conn is None or self._conn.is_closed():   # dropped by the server: a new one
                self._conn = await self.connect()
            outcomes = await self._commit(self._conn, batch, savepoints=False)
            if outcomes is None:   # one write failed: run them again, each in its own savepoint
                outcomes = await self._commit(self._conn, batch, savepoints=True)
            assert outcomes is not None
            self.commits += 1
        except Exception as exc:   # the connection, the guard or the COMMIT failed: nothing of it is written
            failure: Exception = exc
            if isinstance(exc, DROPPED):
                failure = self._unreachable(exc)
                log.warning("store commit failed: %s", failure.message)
            elif not isinstance(exc, Unavailable):
                log.exception("store commit failed")
            outcomes = [(False, failure)] * len(batch)
        self._inflight = []
        for (_, fut, _), (ok, value) in zip(batch, outcomes, strict=True):
            if not fut.done():
                fut.set_result(value) if ok else fut.set_exception(value)

    async def _commit(self, conn: Conn, batch: list[tuple[Op, asyncio.Future[Any], bool]],
                      savepoints: bool) -> list[tuple[bool, Any]] | None:
        """Run the batch in one transaction; None if a write failed and ``savepoints`` is off (rolled back).
        A dropped connection or a failing guard raises: the whole batch fails."""
        if len(batch) == 1 and batch[0][2] and self.guard is None:
            try:
                return [(True, await batch[0][0](conn))]
            except DROPPED:
                raise
            except asyncpg.PostgresError as exc:
                return [(False, exc)]
        outcomes: list[tuple[bool, Any]] = []
        if not savepoints or len(batch) == 1:
            try:
                async with conn.transaction():
                    if self.guard is not None:
                        await self.guard(conn)
                    outcomes = [(True, await fn(conn)) for fn, _, _ in batch]
            except DROPPED:
                raise
            except asyncpg.PostgresError as exc:
                if len(batch) > 1:
                    return None
                outcomes = [(False, exc)]
            return outcomes
        async with conn.transaction():
            if self.guard is not None:
                await self.guard(conn)
            for fn, _, _ in batch:
                try:
                    async with conn.transaction():   # a savepoint
                        outcomes.append((True, await fn(conn)))
                except DROPPED:
                    raise
                except asyncpg.PostgresError as exc:
                    outcomes.append((False, exc))
        return outcomes
