"""Refill: a call that frees slots of a stream waiting for one claims its next jobs.

When ``complete_jobs`` (or any call moving jobs out of RUNNING/CANCELLING) frees
slots of a stream that is waiting in ``__anext__``, the backend claims that
stream's next jobs in the same call. The stream then wakes with its batch ready.
These tests pin what a user can observe: the jobs are RUNNING for the stream when
the freeing call returns, capacity holds, and jobs never handed over are given back.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from jobpool_async import Job, JobStatus, PoolQueue

from ._helpers import DEADLINE, assert_pending, next_batch

S = JobStatus


def jobs(prefix: str, n: int) -> list[Job]:
    return [Job(id=f"{prefix}{i:03d}", job_type="t") for i in range(n)]


class RefillTests:
    async def test_freed_slots_are_refilled_by_the_freeing_call(self, queue: PoolQueue) -> None:
        await queue.enqueue_jobs(jobs("r", 5))
        async with queue.stream_jobs("w", max_assigned_jobs=2) as stream:
            first = await next_batch(stream)
            assert [j.id for j in first] == ["r000", "r001"]
            waiting = asyncio.ensure_future(stream.__anext__())
            await assert_pending(waiting, 0.02)  # no free slot: it waits
            await queue.complete_jobs({"r000": b"a", "r001": b"b"})
            # Already assigned when the completing call returns: oldest first.
            r2, r3, r4 = await queue.get_jobs(["r002", "r003", "r004"])
            assert (r2.status, r2.assignee_id) == (S.RUNNING, "w")
            assert (r3.status, r3.assignee_id) == (S.RUNNING, "w")
            assert r4.status is S.INITIAL_PENDING
            second = await asyncio.wait_for(waiting, DEADLINE)
            assert sorted(j.id for j in second) == ["r002", "r003"]
            assert all(j.status is S.RUNNING for j in second)
            assert sorted(stream.assigned_job_ids) == ["r002", "r003"]
            completed = await queue.get_jobs(["r000", "r001"])
            assert [(j.status, j.result) for j in completed] == [
                (S.COMPLETED, b"a"),
                (S.COMPLETED, b"b"),
            ]

    async def test_refill_takes_only_the_slots_the_call_freed(self, queue: PoolQueue) -> None:
        await queue.enqueue_jobs(jobs("c", 3))
        async with queue.stream_jobs("w", max_assigned_jobs=3) as stream:
            assert len(await next_batch(stream)) == 3
            await queue.enqueue_jobs(jobs("n", 10))
            waiting = asyncio.ensure_future(stream.__anext__())
            await assert_pending(waiting, 0.02)
            # A move that keeps the job RUNNING frees no slot: nothing is claimed.
            await queue.update_job_status("c000", S.RUNNING)
            assert (await queue.get_job_stats()).running_jobs == 3
            await queue.fail_job("c001", "again")  # frees one slot
            stats = await queue.get_job_stats()
            assert stats.running_jobs == 3
            batch = await asyncio.wait_for(waiting, DEADLINE)
            assert [j.id for j in batch] == ["n000"]
            assert len(stream.assigned_job_ids) == 3

    async def test_a_call_freeing_slots_of_two_streams_refills_only_the_waiting_ones_own(
        self,
        queue: PoolQueue,
    ) -> None:
        """The refill claims one job per slot the call freed *in the waiting stream*: jobs
        of another stream completed in the same call free no slot of it."""
        await queue.enqueue_jobs(jobs("a", 2) + jobs("b", 2))
        async with (
            queue.stream_jobs("wa", max_assigned_jobs=2) as a,
            queue.stream_jobs("wb", max_assigned_jobs=2) as b,
        ):
            assert [j.id for j in await next_batch(a)] == ["a000", "a001"]
            assert [j.id for j in await next_batch(b)] == ["b000", "b001"]
            await queue.enqueue_jobs(jobs("n", 5))
            waiting = asyncio.ensure_future(a.__anext__())
            await assert_pending(waiting, 0.02)
            await queue.complete_jobs({"b000": b"", "a000": b"", "b001": b""})
            batch = await asyncio.wait_for(waiting, DEADLINE)
            assert [j.id for j in batch] == ["n000"]
            assert sorted(a.assigned_job_ids) == ["a001", "n000"]
            stats = await queue.get_job_stats()
            assert (stats.running_jobs, stats.pending_jobs) == (2, 4)

    async def test_a_retried_job_can_refill_its_own_slot(self, queue: PoolQueue) -> None:
        await queue.enqueue_job(Job(id="again", job_type="t"))
        async with queue.stream_jobs("w") as stream:
            assert [j.id for j in await next_batch(stream)] == ["again"]
            waiting = asyncio.ensure_future(stream.__anext__())
            await assert_pending(waiting, 0.02)
            await queue.fail_job("again", "try once more")
            (job,) = await asyncio.wait_for(waiting, DEADLINE)
            assert job.id == "again"
            assert job.status is S.RUNNING and job.retry_count == 1

    async def test_many_streams_with_refills_deliver_each_job_once_within_capacity(
        self,
        queue: PoolQueue,
    ) -> None:
        """Consumers hand each batch to its own task, so streams wait for slots while
        completions (single and batched, from many tasks) refill them."""
        total = 400
        await queue.enqueue_jobs(jobs("m", total))
        rng = random.Random(7)
        seen: Counter[str] = Counter()
        in_flight: dict[str, set[str]] = {}
        over: list[str] = []
        completed = 0
        done = asyncio.Event()

        async def finish(name: str, batch: list[Job]) -> None:
            nonlocal completed
            await asyncio.sleep(rng.random() * 0.002)
            if rng.random() < 0.5:
                for job in batch:
                    in_flight[name].discard(job.id)
                await queue.complete_jobs({j.id: None for j in batch})
            else:
                for job in batch:
                    in_flight[name].discard(job.id)
                    await queue.complete_job(job.id, b"")
            completed += len(batch)
            if completed >= total:
                done.set()

        async def consume(name: str, slots: int) -> None:
            in_flight[name] = set()
            async with (
                asyncio.TaskGroup() as tg,
                queue.stream_jobs(name, max_assigned_jobs=slots) as s,
            ):
                async for batch in s:
                    seen.update(j.id for j in batch)
                    in_flight[name].update(j.id for j in batch)
                    if len(in_flight[name]) > slots:
                        over.append(f"{name} holds {len(in_flight[name])} > {slots}")
                    tg.create_task(finish(name, batch))
                    if sum(seen.values()) >= total:
                        break

        consumers = [asyncio.ensure_future(consume(f"c{k}", k + 1)) for k in range(5)]
        async with asyncio.timeout(60):
            await done.wait()
            for c in consumers:
                c.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)
        assert not over
        assert sorted(seen) == [j.id for j in jobs("m", total)]
        assert max(seen.values()) == 1
        stats = await queue.get_job_stats()
        assert stats.completed_jobs == total
        assert stats.running_jobs == 0 and stats.pending_jobs == 0

    async def test_a_tagged_stream_is_refilled_with_matching_jobs_by_a_mixed_batch(
        self,
        queue: PoolQueue,
    ) -> None:
        """A batch of two transitions (one transaction) frees slots of a stream with a tag
        filter: the refill takes only jobs carrying its tags, oldest first."""
        await queue.enqueue_jobs(
            [Job(id=f"gpu{i}", job_type="t", tags=["gpu", "x"]) for i in range(2)]
            + [Job(id="cpu", job_type="t", tags=["cpu"])]
            + [Job(id=f"gpu{i}", job_type="t", tags=["gpu"]) for i in range(2, 5)]
        )
        async with queue.stream_jobs("w", tags=["gpu"], max_assigned_jobs=2) as stream:
            assert sorted(j.id for j in await next_batch(stream)) == ["gpu0", "gpu1"]
            await queue.cancel_jobs(job_ids=["gpu0", "gpu1"])
            waiting = asyncio.ensure_future(stream.__anext__())
            await assert_pending(waiting, 0.02)
            await queue.acknowledge_cancellation({"gpu0": True, "gpu1": False})
            gpu0, gpu1 = await queue.get_jobs(["gpu0", "gpu1"])
            assert (gpu0.status, gpu1.status) == (S.STOPPED, S.UNKNOWN_STOPPED)
            batch = await asyncio.wait_for(waiting, DEADLINE)
            assert sorted(j.id for j in batch) == ["gpu2", "gpu3"]
            assert (await queue.get_job("cpu")).status is S.INITIAL_PENDING
            assert (await queue.get_job("gpu4")).status is S.INITIAL_PENDING
