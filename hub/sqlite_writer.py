"""The SQLite store's one writer: group commit on a thread, and a shorter way for a write that finds it idle.

One writer thread owns the connection. Writes queue up while a commit is in progress and are then committed
together in one transaction (one fsync for many requests), each inside its own savepoint so one bad write
cannot undo its neighbours. Callers await a future that resolves only after COMMIT returned: that is the
moment a board may acknowledge.

A small write (``inline=True``: one job of a few tasks, a few results) that finds the writer idle (no write
queued or unsettled) commits at once on the event loop's thread, the same BEGIN/SAVEPOINT/COMMIT: the two
thread hops (~0.1 ms on a busy 2-core machine) are most of a tiny commit's cost on the one-task path, and with
nothing in flight there is no group to wait for nor any order to keep. Under load the writer is rarely idle,
so writes group as before; a big write always goes to the thread, and so does one that meets another
process's write lock (busy: the thread waits for it, never the event loop). WAL checkpoints (an fsync) are
the writer thread's too: SQLite's automatic one, which runs inside a COMMIT, is off. One is due after
CHECKPOINT_COMMITS commits or once the WAL holds CHECKPOINT_WAL_BYTES, whichever comes first: counting commits
alone let a run of big ones (a 10k-task job each) grow the log to hundreds of MiB, and the file kept that size
for good. ``journal_size_limit`` (set by whoever opened the connection, to CHECKPOINT_WAL_BYTES) trims the file
back when the log restarts after a checkpoint, so its size is what was written since. That restart (SQLite
fsyncs the new log header then, even at ``synchronous=normal``) is the thread's too: after a complete
checkpoint it makes the first write.

A lease write or trust records (``end_of_step``) take their place in the order when queued, but are committed
only at the end of the event loop's step (before any write queued after them): the thread's wake-up would
otherwise take the GIL from the reply being encrypted and written in that very step. Small and idle, they
commit on the loop's thread then; else the writer thread takes them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["CHECKPOINT_COMMITS", "CHECKPOINT_WAL_BYTES", "INLINE_ROWS", "SqliteWriter"]

log = logging.getLogger(__name__)
T = TypeVar("T")
Write = Callable[[sqlite3.Connection], Any]

_STOP = object()
#: a write of at most this many rows may commit inline when the writer is idle (a tiny transaction: ~0.1 ms)
INLINE_ROWS = 16
#: commits between WAL checkpoints (SQLite's automatic one, off here, is at 1,000 pages: a few per commit)
CHECKPOINT_COMMITS = 256
#: WAL bytes after which a checkpoint is due whatever the count (SQLite's own default: 1,000 pages, ~4 MiB)
CHECKPOINT_WAL_BYTES = 4 << 20


def _nothing(conn: sqlite3.Connection) -> None:
    """An empty write: wakes the writer thread for its checkpoint after inline commits."""


class SqliteWriter:
    """The writer of one open connection (``PRAGMA wal_autocheckpoint=0`` and ``journal_size_limit`` set to
    CHECKPOINT_WAL_BYTES by whoever opened it)."""

    def __init__(self, inline: bool = True) -> None:
        #: whether small writes may commit on the event loop's thread at all: not where each COMMIT fsyncs
        #: (``synchronous=full``), which would hold every request behind the disk
        self.inline = inline
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0
        #: writes in the writer thread's hands, not yet settled (event loop thread only): 0 = idle
        self._pending = 0
        self._since_checkpoint = 0
        self._wal = ""   # the WAL file's path ("": none, an in-memory database)
        self._patience_ms = 0   # the connection's busy_timeout as opened: the writer thread's BEGIN waits that long
        self._busy_ms = 0       # its busy_timeout now: set only when it must change (inline commits run at 0)
        #: writes whose turn is taken, committed at the end of this loop step (lease writes), and whether
        #: each is small enough to commit inline
        self._deferred: list[tuple[Write, asyncio.Future[Any]]] = []
        self._deferred_small = True
        #: stop() has begun: the thread takes no write after its last batch, so a later one fails at once
        self._closing = False

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, conn: sqlite3.Connection) -> None:
        self._loop = asyncio.get_running_loop()
        self._conn = conn
        main = [row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"]
        self._wal = f"{main[0]}-wal" if main and main[0] else ""
        (self._patience_ms,) = conn.execute("PRAGMA busy_timeout").fetchone()   # as whoever opened it set it
        self._busy_ms = self._patience_ms
        self._thread = threading.Thread(target=self._writer, args=(conn,), name="panal-store", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is not None:
            self._closing = True
            self._conn = None   # the writer closes it: no more inline writes
            self._hand_deferred()
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            self._closing = False

    def write(self, fn: Callable[[sqlite3.Connection], T], inline: bool = False,
              end_of_step: bool = False) -> asyncio.Future[T]:
        """Queue ``fn`` now (its place in the commit order is taken here); its future resolves after COMMIT.
        ``inline`` (a small write): committed here and now if the writer is idle. ``end_of_step``: committed
        once this loop step ends (or handed on before the next write, whichever is first); then ``inline``
        says whether it may commit on the loop's thread."""
        if self._thread is None:
            raise RuntimeError("store is not open")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if self._closing:   # queued behind the writer's stop, it would wait for ever (a shutdown, hung)
            fut.set_exception(RuntimeError("store is closing"))
            return fut
        if end_of_step:
            self._pending += 1
            if not self._deferred:
                loop.call_soon(self._hand_deferred, True)
            self._deferred.append((fn, fut))
            self._deferred_small = self._deferred_small and inline
            return fut
        self._hand_deferred()   # earlier writes keep their place
        if inline and (outcomes := self._inline([fn])) is not None:
            [(ok, value)] = outcomes
            _settle(fut, ok, value)
            return fut
        self._pending += 1
        self._queue.put((fn, fut))
        return fut

    # -- the loop's side ---------------------------------------------------------------------------
    def _hand_deferred(self, end_of_step: bool = False) -> None:
        """The deferred writes to the writer thread; at the end of the step with nothing else in flight,
        committed here instead (the reply is out: nothing on this thread waits for them)."""
        batch, self._deferred = self._deferred, []
        small, self._deferred_small = self._deferred_small, True
        if end_of_step and small and batch and self._pending == len(batch):
            self._pending -= len(batch)
            outcomes = self._inline([fn for fn, _ in batch])
            if outcomes is not None:
                for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
                    _settle(fut, ok, value)
                return
            self._pending += len(batch)
        for item in batch:
            self._queue.put(item)

    def _inline(self, fns: list[Write]) -> list[tuple[bool, Any]] | None:
        """Commit ``fns`` on this (the loop's) thread if the writer is idle; None: it is not, or another
        process holds the database's write lock."""
        conn = self._conn
        if self._pending or conn is None or self._loop is None or not self.inline:
            return None
        # Idle: the writer thread waits in get() and touches the connection only after a put (the loop
        # thread's, like this call), so this transaction is the only one; every earlier write has settled.
        try:
            self._busy_timeout(conn, 0)
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return None
        outcomes = self._commit(conn, fns, begun=True)
        if self._checkpoint_due():   # the thread checkpoints after an empty commit
            self._pending += 1
            self._queue.put((_nothing, self._loop.create_future()))
        return outcomes

    def _settle_queued(self, fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
        self._pending -= 1
        _settle(fut, ok, value)

    # -- the thread's side -------------------------------------------------------------------------
    def _writer(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                batch = [self._queue.get()]
                while True:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = any(item is _STOP for item in batch)
                self._run_batch(conn, [item for item in batch if item is not _STOP])
                if stop:
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[tuple[Write, asyncio.Future[Any]]]) -> None:
        if not batch:
            return
        outcomes = self._commit(conn, [fn for fn, _ in batch])
        if self._checkpoint_due():   # before the futures settle: no inline commit meanwhile
            self._since_checkpoint = 0
            self._checkpoint(conn)
        assert self._loop is not None
        for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
            self._loop.call_soon_threadsafe(self._settle_queued, fut, ok, value)

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """A PASSIVE checkpoint and, when it copied the whole log, the write that restarts the log from its start.
        SQLite syncs the new WAL header at that restart even at ``synchronous=normal``: left to the next write,
        that fsync fell to an inline commit, on the event loop. The write rewrites the header's user_version
        with its own value (one page), and never waits for another process's lock (that one restarts it then)."""
        try:
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            log.exception("WAL checkpoint failed")
            return
        if busy or frames <= 0 or copied != frames:
            return
        try:
            self._busy_timeout(conn, 0)
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            conn.execute(f"PRAGMA user_version={int(version)}")
        except sqlite3.Error:   # busy: whoever holds the lock restarts the log
            pass

    def _busy_timeout(self, conn: sqlite3.Connection, ms: int) -> None:
        """How long the next statement waits for another process's write lock: 0 on the event loop (an inline BEGIN
        and the log's restart give up at once instead), the opened value for the writer thread's BEGIN. Set only
        when it changes: a pragma each way around every inline commit was four statements a submitted task."""
        if self._busy_ms != ms:
            conn.execute(f"PRAGMA busy_timeout={int(ms)}")
            self._busy_ms = ms

    def _checkpoint_due(self) -> bool:
        """After a commit, on whichever thread made it (one stat: ~1 us)."""
        if self._since_checkpoint >= CHECKPOINT_COMMITS:
            return True
        try:
            return bool(self._wal) and os.stat(self._wal).st_size > CHECKPOINT_WAL_BYTES
        except OSError:
            return False

    def _commit(self, conn: sqlite3.Connection, fns: list[Write], begun: bool = False) -> list[tuple[bool, Any]]:
        """One transaction of ``fns``, each in its own savepoint: (ok, result or exception) per fn. Never on
        two threads at once: inline only while no write is in the writer thread's hands."""
        outcomes: list[tuple[bool, Any]] = []
        try:
            if not begun:   # the writer thread's: it may wait for another process's lock
                self._busy_timeout(conn, self._patience_ms)
                conn.execute("BEGIN IMMEDIATE")
            for fn in fns:
                conn.execute("SAVEPOINT op")
                try:
                    result = fn(conn)
                    if isinstance(result, sqlite3.Cursor):
                        # A cursor must not escape to the event loop thread: finalising it there while
                        # this thread uses the connection is "API misuse" in SQLite.
                        result.close()
                        result = None
                    outcomes.append((True, result))
                    conn.execute("RELEASE op")
                except Exception as exc:  # one failing write must not undo the others
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
            self.commits += 1
            self._since_checkpoint += 1
        except sqlite3.Error as exc:
            log.exception("store commit failed")
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(False, exc)] * len(fns)
        except BaseException:   # an interrupt (Ctrl-C lands on the loop's thread) mid-transaction: none left open,
            if conn.in_transaction:   # holding the write lock and failing the next BEGIN
                conn.execute("ROLLBACK")
            raise
        return outcomes


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)
