"""A job scheduled by another process wakes a waiting stream when it comes due
(SPEC §8.2): on PostgreSQL the enqueue's NOTIFY carries the time, so the stream's
queue sets its one timer without polling; on SQLite a stream sees it within
``poll_interval`` (the claim looks for jobs that came due)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from jobpool_async import Job, PoolQueue, SQLiteBackend
from jobpool_async.testing import until

from .backends import drop_postgres_schema, new_schema_name, postgres_dsn

DEADLINE = 10.0


async def _handed_over_after(waiter: PoolQueue, other: PoolQueue, ahead: float) -> float:
    """Seconds between a job's ``scheduled_at`` (set by ``other``) and ``waiter``'s
    stream handing it over."""
    async with waiter.stream_jobs("w") as stream:
        waiting = asyncio.ensure_future(stream.__anext__())
        await until(lambda: stream._waiting, "the stream finds nothing and waits")
        due = datetime.now(UTC) + timedelta(seconds=ahead)
        await other.enqueue_job(Job(id="later", job_type="t", scheduled_at=due))
        await asyncio.sleep(ahead / 2)
        assert not waiting.done(), "a scheduled job never wakes a stream early"
        (job,) = await asyncio.wait_for(waiting, DEADLINE)
    assert job.id == "later"
    return (datetime.now(UTC) - due).total_seconds()


async def test_postgres_notify_carries_the_time_no_polling_needed() -> None:
    from jobpool_async.backends.postgres import PostgresBackend

    dsn = postgres_dsn()
    schema = new_schema_name()
    try:
        # poll_interval 60 s: only the NOTIFY (and the timer it sets) can wake in time
        async with (
            PoolQueue(PostgresBackend(dsn, schema=schema), poll_interval=60) as waiter,
            PoolQueue(PostgresBackend(dsn, schema=schema), poll_interval=60) as other,
        ):
            late = await _handed_over_after(waiter, other, 0.3)
        assert 0 <= late < 2.0, late
    finally:
        await drop_postgres_schema(schema)


async def test_sqlite_sees_another_queues_schedule_within_poll_interval(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with (
        PoolQueue(SQLiteBackend(path), poll_interval=0.2) as waiter,
        PoolQueue(SQLiteBackend(path), poll_interval=0.2) as other,
    ):
        late = await _handed_over_after(waiter, other, 0.3)
    assert 0 <= late < 0.2 + 0.1 + 1.0, late  # poll + probe interval, with slack for load
