"""The SQLite store's writer (hub/sqlite_writer.py): a small write that finds it idle commits before the call
returns, never out of turn, never holding the event loop behind another process's lock; a lease write commits at
the end of the loop's step and before anything queued after it; the WAL is still checkpointed."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from hub.sqlite_store import SqliteStore
from hub.sqlite_writer import CHECKPOINT_COMMITS, CHECKPOINT_WAL_BYTES


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "w.db")
    await s.open()
    await s._run(lambda c: c.execute("CREATE TABLE log (seq INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT)"))
    yield s
    await s.close()


def put(what: str) -> Callable[[sqlite3.Connection], sqlite3.Cursor]:
    return lambda c: c.execute("INSERT INTO log (what) VALUES (?)", (what,))


def logged(path: Path) -> list[str]:
    with sqlite3.connect(path) as other:   # another connection: what is committed, not what one sees
        return [r[0] for r in other.execute("SELECT what FROM log ORDER BY seq")]


async def test_a_small_write_to_an_idle_writer_is_committed_when_the_call_returns(store: SqliteStore) -> None:
    fut = store._queue_write(put("a"), inline=True)
    assert fut.done() and fut.exception() is None
    assert logged(store.path) == ["a"]


async def test_a_store_that_fsyncs_each_commit_never_commits_on_the_event_loop(tmp_path: Path) -> None:
    """``synchronous: full`` fsyncs at every COMMIT: a write inline would hold the event loop behind the disk."""
    full = SqliteStore(tmp_path / "full.db", synchronous="full")
    await full.open()
    try:
        await full._run(lambda c: c.execute("CREATE TABLE log (seq INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT)"))
        fut = full._queue_write(put("a"), inline=True)
        assert not fut.done()          # handed to the writer thread
        await fut
        assert logged(full.path) == ["a"]
    finally:
        await full.close()


async def test_a_store_whose_journal_is_not_wal_never_commits_on_the_event_loop(
        caplog: pytest.LogCaptureFixture) -> None:
    """Outside WAL every COMMIT writes the database file itself (an in-memory database here; a filesystem without
    shared memory in the field): the writer thread takes every write, and the log says why."""
    memory = SqliteStore(Path(":memory:"))
    await memory.open()
    try:
        await memory._run(lambda c: c.execute("CREATE TABLE log (what TEXT)"))
        fut = memory._queue_write(lambda c: c.execute("INSERT INTO log VALUES ('a')"), inline=True)
        assert not fut.done()          # handed to the writer thread
        await fut
        assert await memory._run(lambda c: c.execute("SELECT what FROM log").fetchall()) == [("a",)]
    finally:
        await memory.close()
    assert "journal mode is memory, not WAL" in caplog.text


async def test_a_small_write_behind_one_in_the_writers_hands_waits_its_turn(store: SqliteStore) -> None:
    gate = threading.Event()

    def slow(c: sqlite3.Connection) -> None:
        gate.wait(30)
        c.execute("INSERT INTO log (what) VALUES ('first')")
    first = store._queue_write(slow)
    second = store._queue_write(put("second"), inline=True)
    assert not second.done()          # not committed inline ahead of the write queued before it
    gate.set()
    await asyncio.gather(first, second)
    assert logged(store.path) == ["first", "second"]


async def test_a_small_write_meeting_another_processs_lock_waits_on_the_thread_not_the_event_loop(
        store: SqliteStore) -> None:
    blocker = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    loop_ran = threading.Event()
    held_loop: list[bool] = []

    def release() -> None:   # the other process lets go once the event loop has run again (the writer waits 10 s)
        held_loop.append(not loop_ran.wait(20))
        blocker.execute("ROLLBACK")
    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        fut = store._queue_write(put("late"), inline=True)
        asyncio.get_running_loop().call_soon(loop_ran.set)
        await asyncio.wait_for(asyncio.shield(fut), 60)
    finally:
        loop_ran.set()
        await asyncio.to_thread(releaser.join)
        blocker.close()
    assert held_loop == [False]     # the loop went on while the lock was held elsewhere
    assert logged(store.path) == ["late"]


async def test_a_lease_write_commits_at_the_end_of_the_step_and_before_any_later_write(store: SqliteStore) -> None:
    lease = store._queue_write(put("lease"), end_of_step=True)
    assert not lease.done()           # the reply of this step goes out first
    later = store._queue_write(put("result"), inline=True)
    await asyncio.gather(lease, later)
    assert logged(store.path) == ["lease", "result"]
    alone = store._queue_write(put("alone"), inline=True, end_of_step=True)
    await asyncio.sleep(0)            # the step ends: an idle writer commits a small one on the loop's thread
    assert alone.done() and logged(store.path)[-1] == "alone"
    big = store._queue_write(put("big"), inline=False, end_of_step=True)
    await asyncio.sleep(0)            # a big one goes to the writer thread: the loop is not held for it
    assert not big.done()
    await big
    assert logged(store.path)[-1] == "big"


async def test_a_failing_inline_write_fails_alone_and_changes_nothing(store: SqliteStore) -> None:
    def bad(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO log (what) VALUES ('half')")
        raise ValueError("refused")
    fut = store._queue_write(bad, inline=True)
    assert isinstance(fut.exception(), ValueError)
    await store._run(put("next"), inline=True)
    assert logged(store.path) == ["next"]


async def test_inline_commits_still_checkpoint_the_wal(store: SqliteStore) -> None:
    wal = Path(f"{store.path}-wal")

    async def commits(n: int) -> None:
        for i in range(n):
            await store._run(put(f"row {i}"), inline=True)
        await store._run(put("through the thread"))   # the writer thread's turn: a checkpoint it owes is done
    await commits(CHECKPOINT_COMMITS)
    size = wal.stat().st_size
    await commits(4 * CHECKPOINT_COMMITS)
    assert wal.stat().st_size < 2 * size    # reused from its start after each checkpoint, not grown


@pytest.mark.parametrize("inline", [False, True])
async def test_a_run_of_big_commits_is_checkpointed_before_the_wal_grows_past_a_few_mib(
        store: SqliteStore, inline: bool) -> None:
    """Counting commits alone let 200 commits of 1 MiB (a big job each) grow the log, and its file for good, to
    200 MiB; a one-row write may be big too (a job's signed envelope), and commits inline."""
    wal = Path(f"{store.path}-wal")
    payload = b"x" * (1 << 20)
    largest = 0
    for _ in range(3 * CHECKPOINT_WAL_BYTES // len(payload) + 8):
        await store._run(lambda c: c.execute("INSERT INTO log (what) VALUES (?)", (payload,)), inline=inline)
        largest = max(largest, wal.stat().st_size)
    await store._run(put("through the thread"))   # a checkpoint the inline commits owe is the thread's
    assert largest < CHECKPOINT_WAL_BYTES + 3 * len(payload), largest
    assert store.path.stat().st_size > 2 * CHECKPOINT_WAL_BYTES   # the rows went on into the database file


async def test_a_write_issued_while_the_store_closes_fails_at_once_instead_of_hanging(store: SqliteStore) -> None:
    """Queued behind the writer thread's stop, it was never taken: its caller (a lease's bookkeeping, the board's
    stop waiting for it) waited for ever."""
    gate = threading.Event()

    def slow(c: sqlite3.Connection) -> None:
        gate.wait(30)
        c.execute("INSERT INTO log (what) VALUES ('before the close')")
    first = store._queue_write(slow)
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)                    # close() has begun: it waits for the writer thread
    late = [store._queue_write(put("inline"), inline=True), store._queue_write(put("queued")),
            store._queue_write(put("end of step"), inline=True, end_of_step=True)]
    gate.set()
    await closing
    await first
    assert all(f.done() and isinstance(f.exception(), RuntimeError) for f in late)
    assert logged(store.path) == ["before the close"]


async def test_the_wal_restart_after_a_checkpoint_is_the_writer_threads_never_an_inline_commits(
        store: SqliteStore) -> None:
    """The first write after a complete checkpoint restarts the log and SQLite fsyncs its new header then (even at
    synchronous=normal). An inline commit made that write, and the event loop waited on the disk. The header
    (its first 32 bytes: checkpoint sequence, salts) changes only at a restart."""
    wal = Path(f"{store.path}-wal")
    for i in range(CHECKPOINT_COMMITS):
        await store._run(put(f"row {i}"), inline=True)
    await store._run(lambda c: None)   # the writer's turn (writing nothing): the checkpoint it owes is done
    before = wal.read_bytes()[:32]
    fut = store._queue_write(put("inline"), inline=True)
    assert fut.done() and fut.exception() is None   # committed inline ...
    assert wal.read_bytes()[:32] == before           # ... appended to a log the writer thread had restarted


async def test_an_interrupt_inside_an_inline_write_leaves_no_transaction_open(store: SqliteStore) -> None:
    """Ctrl-C lands on the event loop's thread, where an inline write runs: its transaction stayed open (holding
    the database's write lock), and the next write failed with 'cannot start a transaction within a transaction'."""
    def interrupted(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO log (what) VALUES ('half')")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        store._queue_write(interrupted, inline=True)
    await store._run(put("next"))
    assert logged(store.path) == ["next"]
