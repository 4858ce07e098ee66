"""``wait_for`` on PostgreSQL is pushed across processes: a waiter announces the job
it waits for, and the process that moves it (even a job it claimed itself, which it
otherwise tells nobody about) sends a notification. Two backends on one schema
stand for two processes (each has its own connections and notification token)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from jobpool_async import Job, JobNotFoundError, JobStatus, PoolQueue

from .backends import drop_postgres_schema, new_schema_name, postgres_dsn

S = JobStatus
#: The waiter's poll interval: far longer than the test waits, so only a push wakes it.
SLOW_POLL = 60.0
DEADLINE = 10.0


@pytest.fixture
async def pair() -> AsyncIterator[tuple[PoolQueue, PoolQueue]]:
    from jobpool_async.backends.postgres import PostgresBackend

    dsn = postgres_dsn()
    schema = new_schema_name()
    waiter = PoolQueue(PostgresBackend(dsn, schema=schema), poll_interval=SLOW_POLL)
    worker = PoolQueue(PostgresBackend(dsn, schema=schema))
    await waiter.open()
    await worker.open()
    try:
        yield waiter, worker
    finally:
        await waiter.close()
        await worker.close()
        await drop_postgres_schema(schema)


async def _heard(queue: PoolQueue, job_id: str, present: bool = True) -> None:
    """Wait (with a deadline) until ``queue``'s backend has heard of the wait."""
    watched = queue.backend._notes.watched  # type: ignore[attr-defined]
    deadline = time.monotonic() + DEADLINE
    while (job_id in watched) is not present:
        assert time.monotonic() < deadline, "the wait was never announced"
        await asyncio.sleep(0.01)


async def test_a_completion_by_the_claiming_process_wakes_a_waiter_elsewhere(
    pair: tuple[PoolQueue, PoolQueue],
) -> None:
    waiter, worker = pair
    await worker.enqueue_job(Job(id="p1", job_type="t", tags=["p1"]))
    async with worker.stream_jobs("w", tags=["p1"]) as stream:
        (job,) = await asyncio.wait_for(stream.__anext__(), DEADLINE)
        waiting = asyncio.create_task(waiter.wait_for("p1", timeout=DEADLINE))
        await _heard(worker, "p1")
        started = time.monotonic()
        await worker.complete_job(job.id, b"done")
        got = await waiting
    assert got.status is S.COMPLETED and got.result == b"done"
    assert time.monotonic() - started < SLOW_POLL / 10, "pushed, not polled"
    await _heard(worker, "p1", present=False)  # the waiter said it stopped waiting


async def test_a_claim_and_a_delete_are_pushed_too(pair: tuple[PoolQueue, PoolQueue]) -> None:
    waiter, worker = pair
    await worker.enqueue_job(Job(id="p2", job_type="t", tags=["p2"]))
    running = asyncio.create_task(waiter.wait_for("p2", statuses=[S.RUNNING], timeout=DEADLINE))
    await _heard(worker, "p2")
    async with worker.stream_jobs("w", tags=["p2"]) as stream:
        await asyncio.wait_for(stream.__anext__(), DEADLINE)
        assert (await running).status is S.RUNNING
        await worker.stop_job("p2", "enough")
    gone = asyncio.create_task(waiter.wait_for("p2", statuses=[S.COMPLETED], timeout=DEADLINE))
    await _heard(worker, "p2")
    await worker.delete_jobs(job_ids=["p2"])
    with pytest.raises(JobNotFoundError):
        await gone
