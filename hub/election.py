"""Which of several hubs on one PostgreSQL database is active: an advisory lock plus a fencing token.

Why both. The *advisory lock* (``pg_try_advisory_lock`` on a connection kept for nothing else) elects:
PostgreSQL releases it the moment the holder's session ends (a ``kill -9`` closes the socket, a
restarted server forgets it), so a standby takes over without waiting out a lease. But a lock alone
cannot stop a hub that *believes* it still holds it (its session died during a partition, it has
not noticed yet) from committing on its other connections. So the winner also bumps a *fencing
token* in the one-row table ``panal_active``, and every write transaction the store commits first
runs :meth:`Election.fence`: ``SELECT token ... FOR SHARE`` must still be this hub's token.

That makes acknowledgement linearisable with takeover: the new hub's bump (``UPDATE``) waits for the
share locks of commits in flight, so each stale commit lands *before* the bump (and the new hub,
which loads its state only after the bump, sees it), and every stale transaction after the bump
fails and rolls back. A hub acknowledges only what it committed, so a stale hub acknowledges
nothing from the moment a standby takes over, and nothing at all while it cannot reach the database.
A watchdog on the lock connection notices the loss within ``check_interval_s`` for what is not a
write (the HTTP layer then answers 503 to everything, :mod:`hub.standby`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from security.errors import Unavailable

__all__ = ["LOCK_KEY", "ActiveHub", "Election", "Fenced", "db_errors", "read_active"]

log = logging.getLogger(__name__)

#: the advisory lock every hub of one database competes for ("panal" in ASCII)
LOCK_KEY = 0x70616E616C
SCHEMA = """
CREATE TABLE IF NOT EXISTS panal_active (
    id     integer PRIMARY KEY CHECK (id = 1),
    token  bigint NOT NULL,            -- the fencing token: +1 at each takeover
    hub    text NOT NULL,              -- the active hub's name (hub_id)
    url    text NOT NULL,              -- its join URL, for standbys to point clients at
    since  double precision NOT NULL,  -- when it took over (unix time, its clock)
    seen   double precision NOT NULL   -- its watchdog's last write (unix time, its clock)
)"""


def _asyncpg() -> Any:
    """asyncpg, imported when a hub shares a PostgreSQL store (the optional ``postgres`` extra)."""
    import asyncpg
    return asyncpg


def db_errors() -> tuple[type[BaseException], ...]:
    """What a lost or unreachable database raises."""
    pg = _asyncpg()
    return OSError, TimeoutError, pg.PostgresError, pg.InterfaceError


class Fenced(Unavailable):
    """This hub is not (or no longer) the active one: nothing may be committed or acknowledged."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="not_active")


@dataclass(frozen=True)
class ActiveHub:
    """The ``panal_active`` row: who is active, since when, and when its watchdog last wrote."""

    hub: str
    url: str
    token: int
    since: float
    seen: float


async def read_active(conn: Any) -> ActiveHub | None:
    """The active hub as the database records it (None before any hub took over). Reads only: it works
    on a read-only replica, and a standby polling it takes no catalog lock."""
    if not await conn.fetchval("SELECT to_regclass('panal_active') IS NOT NULL"):
        return None
    row = await conn.fetchrow("SELECT hub, url, token, since, seen FROM panal_active WHERE id = 1")
    if row is None:
        return None
    return ActiveHub(row["hub"], row["url"], int(row["token"]), float(row["since"]), float(row["seen"]))


class Election:
    """One hub's candidacy: :meth:`campaign` returns once it is active; :attr:`lost` is set when it is not."""

    def __init__(self, dsn: str, hub_id: str, url: str, *, check_interval_s: float = 1.0,
                 timeout_s: float = 3.0, clock: Callable[[], float] = time.time) -> None:
        self.dsn, self.hub_id, self.url = dsn, hub_id, url
        self.check_interval_s, self.timeout_s, self.clock = check_interval_s, timeout_s, clock
        self.token: int | None = None
        self.since: float | None = None
        self.lost = asyncio.Event()
        self.last_known: ActiveHub | None = None   # what a standby last read: the active hub, for 503s
        self._conn: Any = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self.token is not None and not self.lost.is_set()

    async def campaign(self, poll_s: float = 0.5) -> int:
        """Wait until this hub holds the lock, bump the fencing token and return it. While waiting, a
        database that cannot be reached is retried; :attr:`last_known` follows the active hub."""
        while True:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await _asyncpg().connect(self.dsn, timeout=self.timeout_s,
                                                          server_settings=self._session_settings())
                    await self._conn.execute(SCHEMA)
                if await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
                    return await self._take_over()
                self.last_known = await read_active(self._conn)
            except db_errors() as exc:
                log.warning("standby: database unreachable (%s); retrying", exc)
                await self._drop()
            await asyncio.sleep(poll_s)

    def _idle_ms(self) -> int:
        return int(1000 * (max(3 * self.check_interval_s, self.timeout_s) + 1.0))

    def _session_settings(self) -> dict[str, str]:
        """The lock session ends on the server's side when this hub goes quiet (frozen, or cut off while
        the server still sees the socket open): PostgreSQL >= 14 closes a session idle this long, which
        releases the lock, so a standby is not kept waiting for TCP to give up. The watchdog (or a standby's
        poll) speaks every ``check_interval_s``, well within it."""
        return {"idle_session_timeout": str(self._idle_ms()), "application_name": f"panal hub {self.hub_id}"[:63]}

    def store_settings(self) -> dict[str, str]:
        """For the store's connections: a transaction left idle as long as the lock session may be is ended by the
        server. A hub frozen between a commit's :meth:`fence` and its COMMIT holds a share lock on the token row,
        and a standby's takeover (which bumps the token) would wait on it until the frozen hub thawed: for ever.
        A hub idle that long inside its own transaction has lost its lock session anyway."""
        return {"idle_in_transaction_session_timeout": str(self._idle_ms())}

    async def _take_over(self) -> int:
        now = self.clock()
        token = await self._conn.fetchval(
            "INSERT INTO panal_active AS a (id, token, hub, url, since, seen) VALUES (1, 1, $1, $2, $3, $3) "
            "ON CONFLICT (id) DO UPDATE SET token = a.token + 1, hub = $1, url = $2, since = $3, seen = $3 "
            "RETURNING token", self.hub_id, self.url, now)
        self.token, self.since = int(token), now
        self.last_known = ActiveHub(self.hub_id, self.url, self.token, now, now)
        self._conn.add_termination_listener(lambda _conn: self._lose("the lock connection closed"))
        self._watch = asyncio.create_task(self._watchdog(), name="election watchdog")
        log.warning("this hub (%s) is now ACTIVE with fencing token %d", self.hub_id, self.token)
        return self.token

    async def _watchdog(self) -> None:
        """Prove the lock session lives and the token is still ours; lose at the first doubt."""
        while not self.lost.is_set():
            await asyncio.sleep(self.check_interval_s)
            try:
                token = await asyncio.wait_for(self._conn.fetchval(
                    "UPDATE panal_active SET seen = $2 WHERE id = 1 AND token = $1 RETURNING token",
                    self.token, self.clock()), self.timeout_s)
            except Exception as exc:   # any doubt (a dead socket, a confused connection) is a loss
                self._lose(f"the database did not answer the watchdog ({exc or type(exc).__name__})")
                return
            if token is None:
                self._lose("another hub took over (the fencing token moved on)")
                return

    def _lose(self, why: str) -> None:
        if not self.lost.is_set():
            log.error("this hub (%s) is no longer active: %s", self.hub_id, why)
            self.lost.set()

    async def fence(self, conn: Any) -> None:
        """Run inside every write transaction, before its commit: raise :class:`Fenced` (and so roll the
        transaction back) unless this hub is active and the stored token is still its own. The share lock
        it takes holds a takeover's bump until this transaction ends."""
        if not self.active:
            raise Fenced("this hub is not the active hub")
        token = await conn.fetchval("SELECT token FROM panal_active WHERE id = 1 FOR SHARE")
        if token != self.token:
            self._lose("another hub took over (seen by a commit)")
            raise Fenced("this hub is no longer the active hub (fenced: another hub took over)")

    async def resign(self) -> None:
        """Step down: stop the watchdog and close the lock session (PostgreSQL releases the lock)."""
        self._lose("resigned")
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch
        await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), self.timeout_s)
            if not conn.is_closed():
                conn.terminate()
