"""Jobs a refill claimed that wait in a stream for its next ``__anext__``: one whose
assignment ends meanwhile (completed, failed and claimed by another stream, the
worker marked unresponsive) is not handed over; the others are. ``JobStream`` checks
them only when something may have ended one (its ``_stale`` flag): these tests end
one in each way that can."""

from __future__ import annotations

import asyncio

from jobpool_async import Job, JobStatus, JobStream, PoolQueue
from jobpool_async.testing import DEADLINE, next_batch, until

S = JobStatus


def jobs(prefix: str, n: int) -> list[Job]:
    return [Job(id=f"{prefix}{i:03d}", job_type="t") for i in range(n)]


async def _complete_first_batch(queue: PoolQueue, stream: JobStream) -> None:
    """The stream's first batch, completed: the call claims its next jobs, which wait
    in the stream for its next ``__anext__``."""
    first = await next_batch(stream)
    await queue.complete_jobs({j.id: b"" for j in first})


async def test_a_waiting_job_completed_before_hand_over_is_not_handed_over(
    queue: PoolQueue,
) -> None:
    await queue.enqueue_jobs(jobs("c", 4))
    async with queue.stream_jobs("w", max_assigned_jobs=2) as stream:
        await _complete_first_batch(queue, stream)  # refills c002, c003
        assert sorted(stream.assigned_job_ids) == ["c002", "c003"]
        await queue.complete_job("c002", b"by id")  # ends one waiting in the stream
        assert [j.id for j in await next_batch(stream)] == ["c003"]
        assert (await queue.get_job("c002")).status is S.COMPLETED


async def test_a_waiting_job_failed_and_claimed_by_another_stream_goes_to_that_one(
    queue: PoolQueue,
) -> None:
    await queue.enqueue_jobs(jobs("f", 4))
    async with queue.stream_jobs("w", max_assigned_jobs=2) as stream:
        await _complete_first_batch(queue, stream)  # refills f002, f003
        async with queue.stream_jobs("other", max_assigned_jobs=1) as other:
            # The other stream waits with a free slot: the failed job is its to claim.
            taking = asyncio.ensure_future(other.__anext__())
            try:
                await until(lambda: other._waiting, "the other stream waits")
                await queue.fail_job("f002", "again")
                taken = await asyncio.wait_for(taking, DEADLINE)
            finally:
                taking.cancel()
            assert [j.id for j in taken] == ["f002"]
            assert [j.id for j in await next_batch(stream)] == ["f003"]
            await queue.complete_job("f002", b"")
        await queue.complete_job("f003", b"")


async def test_waiting_jobs_of_an_unresponsive_worker_are_not_handed_over(
    queue: PoolQueue,
) -> None:
    await queue.enqueue_jobs(jobs("u", 4))
    async with queue.stream_jobs("w", max_assigned_jobs=2) as stream:
        await _complete_first_batch(queue, stream)  # refills u002, u003
        assert await queue.mark_worker_unresponsive("w") == 2
        assert stream.assigned_job_ids == []
        # Eligible again: the stream's next batch claims them afresh (new assignments).
        again = await next_batch(stream)
        assert sorted(j.id for j in again) == ["u002", "u003"]
        assert all(j.status is S.RUNNING and j.retry_count == 0 for j in again)
        await queue.complete_jobs({j.id: b"" for j in again})


async def test_waiting_jobs_still_held_are_all_handed_over(queue: PoolQueue) -> None:
    await queue.enqueue_jobs(jobs("h", 6))
    async with queue.stream_jobs("w", max_assigned_jobs=3) as stream:
        first = await next_batch(stream)
        await queue.cancel_jobs(job_ids=["h005"])  # not one of them: UNSCHEDULED
        await queue.complete_jobs({j.id: b"" for j in first})  # refills h003, h004
        await queue.cancel_jobs(job_ids=["h003"])  # CANCELLING: still the stream's
        assert sorted(j.id for j in await next_batch(stream)) == ["h003", "h004"]
