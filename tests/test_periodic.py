"""Periodic jobs (SPEC §8.5): one job per tick across any number of queues and
processes, deterministic ids, cron by cronsim; a controllable clock throughout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jobpool_async import (
    Job,
    JobStatus,
    MemoryBackend,
    Periodic,
    PoolQueue,
    SQLiteBackend,
    Worker,
    run_periodic,
)
from jobpool_async.pytest_plugin import wait_for_status
from jobpool_async.testing import FakeClock

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def report(tick: datetime) -> Job:
    return Job(id="ignored", job_type="report", job_definition=tick.isoformat().encode())


async def ids_with(queue: PoolQueue, prefix: str, n: int) -> list[str]:
    """The ids starting with ``prefix`` once there are ``n`` of them (deadline 10 s)."""
    async with asyncio.timeout(10):
        while True:
            page = await queue.list_jobs(limit=1000)
            ids = sorted(j.id for j in page.jobs if j.id.startswith(prefix))
            if len(ids) >= n:
                return ids
            await asyncio.sleep(0.005)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0 + timedelta(seconds=30))


@pytest.fixture
async def queue(clock: FakeClock) -> AsyncIterator[PoolQueue]:
    async with PoolQueue(MemoryBackend(), clock=clock) as q:
        yield q


async def test_every_makes_the_latest_tick_and_the_next_then_one_per_tick(
    queue: PoolQueue, clock: FakeClock
) -> None:
    every = Periodic("report", every=timedelta(minutes=1), job=report)
    task = asyncio.ensure_future(run_periodic(queue, [every]))
    try:
        first = await ids_with(queue, "report@", 2)
        assert first == ["report@2030-01-01T00:00:00+00:00", "report@2030-01-01T00:01:00+00:00"]
        job = await queue.get_job(first[1])
        assert job.scheduled_at == T0 + timedelta(minutes=1)
        assert job.job_definition == b"2030-01-01T00:01:00+00:00"
        clock.advance(timedelta(seconds=30))  # the 00:01 tick: 00:02 is made
        assert (await ids_with(queue, "report@", 3))[-1] == "report@2030-01-01T00:02:00+00:00"
        clock.advance(timedelta(minutes=10))  # ticks missed while nothing ran: not made up
        last = await ids_with(queue, "report@", 4)
        assert last[-1] == "report@2030-01-01T00:12:00+00:00"
        assert len(await ids_with(queue, "report@", 4)) == 4
    finally:
        task.cancel()


async def test_a_stream_takes_each_tick_when_it_comes(queue: PoolQueue, clock: FakeClock) -> None:
    task = asyncio.ensure_future(
        run_periodic(queue, [Periodic("tick", every=timedelta(minutes=1), job=report)])
    )
    try:
        async with queue.stream_jobs("w") as stream:
            (now,) = await asyncio.wait_for(stream.__anext__(), 10)
            assert now.id == "tick@2030-01-01T00:00:00+00:00"
            await queue.complete_job(now.id, b"")  # the stream's one slot is free again
            waiting = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0.02)
            assert not waiting.done(), "the next tick's job is not due yet"
            clock.advance(timedelta(seconds=30))
            (then,) = await asyncio.wait_for(waiting, 10)
            assert then.id == "tick@2030-01-01T00:01:00+00:00"
    finally:
        task.cancel()


async def test_many_queues_on_one_store_make_one_job_per_tick(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "jobs.db"
    periodic = [Periodic("p", cron="*/5 * * * *", job=report)]
    queues = [PoolQueue(SQLiteBackend(path), clock=clock) for _ in range(4)]
    tasks = [asyncio.ensure_future(run_periodic(q, periodic)) for q in queues]
    try:
        await ids_with(queues[0], "p@", 2)
        for k in range(3):
            clock.advance(timedelta(minutes=5))
            await ids_with(queues[0], "p@", 3 + k)  # the next tick's job is made
        ids = await ids_with(queues[0], "p@", 5)
        assert ids == [f"p@2030-01-01T00:{m:02d}:00+00:00" for m in (0, 5, 10, 15, 20)]
        stats = await queues[0].get_job_stats()
        assert stats.total_jobs == 5, "exactly one job per tick"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for q in queues:
            await q.close()


async def test_a_worker_runs_its_periodics(queue: PoolQueue, clock: FakeClock) -> None:
    seen: list[str] = []

    async def proc(job: Job) -> bytes:
        seen.append(job.id)
        return b"ok"

    every = Periodic("beat", every=timedelta(minutes=1), job=report)
    async with Worker(queue, proc, assignee_id="w", periodics=[every]):
        await wait_for_status(queue, "beat@2030-01-01T00:00:00+00:00", JobStatus.COMPLETED)
        clock.advance(timedelta(seconds=30))
        await wait_for_status(queue, "beat@2030-01-01T00:01:00+00:00", JobStatus.COMPLETED)
    assert seen[:2] == ["beat@2030-01-01T00:00:00+00:00", "beat@2030-01-01T00:01:00+00:00"]


def test_bad_periodics_are_refused() -> None:
    with pytest.raises(ValueError, match="Wrong number of fields"):
        Periodic("x", cron="* * *", job=report)
    with pytest.raises(ValueError, match="bad cron expression"):
        Periodic("x", cron="61 * * * *", job=report)
    with pytest.raises(ValueError, match="exactly one"):
        Periodic("x", every=timedelta(minutes=1), cron="* * * * *", job=report)
    with pytest.raises(ValueError, match="exactly one"):
        Periodic("x", job=report)
    with pytest.raises(ValueError, match="whole number of seconds"):
        Periodic("x", every=timedelta(milliseconds=1500), job=report)
    with pytest.raises(ValueError, match="name"):
        Periodic("", every=timedelta(minutes=1), job=report)


def test_ticks() -> None:
    hourly = Periodic("h", every=timedelta(hours=1), job=report)
    at = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
    assert hourly.last_tick(at) == datetime(2030, 5, 6, 7, tzinfo=UTC)
    assert hourly.next_tick(at) == datetime(2030, 5, 6, 8, tzinfo=UTC)
    assert hourly.last_tick(datetime(2030, 5, 6, 7, tzinfo=UTC)) == datetime(
        2030, 5, 6, 7, tzinfo=UTC
    )
    cron = Periodic("c", cron="30 2 * * *", job=report)
    assert cron.last_tick(at) == datetime(2030, 5, 6, 2, 30, tzinfo=UTC)
    assert cron.next_tick(at) == datetime(2030, 5, 7, 2, 30, tzinfo=UTC)
    job = cron.job_for(datetime(2030, 5, 7, 2, 30, tzinfo=UTC))
    assert (job.id, job.scheduled_at) == (
        "c@2030-05-07T02:30:00+00:00",
        datetime(2030, 5, 7, 2, 30, tzinfo=UTC),
    )
