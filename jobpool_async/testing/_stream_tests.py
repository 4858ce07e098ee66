"""Streaming (SPEC §4): order, capacity, waking, closing, concurrency, no stranding."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from jobpool_async import Job, JobStatus, PoolQueue, QueueClosedError

from ._helpers import DEADLINE, PauseAfter, assert_pending, next_batch, until, utc
from ._types import BackendFactory

S = JobStatus


class StreamTests:
    async def test_batches_are_oldest_first_with_enqueue_order_ties(self, queue: PoolQueue) -> None:
        t0 = utc(2020, 1, 1)
        t1 = utc(2020, 1, 2)
        await queue.enqueue_jobs(
            [
                Job(id="late", job_type="t", created_at=t1),
                Job(id="tie-a", job_type="t", created_at=t0),
                Job(id="tie-b", job_type="t", created_at=t0),
            ]
        )
        await queue.enqueue_job(Job(id="early", job_type="t", created_at=utc(2019, 1, 1)))
        await queue.enqueue_job(Job(id="tie-c", job_type="t", created_at=t0))
        order = []
        async with queue.stream_jobs("w", max_assigned_jobs=1) as stream:
            for _ in range(5):
                (job,) = await next_batch(stream)
                order.append(job.id)
                await queue.complete_job(job.id, b"")
        assert order == ["early", "tie-a", "tie-b", "tie-c", "late"]

    async def test_a_retried_job_goes_by_its_retry_time(self, queue: PoolQueue) -> None:
        await queue.enqueue_job(Job(id="first", job_type="t", created_at=utc(2020, 1, 1)))
        async with queue.stream_jobs("w") as stream:
            (job,) = await next_batch(stream)
            await queue.enqueue_job(Job(id="second", job_type="t", created_at=utc(2020, 1, 2)))
            await queue.fail_job("first", "again later")  # last_retry_at = now > 2020-01-02
            (job,) = await next_batch(stream)
            assert job.id == "second"
            await queue.complete_job(job.id, b"")
            (job,) = await next_batch(stream)
            assert job.id == "first"
            assert job.retry_count == 1

    async def test_batch_takes_up_to_free_slots_and_capacity_is_never_exceeded(
        self,
        queue: PoolQueue,
    ) -> None:
        await queue.enqueue_jobs([Job(id=f"c{i}", job_type="t") for i in range(10)])
        async with queue.stream_jobs("w", max_assigned_jobs=4) as stream:
            first = await next_batch(stream)
            assert len(first) == 4
            assert all(j.status is S.RUNNING and j.assignee_id == "w" for j in first)
            waiting = asyncio.ensure_future(stream.__anext__())
            await assert_pending(waiting)
            await queue.complete_jobs({first[0].id: b"", first[1].id: b""})
            second = await asyncio.wait_for(waiting, DEADLINE)
            assert len(second) == 2
            stats = await queue.get_job_stats()
            assert stats.running_jobs == 4
            assert len(stream.assigned_job_ids) == 4

    async def test_every_way_of_leaving_running_frees_a_slot(self, queue: PoolQueue) -> None:
        await queue.enqueue_jobs([Job(id=f"s{i}", job_type="t") for i in range(20)])
        async with queue.stream_jobs("w", max_assigned_jobs=1) as stream:
            frees: list[Callable[[str], Awaitable[object]]] = [
                lambda i: queue.complete_job(i, b""),
                lambda i: queue.fail_job(i, "x"),
                lambda i: queue.stop_job(i),
                lambda i: queue.mark_job_unknown_stopped(i, "x"),
                lambda i: queue.update_job_status(i, S.UNKNOWN_RETRY),
                lambda i: queue.mark_worker_unresponsive("w"),
                lambda i: queue.reset_running_jobs(),
            ]
            for free in frees:
                (job,) = await next_batch(stream)
                waiting = asyncio.ensure_future(stream.__anext__())
                await assert_pending(waiting, 0.02)
                await free(job.id)
                assert len(await asyncio.wait_for(waiting, DEADLINE)) == 1
                for held in stream.assigned_job_ids:
                    await queue.complete_job(held, b"")

    async def test_cancelling_keeps_the_slot_until_acknowledged(self, queue: PoolQueue) -> None:
        await queue.enqueue_jobs([Job(id="k1", job_type="t"), Job(id="k2", job_type="t")])
        cancelled: list[str] = []
        async with queue.stream_jobs("w", max_assigned_jobs=1) as stream:
            stream.add_cancel_listener(cancelled.append)
            (job,) = await next_batch(stream)
            result = await queue.cancel_jobs(job_ids=[job.id])
            assert result.cancelled == [job.id]
            assert cancelled == [job.id], "the stream's cancel listener hears it at once"
            again = await queue.cancel_jobs(job_ids=[job.id])  # already CANCELLING
            assert again.cancelled == [job.id]
            assert cancelled == [job.id], "a listener hears each cancelled assignment once"
            waiting = asyncio.ensure_future(stream.__anext__())
            await assert_pending(waiting)
            await queue.acknowledge_cancellation({job.id: True})
            (nxt,) = await asyncio.wait_for(waiting, DEADLINE)
            assert nxt.id == "k2"
        assert (await queue.get_job(job.id)).status is S.STOPPED

    async def test_waking_is_pushed_on_enqueue_and_retry(self, queue: PoolQueue) -> None:
        async with queue.stream_jobs("w", max_assigned_jobs=2) as stream:
            waiting = asyncio.ensure_future(stream.__anext__())
            await assert_pending(waiting, 0.02)
            await queue.enqueue_job(Job(id="wake", job_type="t"))
            (job,) = await asyncio.wait_for(waiting, DEADLINE)
            assert job.id == "wake"
            waiting = asyncio.ensure_future(stream.__anext__())
            await assert_pending(waiting, 0.02)
            await queue.fail_job("wake", "retry me")
            (again,) = await asyncio.wait_for(waiting, DEADLINE)
            assert again.id == "wake"

    async def test_stream_created_while_jobs_wait_takes_them_at_once(
        self, queue: PoolQueue
    ) -> None:
        await queue.enqueue_jobs([Job(id=f"w{i}", job_type="t") for i in range(3)])
        async with queue.stream_jobs("w", max_assigned_jobs=5) as stream:
            assert len(await next_batch(stream)) == 3

    async def test_tags_filter_with_and(self, queue: PoolQueue) -> None:
        await queue.enqueue_jobs(
            [
                Job(id="gpu-big", job_type="t", tags=["gpu", "big"]),
                Job(id="gpu", job_type="t", tags=["gpu"]),
                Job(id="big", job_type="t", tags=["big"]),
                Job(id="none", job_type="t"),
            ]
        )
        async with queue.stream_jobs("w", tags=["gpu", "big"], max_assigned_jobs=10) as s:
            assert [j.id for j in await next_batch(s)] == ["gpu-big"]
        async with queue.stream_jobs("w", tags=["gpu"], max_assigned_jobs=10) as s:
            assert [j.id for j in await next_batch(s)] == ["gpu"]
        async with queue.stream_jobs("w", tags=None, max_assigned_jobs=10) as s:
            assert sorted(j.id for j in await next_batch(s)) == ["big", "none"]

    async def test_a_tagged_stream_is_not_woken_by_other_tags(self, queue: PoolQueue) -> None:
        async with queue.stream_jobs("w", tags=["gpu"]) as stream:
            waiting = asyncio.ensure_future(stream.__anext__())
            await queue.enqueue_job(Job(id="cpu", job_type="t", tags=["cpu"]))
            await assert_pending(waiting, 0.05)
            await queue.enqueue_job(Job(id="gpu", job_type="t", tags=["gpu", "x"]))
            (job,) = await asyncio.wait_for(waiting, DEADLINE)
            assert job.id == "gpu"

    async def test_streams_sharing_an_assignee_have_their_own_slots(self, queue: PoolQueue) -> None:
        await queue.enqueue_jobs([Job(id=f"a{i}", job_type="t") for i in range(4)])
        async with (
            queue.stream_jobs("same", max_assigned_jobs=2) as one,
            queue.stream_jobs("same", max_assigned_jobs=2) as two,
        ):
            a = await next_batch(one)
            b = await next_batch(two)
            assert len(a) == len(b) == 2
            assert not {j.id for j in a} & {j.id for j in b}

    async def test_aclose_ends_a_pending_anext_in_another_task(self, queue: PoolQueue) -> None:
        stream = queue.stream_jobs("w")
        waiting = asyncio.ensure_future(stream.__anext__())
        await assert_pending(waiting, 0.02)
        await stream.aclose()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, DEADLINE)
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        await stream.aclose()  # idempotent

    async def test_queue_close_ends_every_stream(self, queue: PoolQueue) -> None:
        streams = [queue.stream_jobs(f"w{i}") for i in range(3)]
        pending = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.wait(pending, timeout=0.02)
        await queue.close()
        for task in pending:
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(task, DEADLINE)
        with pytest.raises(QueueClosedError):
            queue.stream_jobs("late")

    @pytest.mark.parametrize("opened", [True, False], ids=["opened", "never-opened"])
    async def test_a_stream_used_first_after_the_queue_closed_just_ends(
        self, make_backend: BackendFactory, opened: bool
    ) -> None:
        """One rule for streams made while the queue was open (issue #14, item 8): used
        for the first time after the close, they end as a pending one does."""
        queue = PoolQueue(make_backend())
        if opened:  # else the queue is never opened: streams made before first use
            await queue.enqueue_job(Job(id="left", job_type="t"))
        first_anext, entered = queue.stream_jobs("a"), queue.stream_jobs("b")
        await queue.close()
        with pytest.raises(StopAsyncIteration):
            await first_anext.__anext__()
        seen = []
        async with entered as stream:
            async for batch in stream:
                seen.append(batch)
        assert seen == []
        assert first_anext.closed and entered.closed
        with pytest.raises(QueueClosedError):
            queue.stream_jobs("late")

    async def test_async_for_stops_cleanly_when_closed(self, queue: PoolQueue) -> None:
        await queue.enqueue_jobs([Job(id=f"f{i}", job_type="t") for i in range(3)])
        seen: list[str] = []
        stream = queue.stream_jobs("w", max_assigned_jobs=3)

        async def consume() -> None:
            async for batch in stream:
                seen.extend(j.id for j in batch)
                await queue.complete_jobs({j.id: b"" for j in batch})
                if len(seen) == 3:
                    await stream.aclose()

        await asyncio.wait_for(consume(), DEADLINE)
        assert sorted(seen) == ["f0", "f1", "f2"]

    async def test_cancelling_the_waiting_task_raises_cancelled_error(
        self, queue: PoolQueue
    ) -> None:
        async with queue.stream_jobs("w") as stream:
            waiting = asyncio.ensure_future(stream.__anext__())
            await assert_pending(waiting, 0.02)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await queue.enqueue_job(Job(id="after", job_type="t"))
            (job,) = await next_batch(stream)
            assert job.id == "after", "the stream still works after a cancelled wait"

    async def test_jobs_assigned_but_not_handed_over_are_given_back(self, queue: PoolQueue) -> None:
        """Cancel the consumer at many points around claiming; nothing is stranded."""
        rng = random.Random(7)
        total = 150  # more than 40 batches of 3 take: the stream never runs dry
        await queue.enqueue_jobs([Job(id=f"x{i}", job_type="t") for i in range(total)])
        handed: set[str] = set()
        stream = queue.stream_jobs("w", max_assigned_jobs=3)
        for _ in range(40):
            task = asyncio.ensure_future(stream.__anext__())
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
            if rng.random() < 0.7:
                task.cancel()
            try:
                batch = await asyncio.wait_for(task, DEADLINE)
            except asyncio.CancelledError:
                continue
            handed.update(j.id for j in batch)
            await queue.complete_jobs({j.id: b"" for j in batch})
        await stream.aclose()
        jobs = await queue.get_jobs([f"x{i}" for i in range(total)])
        running = {j.id for j in jobs if j.status in (S.RUNNING, S.CANCELLING)}
        assert running == set(), f"stranded: {running}"
        for job in jobs:
            if job.id in handed:
                assert job.status is S.COMPLETED
            elif job.status is S.FAILED_RETRY:
                assert job.retry_count >= 1
                assert "stream closed" in job.error_message
            else:
                assert job.status is S.INITIAL_PENDING, job

    async def test_close_while_a_claim_is_in_flight_gives_the_jobs_back(
        self, queue: PoolQueue
    ) -> None:
        """The stream closes while its own claim is in flight (held after its write): the
        pending ``__anext__`` ends and the claimed jobs go back before ``aclose()`` returns."""
        await queue.enqueue_jobs([Job(id=f"z{i}", job_type="t") for i in range(5)])
        stream = queue.stream_jobs("w", max_assigned_jobs=5)
        pause = PauseAfter(queue.backend, "claim")
        task = asyncio.ensure_future(stream.__anext__())
        await pause.held()
        closing = asyncio.ensure_future(stream.aclose())
        await until(lambda: stream.closed, "the close has begun")
        pause.go()
        await asyncio.wait_for(closing, DEADLINE)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(task, DEADLINE)
        for job in await queue.get_jobs([f"z{i}" for i in range(5)]):
            assert job.status is S.FAILED_RETRY and "closed" in job.error_message, job
        assert stream.assigned_job_ids == []

    async def test_a_job_cancelled_before_hand_over_is_stopped_on_release(
        self, queue: PoolQueue
    ) -> None:
        """The job is claimed, then cancelled (CANCELLING) while the claim's answer is on
        its way, and the waiting task is cancelled: the give-back stops it."""
        await queue.enqueue_job(Job(id="cx", job_type="t"))
        stream = queue.stream_jobs("w")
        pause = PauseAfter(queue.backend, "claim")
        task = asyncio.ensure_future(stream.__anext__())
        await pause.held()
        assert (await queue.cancel_jobs(job_ids=["cx"])).cancelled == ["cx"]
        assert (await queue.get_job("cx")).status is S.CANCELLING
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pause.go()
        await stream.aclose()
        job = await queue.get_job("cx")
        assert job.status is S.STOPPED, job
        assert stream.assigned_job_ids == []

    async def test_many_streams_and_enqueuers_never_deliver_twice(self, queue: PoolQueue) -> None:
        n_jobs, n_streams = 400, 8
        delivered: Counter[str] = Counter()
        running_now: set[str] = set()
        completed: list[str] = []
        done = asyncio.Event()

        async def enqueuer(k: int) -> None:
            for start in range(0, n_jobs // 4, 10):
                jobs = [Job(id=f"e{k}-{start + i}", job_type="t") for i in range(10)]
                await queue.enqueue_jobs(jobs)
                await asyncio.sleep(0)

        async def consumer(i: int) -> None:
            async with queue.stream_jobs(f"c{i % 3}", max_assigned_jobs=1 + i % 4) as stream:
                async for batch in stream:
                    assert len(batch) <= stream.max_assigned_jobs
                    for job in batch:
                        assert job.id not in running_now, f"{job.id} delivered to two streams"
                        running_now.add(job.id)
                        delivered[job.id] += 1
                    await asyncio.sleep(0)
                    for job in batch:
                        running_now.discard(job.id)
                    await queue.complete_jobs({j.id: b"ok" for j in batch})
                    completed.extend(j.id for j in batch)
                    if len(completed) >= n_jobs:
                        done.set()

        consumers = [asyncio.ensure_future(consumer(i)) for i in range(n_streams)]
        await asyncio.gather(*(enqueuer(k) for k in range(4)))
        await asyncio.wait_for(done.wait(), 60)
        for c in consumers:
            c.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        assert len(delivered) == n_jobs
        assert set(delivered.values()) == {1}
        stats = await queue.get_job_stats()
        assert stats.completed_jobs == n_jobs
        assert stats.running_jobs == 0
