"""An enqueue wakes the streams its jobs' tags match and arms the timer for a job with
a schedule, whichever job of the batch has them: the enqueue skips its passes over
the jobs only when ``check_new_job`` counted none with tags or a schedule (its fast
path and its full checks both count them)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from jobpool_async import Job, PoolQueue
from jobpool_async.backends.memory import MemoryBackend
from jobpool_async.testing import DEADLINE, FakeClock, until

T0 = datetime(2030, 1, 1, tzinfo=UTC)
#: How many jobs an enqueue checks before it lets the loop run (``_VALIDATE_CHUNK``).
CHUNK = 2000


def plain(prefix: str, n: int) -> list[Job]:
    return [Job(id=f"{prefix}{i:05d}", job_type="t", created_at=T0) for i in range(n)]


@pytest.mark.parametrize(
    "last",
    [
        Job(id="tagged", job_type="t", tags=["x"], created_at=T0),  # fast path
        Job(id="tagged", job_type="t", tags=["x", "x"], created_at=T0),  # full checks
        Job(id="tagged", job_type="t", tags=["é"], created_at=T0),  # full checks
    ],
)
@pytest.mark.parametrize("before", [0, 5, CHUNK + 3])
async def test_a_tagged_job_anywhere_in_a_batch_wakes_its_stream(last: Job, before: int) -> None:
    async with PoolQueue(MemoryBackend(), clock=FakeClock(T0)) as queue:
        tag = last.tags[0]
        async with queue.stream_jobs("w", tags=[tag]) as stream:
            waiting = asyncio.ensure_future(stream.__anext__())
            try:
                await until(lambda: stream._waiting, "the stream waits")
                await queue.enqueue_jobs([*plain("p", before), last])
                batch = await asyncio.wait_for(waiting, DEADLINE)
            finally:
                waiting.cancel()
            assert [j.id for j in batch] == ["tagged"]


@pytest.mark.parametrize("fast", [True, False])
async def test_a_scheduled_job_anywhere_in_a_batch_arms_the_timer(fast: bool) -> None:
    clock = FakeClock(T0)
    async with PoolQueue(MemoryBackend(), clock=clock) as queue:
        due = T0 + timedelta(seconds=30)
        kind = "t" if fast else "tÿpe"  # (non-ASCII: the full checks)
        later = Job(id="later", job_type=kind, created_at=T0, scheduled_at=due)
        async with queue.stream_jobs("w", max_assigned_jobs=10) as stream:
            await queue.enqueue_jobs([*plain("p", 3), later])
            assert clock.pending == 1  # armed for the scheduled job
            first = await asyncio.wait_for(stream.__anext__(), DEADLINE)
            assert sorted(j.id for j in first) == ["p00000", "p00001", "p00002"]
            waiting = asyncio.ensure_future(stream.__anext__())
            try:
                clock.set(due)
                batch = await asyncio.wait_for(waiting, DEADLINE)
            finally:
                waiting.cancel()
            assert [j.id for j in batch] == ["later"]


async def test_a_plain_batch_arms_no_timer() -> None:
    clock = FakeClock(T0)
    async with PoolQueue(MemoryBackend(), clock=clock) as queue:
        await queue.enqueue_jobs(plain("p", 4))
        assert clock.pending == 0
