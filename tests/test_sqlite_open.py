"""Opening one new SQLite store from several connections at once.

SQLite refuses the switch to WAL with SQLITE_BUSY at once, without its busy handler,
while another connection holds a write transaction on the file: seen as "database is
locked" when four queues opened one new store together. The open waits instead, up to
``busy_timeout``, as for any other lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from jobpool_async import Job, PoolQueue, StorageError
from jobpool_async.backends import sqlite as sq
from jobpool_async.backends.sqlite import SQLiteBackend

DEADLINE = 30.0


def _writer_holding(path: Path) -> sqlite3.Connection:
    """A connection in the middle of a write transaction on ``path`` (a new, empty file
    in rollback-journal mode, as a store is before its first open finishes)."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def test_the_switch_to_wal_waits_for_a_writer_instead_of_failing(tmp_path: Path) -> None:
    """The writer ends after the open's first refused try (seen by tracing the open's own
    statements): the open then succeeds. Before the fix it failed on that first try."""
    path = tmp_path / "jobs.db"
    holder = _writer_holding(path)
    tries: list[str] = []

    def trace(statement: str) -> None:
        if "journal_mode = WAL" in statement:
            tries.append(statement)
            if len(tries) == 2:  # the first try was refused: let the writer finish
                holder.execute("COMMIT")

    conn = sqlite3.connect(path, isolation_level=None)
    conn.set_trace_callback(trace)
    try:
        sq._open_store(conn, str(path), "NORMAL", 10_000)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
        holder.close()
    assert len(tries) >= 2


async def test_the_open_gives_up_after_busy_timeout(tmp_path: Path) -> None:
    """A writer that never ends: the open fails with StorageError after busy_timeout,
    and the file is left as it was (no schema)."""
    path = tmp_path / "jobs.db"
    holder = _writer_holding(path)
    try:
        backend = SQLiteBackend(path, busy_timeout=0.2)
        with pytest.raises(StorageError, match="locked"):
            await asyncio.wait_for(backend.open(), DEADLINE)
        await backend.close()
    finally:
        holder.close()
    probe = sqlite3.connect(path)
    try:
        assert probe.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    finally:
        probe.close()


@pytest.mark.parametrize("round_", range(5))
async def test_many_queues_open_one_new_store_at_once(tmp_path: Path, round_: int) -> None:
    """Eight queues open one new store together (each its own connection and thread);
    each enqueues a job; every job is there once."""
    path = tmp_path / f"jobs-{round_}.db"
    start = asyncio.Event()
    queues = [PoolQueue(SQLiteBackend(path)) for _ in range(8)]

    async def open_and_enqueue(i: int, queue: PoolQueue) -> None:
        await start.wait()  # all eight start opening in the same loop turn
        await queue.open()
        await queue.enqueue_job(Job(id=f"j{i}", job_type="t"))

    try:
        opening = asyncio.gather(*(open_and_enqueue(i, q) for i, q in enumerate(queues)))
        await asyncio.sleep(0)
        start.set()
        await asyncio.wait_for(opening, DEADLINE)
        stats = await queues[0].get_job_stats()
        assert stats.pending_jobs == 8
    finally:
        for queue in queues:
            await queue.close()
