"""hub/election.py on a real private PostgreSQL: one active hub, takeover, and fenced commits."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from pgserver import PgServer

from hub.election import Election, Fenced, read_active
from security.errors import Unavailable


async def _fenced_insert(election: Election, conn: asyncpg.Connection, value: str) -> None:
    async with conn.transaction():
        await election.fence(conn)
        await conn.execute("INSERT INTO acked VALUES ($1)", value)


async def test_one_hub_is_active_and_a_standby_takes_over_when_its_session_dies(own_pg: PgServer) -> None:
    first = Election(own_pg.url(), "hub-a", "https://a:1/", check_interval_s=0.1)
    second = Election(own_pg.url(), "hub-b", "https://b:1/", check_interval_s=0.1)
    assert await first.campaign(poll_s=0.05) == 1
    waiting = asyncio.create_task(second.campaign(poll_s=0.05))
    while second.last_known is None:   # the standby has looked at least once, and found hub-a active
        await asyncio.sleep(0.01)
    assert not waiting.done() and second.last_known.hub == "hub-a"
    first._conn.terminate()             # what kill -9 does to the lock session
    assert await waiting == 2
    assert first.lost.is_set() and not first.active and second.active
    conn = await asyncpg.connect(own_pg.url())
    with pytest.raises(Fenced):
        await first.fence(conn)
    active = await read_active(conn)
    assert active is not None and (active.hub, active.token) == ("hub-b", 2)
    await conn.close()
    await second.resign()


async def test_a_commit_in_flight_at_takeover_lands_before_it_and_later_stale_commits_fail(
        own_pg: PgServer) -> None:
    stale = Election(own_pg.url(), "hub-a", "https://a:1/", check_interval_s=30)   # it has not noticed yet
    fresh = Election(own_pg.url(), "hub-b", "https://b:1/")
    await stale.campaign()
    conn = await asyncpg.connect(own_pg.url())
    await conn.execute("CREATE TABLE acked (v text)")
    in_flight = conn.transaction()
    await in_flight.start()
    await stale.fence(conn)                 # the stale hub's commit has passed its fence ...
    # ... when it loses the lock without noticing (as after a partition): only the token can stop it now
    await stale._conn.execute("SELECT pg_advisory_unlock_all()")
    takeover = asyncio.create_task(fresh.campaign(poll_s=0.05))
    while fresh._conn is None or not await conn_holds_waiter(own_pg):
        await asyncio.sleep(0.02)
    assert not takeover.done()              # the bump waits for the share lock of the commit in flight
    await conn.execute("INSERT INTO acked VALUES ('before')")
    await in_flight.commit()
    assert await takeover == 2
    with pytest.raises(Fenced):
        await _fenced_insert(stale, conn, "after")
    assert [r["v"] for r in await conn.fetch("SELECT v FROM acked")] == ["before"]
    await conn.close()
    await fresh.resign()
    await stale.resign()


async def conn_holds_waiter(own_pg: PgServer) -> bool:
    """Whether some session waits on a lock (the takeover's UPDATE behind the share lock)."""
    probe = await asyncpg.connect(own_pg.url())
    try:
        return bool(await probe.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"))
    finally:
        await probe.close()


async def test_an_active_hub_cut_off_from_the_database_stops_and_the_other_takes_over(
        own_pg: PgServer) -> None:
    first = Election(own_pg.url(), "hub-a", "https://a:1/", check_interval_s=0.1, timeout_s=1.0)
    second = Election(own_pg.url(), "hub-b", "https://b:1/", check_interval_s=0.1, timeout_s=1.0)
    await first.campaign()
    own_pg.stop("immediate")                    # the partition: no hub reaches the database
    await first.lost.wait()                 # the active hub stops before anyone else can start
    assert not first.active
    own_pg.restart()
    assert await second.campaign(poll_s=0.05) == 2
    conn = await asyncpg.connect(own_pg.url())
    await conn.execute("CREATE TABLE acked (v text)")
    with pytest.raises(Fenced):
        await _fenced_insert(first, conn, "stale")
    await _fenced_insert(second, conn, "fresh")
    assert [r["v"] for r in await conn.fetch("SELECT v FROM acked")] == ["fresh"]
    await conn.close()
    await first.resign()
    await second.resign()


async def test_a_pg_store_whose_hub_lost_the_election_commits_nothing(pg: str) -> None:
    """The fence runs in the store's own write transaction: a hub that still believes it is active
    (it lost the lock without noticing) gets every write refused, and none of it is in the database."""
    from test_store_contract import job, tasks

    from hub.pg_store import PgStore

    stale_election = Election(pg, "hub-a", "https://a:1/", check_interval_s=30)
    fresh_election = Election(pg, "hub-b", "https://b:1/")
    stale, fresh = PgStore(pg), PgStore(pg)
    stale.db.guard, fresh.db.guard = stale_election.fence, fresh_election.fence
    await stale.open()
    await fresh.open()
    await stale_election.campaign()
    row = job("jb-before")
    await stale.create_job(row, tasks(row))                 # acknowledged while active: committed
    await stale_election._conn.execute("SELECT pg_advisory_unlock_all()")
    await fresh_election.campaign()
    late = job("jb-after")
    with pytest.raises(Fenced):
        await stale.create_job(late, tasks(late))
    assert stale_election.lost.is_set()                     # the refused commit told it
    assert await fresh.get_job("jb-before") is not None and await fresh.get_job("jb-after") is None
    ok = job("jb-fresh")
    await fresh.create_job(ok, tasks(ok))
    assert await fresh.get_job("jb-fresh") is not None
    for store in (stale, fresh):
        await store.close()
    await stale_election.resign()
    await fresh_election.resign()


async def test_a_hub_frozen_inside_a_commit_does_not_hold_the_standbys_takeover_for_ever(pg: str) -> None:
    """SIGSTOP between a commit's fence and its COMMIT (a VM pause): the transaction sits idle holding its share
    lock on the token row, and the standby's takeover, which bumps the token, waited on it until the frozen hub
    thawed. The store's connections carry ``Election.store_settings``: the server ends that transaction."""
    from hub.pg_store import PgStore

    frozen = Election(pg, "hub-a", "https://a:1/", check_interval_s=0.1, timeout_s=1.0)
    standby = Election(pg, "hub-b", "https://b:1/", check_interval_s=0.1, timeout_s=1.0)
    store = PgStore(pg)
    store.db.guard, store.db.server_settings = frozen.fence, frozen.store_settings()
    await store.open()
    await frozen.campaign()
    fenced, thaw = asyncio.Event(), asyncio.Event()

    async def stuck(conn: asyncpg.Connection) -> None:   # after the fence, inside the open transaction
        fenced.set()
        await thaw.wait()

    commit = asyncio.ensure_future(store.db.write(stuck))
    await fenced.wait()
    assert frozen._watch is not None
    frozen._watch.cancel()   # frozen: its lock session goes quiet too, and the server ends it
    assert await asyncio.wait_for(standby.campaign(poll_s=0.05), 60) == 2
    thaw.set()
    with pytest.raises(Unavailable):   # the frozen hub's commit is not acknowledged: the server ended it
        await asyncio.wait_for(commit, 30)
    await standby.resign()
    await frozen.resign()
    await store.close()
