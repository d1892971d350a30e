"""The SQLite writer's busy_timeout, now set only when it changes (hub/sqlite_writer.py ``_busy_timeout``): an inline
commit (and the log's restart after a checkpoint) leave the connection at 0, so the writer thread's next BEGIN must
put the opened value back. Else a write that meets another process's lock (``panal hub`` admin commands, a second
hub on the same file) fails at once with "database is locked" instead of waiting its turn: a submitted job or a
result lost. The other process here is a real one, holding a real write lock."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest
import test_sqlite_writer
from test_sqlite_writer import logged

from hub.sqlite_store import SqliteStore
from hub.sqlite_writer import CHECKPOINT_COMMITS

store = test_sqlite_writer.store   # the fixture: an open store with a log table

#: another process: takes the database's write lock, says so, holds it until told (a line on stdin), then commits
_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO log (what) VALUES ('other process')")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
conn.close()
"""


async def _after_inline_commit(store: SqliteStore) -> None:
    fut = store._queue_write(lambda c: c.execute("INSERT INTO log (what) VALUES ('inline')"), inline=True)
    assert fut.done() and fut.exception() is None   # committed on the loop: the connection is left at 0


async def _after_the_logs_restart(store: SqliteStore) -> None:
    for _ in range(CHECKPOINT_COMMITS):
        await store._run(lambda c: c.execute("INSERT INTO log (what) VALUES ('inline')"), inline=True)
    await store._run(lambda c: None)   # the thread's checkpoint and the log's restart, made at 0


@pytest.mark.parametrize("before", [_after_inline_commit, _after_the_logs_restart], ids=["inline", "restart"])
async def test_the_writer_thread_waits_out_another_processs_lock_after_the_loop_left_the_timeout_at_zero(
        store: SqliteStore, before: Callable[[SqliteStore], Awaitable[None]]) -> None:
    await before(store)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, str(store.path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 60) == b"locked\n"
        fut = store._queue_write(lambda c: c.execute("INSERT INTO log (what) VALUES ('queued')"))
        # the other process lets go once the write has failed, or after a while if it is (rightly) still waiting
        await asyncio.wait({fut}, timeout=1.0)
        holder.stdin.write(b"go\n")
        await holder.stdin.drain()
        assert await asyncio.wait_for(holder.wait(), 60) == 0
        await asyncio.wait_for(fut, 60)   # raised "database is locked" when BEGIN ran at busy_timeout 0
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
    assert logged(store.path)[-2:] == ["other process", "queued"]

