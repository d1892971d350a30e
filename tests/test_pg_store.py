"""What only the PostgreSQL store has: versioned migrations, `panal hub migrate`, group commit over a
connection, reconnecting after the server restarts, and connection errors that name no password.

The store contract itself (every method) runs against PostgreSQL in tests/test_store_contract.py; these
use the same private server (tests/pgserver.py) and a database of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
from conftest import InProcessHub, panal
from pgserver import PgServer, PgUnavailable
from system_needs import require_system

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit, wait_job
from agent.tools.bench_dispatch import SimAgent, _manifest
from hub.home import HubHome
from hub.pg_schema import MIGRATIONS
from hub.pg_store import PgStore
from hub.stores import create_store
from security.errors import Unavailable
from security.identity import Identity
from security.records import SignedRecord


async def _migrations(url: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(url)
    try:
        return [(r[0], r[1]) for r in await conn.fetch("SELECT version, name FROM panal_migrations ORDER BY version")]
    finally:
        await conn.close()


def test_a_postgresql_url_makes_a_postgresql_store(tmp_path: Path) -> None:
    for url in ("postgresql://panal@db.example/board", "postgres://panal@db.example:6543/board"):
        store = create_store(url, tmp_path / "board.db")
        assert isinstance(store, PgStore) and store.url == url


async def test_an_unreachable_server_is_a_clear_error_that_names_no_password(tmp_path: Path) -> None:
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = create_store(f"postgresql://panal:s3cret@127.0.0.1:{port}/board", tmp_path / "board.db")
    with pytest.raises(Unavailable) as raised:
        await store.open()
    assert f"127.0.0.1:{port}/board" in raised.value.message and "s3cret" not in raised.value.message


async def test_opening_applies_the_migrations_once_and_records_them(pg: str) -> None:
    first = PgStore(pg)
    await first.open()
    await first.close()
    again = PgStore(pg)
    await again.open()
    await again.close()
    assert first.applied == [m.version for m in MIGRATIONS] and again.applied == []
    assert await _migrations(pg) == [(m.version, m.name) for m in MIGRATIONS]


async def test_hubs_opening_a_fresh_database_together_migrate_it_exactly_once(pg: str) -> None:
    stores = [PgStore(pg) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert sorted(len(s.applied) for s in stores) == [0, 0, 0, len(MIGRATIONS)]
        await asyncio.gather(*(s.add_submitter(f"k{i}", "ed25519:x", "n") for i, s in enumerate(stores)))
        assert len(await stores[0].list_submitters()) == 4
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    assert len(await _migrations(pg)) == len(MIGRATIONS)


async def test_a_database_newer_than_this_code_is_refused(pg: str) -> None:
    store = PgStore(pg)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(pg)
    await conn.execute("INSERT INTO panal_migrations VALUES (999, 'from the future', 0)")
    await conn.close()
    with pytest.raises(Unavailable, match="version 999, newer than this panal"):
        await PgStore(pg).open()


async def test_writes_queued_during_a_commit_share_the_next_one(pg: str) -> None:
    store = PgStore(pg)
    await store.open()
    try:
        await asyncio.gather(*(store.add_submitter(f"k{i}", "ed25519:x", f"s{i}") for i in range(50)))
        assert len(await store.list_submitters()) == 50
        assert store.commits < 50    # group commit: far fewer transactions than acknowledged writes
    finally:
        await store.close()


async def test_a_write_guard_that_refuses_commits_nothing_of_its_batch(pg: str) -> None:
    """The hook an active/standby hub uses to prove, inside each write transaction, that it still leads."""
    store = PgStore(pg)
    await store.open()
    try:
        await store.add_submitter("k0", "ed25519:x", "kept")

        async def deposed(conn: asyncpg.Connection) -> None:
            raise Unavailable("this hub is no longer the active one")
        store.db.guard = deposed
        outcomes = await asyncio.gather(*(store.add_submitter(f"k{i}", "ed25519:x", "lost") for i in range(1, 6)),
                                        store.remove_submitter("k0"), return_exceptions=True)
        assert all(isinstance(o, Unavailable) for o in outcomes)
        store.db.guard = None
        assert await store.list_submitters() == [("k0", "ed25519:x", "kept")]
    finally:
        await store.close()


async def test_a_hub_on_postgresql_runs_a_job_and_its_results_outlive_the_hub(pg: str, tmp_path: Path,
                                                                              user: Identity) -> None:
    hub = InProcessHub(tmp_path, store=pg)
    server = await hub.start()
    assert hub.address is not None
    agent = SimAgent(hub.address, 4)     # the real client, real signed results (agent/tools/bench_dispatch.py)
    stop = asyncio.Event()
    try:
        await server.add_submitter(user.public, "ann")
        await agent.register()
        runner = asyncio.create_task(agent.run(stop))
        async with BoardClient(hub.address, user, retry_for_s=10.0) as client:
            job = await submit(client, make_envelope(user, _manifest(12, "on-postgresql")))
            final = await wait_job(client, job["id"], 60.0)
        stop.set()
        await runner
    finally:
        stop.set()
        await agent.client.close()
        await hub.stop()
    assert final["state"] == "succeeded"
    assert not hub.home.db_path.exists()      # nothing went to the default SQLite file
    store = PgStore(pg)                         # another hub's view of the same database
    await store.open()
    try:
        results = await store.get_results(job["id"])
        stored = await store.get_job(job["id"])
    finally:
        await store.close()
    assert stored is not None and stored.state.value == "succeeded"
    assert len(results) == 12 and {r.agent_id for r in results} == {agent.identity.id}
    for r in results:     # each stored result still verifies, signed by the agent, for its own task
        record = SignedRecord.from_wire(r.record)
        assert record.key.id == agent.identity.id and record.verify()["task_id"] == r.task_id


def test_panal_hub_migrate_applies_the_schema_then_says_it_is_up_to_date(pg: str, tmp_path: Path) -> None:
    root = tmp_path / "hub"
    panal("hub", "init", "--dir", str(root), home=tmp_path / "user")   # on SQLite, then moved to PostgreSQL
    sqlite = panal("hub", "migrate", "--dir", str(root), home=tmp_path / "user").stdout
    assert "SQLite database" in sqlite and "up to date" in sqlite
    HubHome(root).configure(store=pg)
    first = panal("hub", "migrate", "--dir", str(root), home=tmp_path / "user").stdout
    again = panal("hub", "migrate", "--dir", str(root), home=tmp_path / "user").stdout
    assert f"applied migration 1: {MIGRATIONS[0].name}" in first and "(was 0)" in first
    assert f"schema up to date at version {MIGRATIONS[-1].version}" in again and "applied" not in again


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    """A server of this test's own: it is stopped and started again mid-test."""
    try:
        server = PgServer().start()
    except PgUnavailable as exc:
        require_system(f"PostgreSQL server: {exc}")
        raise
    try:
        yield server
    finally:
        server.destroy()


async def test_writes_fail_while_the_server_is_down_and_work_again_after_it_restarts(own_server: PgServer) -> None:
    store = PgStore(own_server.url())
    await store.open()
    try:
        await store.add_submitter("before", "ed25519:x", "a")
        own_server.stop("immediate")      # as a crash would
        with pytest.raises(Unavailable):          # a 503 for the client (retry later), not a 500
            await store.add_submitter("during", "ed25519:x", "b")
        with pytest.raises(Unavailable):
            await store.list_submitters()
        own_server.restart()
        await store.add_submitter("after", "ed25519:x", "c")
        # the readers' pooled connections died with the server too: a read retries on a fresh one
        assert [s[0] for s in await store.list_submitters()] == ["before", "after"]
    finally:
        await store.close()
    again = PgStore(own_server.url())
    await again.open()
    try:
        assert [s[0] for s in await again.list_submitters()] == ["before", "after"]
    finally:
        await again.close()



def freeze(server: PgServer, sig: signal.Signals) -> None:
    """Stop (or continue) every process of the cluster: its sockets stay open and nothing answers, as in
    a network partition with no reset, where the kernel would wait many minutes before giving up."""
    pid = int((server.data / "postmaster.pid").read_text().split()[0])
    main = psutil.Process(pid)
    for proc in [main, *main.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)


async def test_a_store_cut_off_without_a_reset_closes_and_fails_the_unacknowledged_write(own_pg: PgServer) -> None:
    store = PgStore(own_pg.url())
    await store.open()
    await store.add_submitter("before", "ed25519:x", "a")
    freeze(own_pg, signal.SIGSTOP)                                # the partition
    try:
        pending = asyncio.ensure_future(store.add_submitter("during", "ed25519:x", "b"))
        await asyncio.wait({pending}, timeout=0.5)               # waiting on a server that never answers
        assert not pending.done()
        await asyncio.wait_for(store.db.close(timeout_s=1.0), 60)   # before: close waited on TCP (~15 min)
        with pytest.raises(Unavailable, match="closed before this write was committed"):
            await pending
    finally:
        freeze(own_pg, signal.SIGCONT)
    again = PgStore(own_pg.url())
    await again.open()
    try:
        # the acknowledged write is there; the other was never acknowledged: whether it landed (the server
        # may run what was already in its socket once it continues) is what a crash before the reply leaves
        assert "before" in [s[0] for s in await again.list_submitters()]
    finally:
        await again.close()
