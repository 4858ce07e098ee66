"""Streaming (SPEC §4) on every backend, where a test reaches into the queue (to know a
stream waits, or to cancel at the moment a job is claimed); the rest of §4 is in the
shipped kit (``jobpool_async.testing``), run by ``test_kit.py``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from jobpool_async import Job, JobStatus, JobStream, PoolQueue
from jobpool_async.backends.base import ApplyOutcome
from jobpool_async.testing import DEADLINE, PauseAfter, next_batch

S = JobStatus


async def _give_back_a_refill(
    queue: PoolQueue, stream: JobStream, move: Callable[[], Awaitable[None]]
) -> None:
    """Wait in ``stream`` for a slot and let ``move`` free it; cancel the wait right
    after the next job is claimed for the stream and before the stream hands it over,
    as a Worker stopping then does: the job is given back.

    The claim is the apply's refill where the backend can claim the job in the same
    call, else the stream's own claim when it wakes (PostgreSQL, for the job the
    apply itself made eligible): both are hooked.
    """
    waiting = asyncio.ensure_future(stream.__anext__())
    async with asyncio.timeout(DEADLINE):
        while not stream._waiting:  # noqa: ASYNC110 - polling with a deadline
            await asyncio.sleep(0)
    refilled, assign = queue._refilled, queue._assign

    def refilled_then_cancel(s: JobStream, outcome: ApplyOutcome) -> None:
        refilled(s, outcome)
        if outcome.claimed:
            waiting.cancel()

    async def assign_then_cancel(s: JobStream, limit: int) -> list[Job]:
        jobs = await assign(s, limit)
        if jobs:
            waiting.cancel()
        return jobs

    setattr(queue, "_refilled", refilled_then_cancel)  # noqa: B010 - on the instance only
    setattr(queue, "_assign", assign_then_cancel)  # noqa: B010
    try:
        await move()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        delattr(queue, "_refilled")
        delattr(queue, "_assign")
    await stream.aclose()


async def test_a_give_back_keeps_the_jobs_real_error(queue: PoolQueue) -> None:
    """A failed job claimed again and then given back keeps its real error."""
    await queue.enqueue_job(Job(id="f", job_type="t"))
    stream = queue.stream_jobs("w", max_assigned_jobs=1)
    assert [j.id for j in await next_batch(stream)] == ["f"]
    await _give_back_a_refill(
        queue, stream, lambda: queue.fail_job("f", "ZeroDivisionError: division by zero")
    )
    job = await queue.get_job("f")
    assert job.retry_count == 2, "failed, then claimed again and given back"
    assert job.status is S.FAILED_RETRY
    assert job.error_message == "ZeroDivisionError: division by zero"


async def test_a_give_back_explains_a_job_without_an_error(queue: PoolQueue) -> None:
    await queue.enqueue_jobs([Job(id="a", job_type="t"), Job(id="b", job_type="t")])
    stream = queue.stream_jobs("w", max_assigned_jobs=1)
    assert [j.id for j in await next_batch(stream)] == ["a"]
    await _give_back_a_refill(queue, stream, lambda: queue.complete_job("a", b"ok"))
    job = await queue.get_job("b")
    assert (job.status, job.retry_count) == (S.FAILED_RETRY, 1)
    assert job.error_message == "stream closed before the job was handed to its consumer"


async def test_a_give_back_keeps_a_message_set_while_the_stream_held_the_job(
    queue: PoolQueue,
) -> None:
    """A message written to a job the stream holds but has not handed out survives
    the give-back: the store decides, not the stream's copy of the job from its claim
    (found by the state-machine test: the give-back overwrote it)."""
    await queue.enqueue_jobs([Job(id="a", job_type="t"), Job(id="b", job_type="t")])
    stream = queue.stream_jobs("w", max_assigned_jobs=1)
    assert [j.id for j in await next_batch(stream)] == ["a"]
    await queue.complete_job("a", b"ok")  # frees the slot: b is claimed for the stream
    assert (await queue.get_job("b")).status is S.RUNNING, "held by the stream"
    await queue.update_job_status("b", S.RUNNING, error_message="mine")
    await stream.aclose()  # gives b back, never handed out
    job = await queue.get_job("b")
    assert (job.status, job.retry_count) == (S.FAILED_RETRY, 1)
    assert job.error_message == "mine"


@pytest.mark.parametrize("method", ["renew_leases", "claim"])
async def test_a_queue_closed_during_a_streams_first_call_ends_the_stream(
    queue: PoolQueue, method: str
) -> None:
    """The queue closes while a stream's first ``__anext__`` waits on storage (its
    lease record being written, or its claim): the iteration ends, it does not raise
    QueueClosedError."""
    await queue.enqueue_job(Job(id="a", job_type="t"))
    pause = PauseAfter(queue._backend, method)
    stream = queue.stream_jobs("w", max_assigned_jobs=1)
    first = asyncio.ensure_future(stream.__anext__())
    await pause.held()
    closing = asyncio.ensure_future(queue.close())
    async with asyncio.timeout(DEADLINE):
        while not queue.closed:  # noqa: ASYNC110 - polling with a deadline
            await asyncio.sleep(0)
    pause.go()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(first, DEADLINE)
    await asyncio.wait_for(closing, DEADLINE)


async def test_a_queue_closed_just_before_a_streams_claim_starts_ends_the_stream(
    queue: PoolQueue,
) -> None:
    """The claim runs as its own task: the queue can close between the stream's last
    look and the claim's start. The iteration then ends; it does not raise."""
    await queue.enqueue_job(Job(id="a", job_type="t"))
    stream = queue.stream_jobs("w", max_assigned_jobs=1)
    assign = queue._assign
    closing: list[asyncio.Future[None]] = []

    async def close_then_assign(s: JobStream, limit: int) -> list[Job]:
        closing.append(asyncio.ensure_future(queue.close()))
        await asyncio.sleep(0)  # the close begins: the queue is closed from here on
        assert queue.closed
        return await assign(s, limit)

    setattr(queue, "_assign", close_then_assign)  # noqa: B010 - on the instance only
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(stream.__anext__(), DEADLINE)
    await asyncio.wait_for(closing[0], DEADLINE)
