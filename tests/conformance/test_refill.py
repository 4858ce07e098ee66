"""Refill: a call that frees slots of a stream waiting for one claims its next jobs.

When ``complete_jobs`` (or any call moving jobs out of RUNNING/CANCELLING) frees
slots of a stream that is waiting in ``__anext__``, the backend claims that
stream's next jobs in the same call. The stream then wakes with its batch ready.
These tests pin what a user can observe: the jobs are RUNNING for the stream when
the freeing call returns, capacity holds, and jobs never handed over are given back.
The tests here reach into the queue (to hold a wake-up); the rest are in the shipped kit.
"""

from __future__ import annotations

import asyncio

import pytest

from jobpool_async import Job, JobStatus, PoolQueue
from jobpool_async.testing import DEADLINE, PauseAfterApply, next_batch, until

from ._helpers import HoldWakes

S = JobStatus


def jobs(prefix: str, n: int) -> list[Job]:
    return [Job(id=f"{prefix}{i:03d}", job_type="t") for i in range(n)]


async def test_refilled_jobs_not_handed_over_are_given_back_on_close(queue: PoolQueue) -> None:
    """The stream closes after a refill claimed its next job and woke it, before the
    woken ``__anext__`` could hand the job over (its wake-up is held): given back."""
    await queue.enqueue_jobs(jobs("g", 3))
    stream = queue.stream_jobs("w", max_assigned_jobs=1)
    wakes = HoldWakes(queue, stream)
    assert [j.id for j in await next_batch(stream)] == ["g000"]
    waiting = asyncio.ensure_future(stream.__anext__())
    await until(lambda: stream._waiting, "the stream waits for a slot")
    await queue.complete_job("g000", None)  # refills g001, wakes the stream
    await until(lambda: wakes.wakes == 1, "the stream is woken with g001 ready")
    assert (await queue.get_job("g001")).status is S.RUNNING
    closing = asyncio.ensure_future(stream.aclose())
    await until(lambda: stream.closed, "the close has begun")
    wakes.release()
    await asyncio.wait_for(closing, DEADLINE)
    with pytest.raises(StopAsyncIteration):
        await waiting
    job = await queue.get_job("g001")
    assert job.status is S.FAILED_RETRY and job.retry_count == 1
    assert "closed" in job.error_message
    assert (await queue.get_job("g002")).status is S.INITIAL_PENDING
    assert stream.assigned_job_ids == []


async def test_refilled_jobs_are_handed_over_when_the_close_comes_later(
    queue: PoolQueue,
) -> None:
    await queue.enqueue_jobs(jobs("h", 2))
    stream = queue.stream_jobs("w", max_assigned_jobs=1)
    assert [j.id for j in await next_batch(stream)] == ["h000"]
    waiting = asyncio.ensure_future(stream.__anext__())
    await until(lambda: stream._waiting, "the stream waits for a slot")
    await queue.complete_job("h000", None)
    assert [j.id for j in await asyncio.wait_for(waiting, DEADLINE)] == ["h001"]
    await stream.aclose()
    assert (await queue.get_job("h001")).status is S.RUNNING  # the caller owns it
    assert stream.assigned_job_ids == ["h001"]


async def test_a_refill_for_a_stream_closed_meanwhile_is_given_back(queue: PoolQueue) -> None:
    """The stream closes while the refilling call is in flight (held after its write):
    the jobs it claimed for the stream are given back before ``aclose()`` returns."""
    await queue.enqueue_jobs(jobs("k", 3))
    stream = queue.stream_jobs("w", max_assigned_jobs=2)
    assert [j.id for j in await next_batch(stream)] == ["k000", "k001"]
    waiting = asyncio.ensure_future(stream.__anext__())
    await until(lambda: stream._waiting, "the stream waits for a slot")
    pause = PauseAfterApply(queue.backend, lambda changes, refill: refill is not None)
    completing = asyncio.ensure_future(queue.complete_job("k000", b""))
    await pause.held()
    assert (await queue.get_job("k002")).status is S.RUNNING  # claimed for the stream
    closing = asyncio.ensure_future(stream.aclose())
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, DEADLINE)
    assert not closing.done(), "aclose() waits for the refilling call"
    pause.go()
    await asyncio.wait_for(completing, DEADLINE)
    await asyncio.wait_for(closing, DEADLINE)
    job = await queue.get_job("k002")
    assert job.status is S.FAILED_RETRY and "closed" in job.error_message
    assert stream.assigned_job_ids == ["k001"]  # handed over before: the caller's


async def test_cancelling_the_waiting_task_gives_refilled_jobs_back(queue: PoolQueue) -> None:
    """The task waiting in ``__anext__`` is cancelled after a refill claimed its next
    job and woke it, before it could hand the job over: the job is given back."""
    await queue.enqueue_jobs(jobs("x", 2))
    stream = queue.stream_jobs("w", max_assigned_jobs=1)
    wakes = HoldWakes(queue, stream)
    async with stream:
        assert [j.id for j in await next_batch(stream)] == ["x000"]
        waiting = asyncio.ensure_future(stream.__anext__())
        await until(lambda: stream._waiting, "the stream waits for a slot")
        await queue.complete_job("x000", None)
        await until(lambda: wakes.wakes == 1, "the stream is woken with x001 ready")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    job = await queue.get_job("x001")  # aclose() returned after every give-back
    assert job.status is S.FAILED_RETRY and "closed" in job.error_message
    assert stream.assigned_job_ids == []
