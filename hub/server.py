"""Running a board: store + board + HTTP(S) server, with a graceful drain on shutdown."""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from collections.abc import Iterable
from pathlib import Path

from aiohttp import web

from hub.app import AUTH_KEY, create_app
from hub.background import cancel_all, run_every, wait_drained
from hub.blob_backend import create_blob_backend
from hub.board import Board
from hub.config import HubConfig
from hub.connections import ConnectionLimits, GuardedSite
from hub.election import Election
from hub.standby import ActiveGate
from hub.stores import create_store
from security.errors import BadRequest
from security.identity import PublicKey

__all__ = ["BoardServer"]

log = logging.getLogger(__name__)


class BoardServer:
    """One board served on one port. ``start`` returns the bound port (config.port may be 0)."""

    def __init__(self, config: HubConfig, db_path: Path, ssl_context: ssl.SSLContext | None, *,
                 election: Election | None = None) -> None:
        """``election``: one of several hubs on one database (hub/election.py); ``start`` then serves 503s
        (hub/standby.py) and :meth:`activate` waits for this hub's turn before the board loads its state."""
        self.config = config
        self.blobs = create_blob_backend(config, db_path.parent)   # blobs_dir: one path all hubs mount
        store = create_store(config.store, db_path, synchronous=config.sqlite_synchronous)
        if election is not None:
            from hub.pg_store import PgStore  # (asyncpg: the postgres extra, needed only here)
            if not isinstance(store, PgStore):
                raise BadRequest("several hubs on one board need a shared store: store: postgresql://...")
            store.db.guard = election.fence   # every commit checks the fencing token in its own transaction
            store.db.server_settings = election.store_settings()   # ... and a frozen one's does not hold it for ever
        self.board = Board(store, config, blobs=self.blobs)
        self.app = create_app(self.board, config)
        self.election = election
        self.gate = ActiveGate(election, config.standby_retry_after_s) if election is not None else None
        if self.gate is not None:
            self.gate.install(self.app)
        self.ssl_context = ssl_context
        self.limits = ConnectionLimits.from_config(config)
        self.sites: list[GuardedSite] = []
        self._runner: web.AppRunner | None = None
        self._gc: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        # The store's writer thread must get the GIL promptly when a commit is queued; the default
        # 5 ms switch interval added up to 5 ms to every acknowledged write under load. Every board
        # (hub, `panal up`, LAN) acknowledges through that thread.
        sys.setswitchinterval(0.0005)
        if self.election is None:
            await self.board.start()
        # Connections go through hub/connections.py (caps, time limits, TLS); aiohttp's own keep-alive
        # timer agrees with the idle limit, and the unread rest of a refused body (a 408, a 413) is read
        # for at most 2 s, so its sender sees the answer, not a reset, without holding the connection.
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True,
                                     keepalive_timeout=self.config.idle_timeout_s, lingering_time=2.0)
        await self._runner.setup()
        site = GuardedSite(self._runner, self.config.bind, self.config.port, self.limits, self.ssl_context)
        await site.start()
        self.sites = [site]
        self.port = site.port
        if self.election is None:
            self._gc = run_every(self.config.blob_gc_interval_s, self.collect_garbage, "blob gc")
        return self.port

    async def activate(self, url: str) -> None:
        """With an election: wait until this hub is the active one (advertising ``url``, its join URL),
        then load the active state from the database and open the gate. Without one: nothing to wait for."""
        if self.election is None or self.gate is None:
            return
        self.election.url = url
        await self.election.campaign()
        await self.board.start()
        self._gc = run_every(self.config.blob_gc_interval_s, self.collect_garbage, "blob gc")
        await self.gate.open_gate()
        log.warning("active: the board loaded its state; acknowledging requests")

    async def listen_also(self, host: str) -> None:
        """Serve on one more address, on the bound port with the same TLS (LAN mode: every allowed
        address of the machine). ``stop`` closes it with the rest."""
        assert self._runner is not None, "listen_also before start"
        site = GuardedSite(self._runner, host, self.port, self.limits, self.ssl_context)
        await site.start()
        self.sites.append(site)

    async def collect_garbage(self) -> list[str]:
        """Delete blobs no job references (older than the grace period: uploads in flight stay)."""
        referenced = await self.board.store.referenced_blobs()
        deleted = await self.blobs.gc(referenced, self.config.blob_gc_grace_s)
        # uploads a job now names leave their uploader's quota; collected ones are forgotten
        await self.board.store.settle_blob_uploads(referenced, set(deleted))
        if deleted:
            log.info("blob gc: deleted %d unreferenced blob(s)", len(deleted))
        return deleted

    async def add_submitter(self, key: PublicKey, name: str) -> None:
        await self.board.store.add_submitter(key.id, key.text(), name)

    async def submitter_ids(self) -> set[str]:
        """The ids of every key allowed to submit here (from the store, not the cache)."""
        return {row[0] for row in await self.board.store.list_submitters()}

    async def remove_submitters(self, key_ids: Iterable[str]) -> None:
        """Stop accepting these keys' submissions, at once: the cache of submitters is refreshed."""
        removed = False
        for key_id in key_ids:
            await self.board.store.remove_submitter(key_id)
            removed = True
        if removed:  # the board caches its submitters and re-reads them only for unknown keys
            await self.app[AUTH_KEY].refresh_submitters(force=True)

    async def drain(self) -> bool:
        """Stop leasing and wait (up to drain_timeout_s) until no agent holds a lease; True if none does."""
        self.board.leasing = False
        return await wait_drained(lambda: any(a.running for a in self.board.agents.values()),
                                  self.config.drain_timeout_s)

    async def stop(self, drain: bool = True) -> None:
        """Stop leasing, give running leases time to finish (up to drain_timeout_s), then close."""
        self.board.leasing = False
        if self._gc is not None:
            await cancel_all([self._gc])
        if drain:
            await self.drain()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.election is None or self.gate is None or self.gate.ready:
            await self.board.stop()
        if self.election is not None:
            await self.election.resign()
