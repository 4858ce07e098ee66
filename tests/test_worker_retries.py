"""The Worker's retries (SPEC §8.3): back-off from Config.retry, attempt limits,
Retry/Discard raised by processors, Config.job_timeout. A controllable clock: no
test sleeps for a back-off to pass."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest

from jobpool_async import (
    Config,
    Discard,
    Job,
    JobStatus,
    MemoryBackend,
    PoolQueue,
    Retry,
    RetryPolicy,
    Worker,
)
from jobpool_async.pytest_plugin import wait_for_status
from jobpool_async.testing import FakeClock

S = JobStatus
T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
async def queue(clock: FakeClock) -> AsyncIterator[PoolQueue]:
    async with PoolQueue(MemoryBackend(), clock=clock) as q:
        yield q


async def until_job(queue: PoolQueue, job_id: str, predicate: Callable[[Job], bool]) -> Job:
    """Poll the job (in-process, cheap) until ``predicate`` holds, with a deadline."""
    async with asyncio.timeout(10):
        while True:
            job = await queue.get_job(job_id)
            if predicate(job):
                return job
            await asyncio.sleep(0.001)


def boom_counter() -> tuple[list[int], object]:
    runs: list[int] = []

    async def proc(job: Job) -> bytes:
        runs.append(job.attempts)
        raise ConnectionError("service unavailable")

    return runs, proc


async def test_a_failing_processor_never_spins(queue: PoolQueue, clock: FakeClock) -> None:
    runs, proc = boom_counter()
    await queue.enqueue_job(Job(id="j", job_type="t"))
    async with Worker(queue, proc, assignee_id="w"):  # type: ignore[arg-type]
        await wait_for_status(queue, "j", S.FAILED_RETRY)
        job = await queue.get_job("j")
        assert job.scheduled_at is not None
        assert timedelta(seconds=0.9) <= job.scheduled_at - T0 <= timedelta(seconds=1.1)
        await asyncio.sleep(0.05)  # real time passes; the fake clock does not
        assert runs == [1], "no run before the back-off is over"
        clock.set(job.scheduled_at)
        second = await until_job(
            queue, "j", lambda j: j.status is S.FAILED_RETRY and j.attempts == 2
        )
        assert second.scheduled_at is not None
        delay = second.scheduled_at - clock.now()
        assert timedelta(seconds=1.8) <= delay <= timedelta(seconds=2.2), "doubled"
    assert runs == [1, 2]


async def test_the_attempt_limit_discards_and_logs_at_error(
    queue: PoolQueue, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    runs, proc = boom_counter()
    policy = RetryPolicy(base=timedelta(seconds=1), jitter=0, max_attempts=2)
    await queue.enqueue_jobs(
        [Job(id="j", job_type="t"), Job(id="own", job_type="t", max_attempts=1)]
    )
    with caplog.at_level(logging.WARNING, logger="jobpool_async"):
        async with Worker(queue, proc, assignee_id="w", config=Config(retry=policy)):  # type: ignore[arg-type]
            await wait_for_status(queue, "own", S.DISCARDED)
            await wait_for_status(queue, "j", S.FAILED_RETRY)
            clock.advance(1)
            await wait_for_status(queue, "j", S.DISCARDED)
    job = await queue.get_job("j")
    assert (job.attempts, job.retry_count, job.error_message) == (2, 2, "service unavailable")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("last attempt" in r.getMessage() and "'j'" in r.getMessage() for r in errors)
    assert sorted(runs) == [1, 1, 2]


async def test_retry_and_discard_raised_by_the_processor(
    queue: PoolQueue, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def proc(job: Job) -> bytes:
        if job.id == "later":
            if job.attempts == 1:
                raise Retry(in_=timedelta(minutes=10))
            return b"second time"
        raise Discard("the input is malformed")

    await queue.enqueue_jobs([Job(id="later", job_type="t"), Job(id="bad", job_type="t")])
    with caplog.at_level(logging.INFO, logger="jobpool_async"):
        async with Worker(queue, proc, assignee_id="w"):
            await wait_for_status(queue, "bad", S.DISCARDED)
            await wait_for_status(queue, "later", S.FAILED_RETRY)
            assert (await queue.get_job("later")).scheduled_at == T0 + timedelta(minutes=10)
            clock.advance(timedelta(minutes=10))
            await wait_for_status(queue, "later", S.COMPLETED)
    bad = await queue.get_job("bad")
    assert (bad.error_message, bad.retry_count) == ("the input is malformed", 0)
    assert any(
        r.levelno == logging.ERROR and "discarded by its processor" in r.getMessage()
        for r in caplog.records
    )
    assert not any(
        r.levelno >= logging.WARNING and "'later'" in r.getMessage() for r in caplog.records
    )


async def test_job_timeout_cancels_the_processor_and_fails_the_job(queue: PoolQueue) -> None:
    cancelled = asyncio.Event()

    async def proc(job: Job) -> bytes:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    await queue.enqueue_job(Job(id="slow", job_type="t"))
    config = Config(job_timeout=timedelta(milliseconds=20))
    async with Worker(queue, proc, assignee_id="w", config=config):
        await wait_for_status(queue, "slow", S.FAILED_RETRY)
    assert cancelled.is_set()
    job = await queue.get_job("slow")
    assert "job_timeout" in job.error_message and "0:00:00.020000" in job.error_message


async def test_a_timeout_error_of_the_processor_itself_is_an_ordinary_failure(
    queue: PoolQueue,
) -> None:
    async def proc(job: Job) -> bytes:
        raise TimeoutError("upstream timed out")

    await queue.enqueue_job(Job(id="j", job_type="t"))
    async with Worker(queue, proc, assignee_id="w", config=Config(job_timeout=timedelta(hours=1))):
        await wait_for_status(queue, "j", S.FAILED_RETRY)
    assert (await queue.get_job("j")).error_message == "upstream timed out"
