"""Several hubs on one PostgreSQL store: the settings that make one hub a candidate, and its status.

``store: postgresql://...`` makes every ``panal hub serve`` a candidate (hub/election.py): it
listens at once, answers 503 while it is a standby (hub/standby.py), and loads the board when it
takes over. ``peer_urls`` (the other hubs' join URLs) go into this hub's join URL as ``also=``, so
agents and the CLI know every hub, each pinned to its own certificate (security/tls.py).
:func:`database_status` is what ``panal hub status`` prints.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from hub.config import HubConfig
from hub.election import LOCK_KEY, Election, db_errors, read_active
from security.errors import BadRequest
from security.tls import BoardAddress

__all__ = ["database_status", "is_shared", "make_election", "with_peers"]

_SCHEMES = ("postgresql://", "postgres://")


def is_shared(config: HubConfig) -> bool:
    """Whether the store is one several hubs can share (PostgreSQL), so hubs elect an active one."""
    return config.store.startswith(_SCHEMES)


def make_election(config: HubConfig) -> Election | None:
    """This hub's candidacy, or None for a store only one hub uses (SQLite)."""
    if not is_shared(config):
        return None
    if config.peer_urls and not config.blobs_dir:
        # each hub would keep blobs in its own directory: what one acknowledged is missing after a failover
        raise BadRequest("hubs sharing one database (peer_urls) need blobs_dir: one directory every hub "
                         "mounts; without it each hub keeps its own blobs and a failover loses them",
                         code="blobs_not_shared")
    hub_id = config.hub_id or f"{config.host}:{config.port}"
    return Election(config.store, hub_id, "", check_interval_s=config.election_check_interval_s,
                    timeout_s=max(1.0, 3 * config.election_check_interval_s))


def with_peers(address: BoardAddress, config: HubConfig) -> BoardAddress:
    """This hub's address carrying the other hubs (``peer_urls``) as alternates."""
    others = tuple(hub for url in config.peer_urls for hub in BoardAddress.parse(url).hubs()
                   if hub.url != address.url)
    return dataclasses.replace(address, alternates=others)


async def database_status(dsn: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Who is active and since when, how fresh its watchdog is, and how the database answers from here."""
    import asyncpg  # the optional postgres extra; only a hub with a PostgreSQL store gets here
    started = time.monotonic()
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout_s)
    except db_errors() as exc:
        return {"database": "unreachable", "error": f"{type(exc).__name__}: {exc}"}
    try:
        round_trip = time.monotonic()
        await conn.fetchval("SELECT 1")
        rtt_ms = (time.monotonic() - round_trip) * 1000
        db_now = float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())"))
        in_recovery = bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
        active = await read_active(conn)
        holder = await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                                     "AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1", LOCK_KEY)
    finally:
        await conn.close()
    status: dict[str, Any] = {"database": "reachable", "connect_ms": round((round_trip - started) * 1000, 1),
                              "round_trip_ms": round(rtt_ms, 2), "read_only_replica": in_recovery,
                              "lock_held": bool(holder), "active": None}
    if active is not None:
        status["active"] = {"hub": active.hub, "url": active.url, "token": active.token, "since": active.since,
                            "watchdog_age_s": round(max(0.0, db_now - active.seen), 2)}
    return status
