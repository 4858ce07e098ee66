"""Refill: a call that frees slots of a stream claims that stream's next jobs.

When ``complete_jobs`` (or any call moving jobs out of RUNNING/CANCELLING) frees
slots of an open stream, the backend claims that stream's next jobs in the same
call, whether the stream is waiting in ``__anext__`` (it wakes with its batch ready)
or its loop is still busy completing (the jobs wait in the stream for its next
``__anext__``). These tests pin what a user can observe: the jobs are RUNNING for
the stream when the freeing call returns, capacity holds, jobs never handed over
are given back, and a batch costs one storage call in the usual consumer patterns
(counted on a wrapper backend). The tests here reach into the queue (to hold a
wake-up, or to see what waits in a stream) or use the Worker; the rest are in the
shipped kit.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from datetime import datetime

import pytest

from jobpool_async import Backend, Config, Job, JobStatus, JobStream, PoolQueue, Worker
from jobpool_async.backends.base import ApplyOutcome, Change, Refill
from jobpool_async.testing import DEADLINE, PauseAfter, PauseAfterApply, next_batch, until

from ..backends import BackendFactory, DelegatingBackend
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


# --- a stream not waiting: the loop completes its batch, then asks for the next ---------


class CountingBackend(DelegatingBackend):
    """Counts the storage calls (by method) and the jobs its applies completed."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.calls: Counter[str] = Counter()
        self.completed = 0

    def _call(self, name: str) -> None:
        self.calls[name] += 1

    async def apply(
        self, changes: Sequence[Change], now: datetime, refill: Refill | None = None
    ) -> ApplyOutcome:
        outcome = await super().apply(changes, now, refill)
        self.completed += sum(1 for m in outcome.moved if m.status is S.COMPLETED)
        return outcome


async def test_a_loop_completing_its_batch_finds_the_next_one_already_claimed(
    queue: PoolQueue,
) -> None:
    """The stream is not in ``__anext__`` while its loop completes the batch: the
    completing call claims its next jobs anyway, and they wait in the stream."""
    await queue.enqueue_jobs(jobs("l", 5))
    async with queue.stream_jobs("w", max_assigned_jobs=2) as stream:
        first = await next_batch(stream)
        await queue.complete_jobs({j.id: b"ok" for j in first})
        l2, l3, l4 = await queue.get_jobs(["l002", "l003", "l004"])
        assert (l2.status, l2.assignee_id) == (S.RUNNING, "w")
        assert (l3.status, l3.assignee_id) == (S.RUNNING, "w")
        assert l4.status is S.INITIAL_PENDING  # only the two slots the call freed
        assert sorted(stream.assigned_job_ids) == ["l002", "l003"]
        assert sorted(j.id for j in await next_batch(stream)) == ["l002", "l003"]
        await queue.fail_job("l002", "once more")  # frees one slot: l004 is older
        assert sorted(stream.assigned_job_ids) == ["l003", "l004"]
        assert [j.id for j in await next_batch(stream)] == ["l004"]


async def test_jobs_waiting_in_a_stream_are_given_back_when_it_closes(queue: PoolQueue) -> None:
    """A loop that stops after completing a batch: the jobs its completion claimed were
    never handed over, so ``aclose()`` gives them back before it returns."""
    await queue.enqueue_jobs(jobs("b", 7))
    async with queue.stream_jobs("w", max_assigned_jobs=3) as stream:
        async for batch in stream:
            await queue.complete_jobs({j.id: b"" for j in batch})
            break
    b0, b3, b6 = await queue.get_jobs(["b000", "b003", "b006"])
    assert b0.status is S.COMPLETED
    assert (b3.status, b3.retry_count) == (S.FAILED_RETRY, 1)
    assert "closed" in b3.error_message
    assert b6.status is S.INITIAL_PENDING
    stats = await queue.get_job_stats()
    counts = (stats.completed_jobs, stats.running_jobs, stats.failed_jobs, stats.pending_jobs)
    assert counts == (3, 0, 3, 1)


async def test_cancelling_a_completion_while_it_refills_strands_nothing(
    queue: PoolQueue,
) -> None:
    """The task completing a batch is cancelled while its refilling call is held after
    the write; the claimed jobs still reach the stream (the next ``__anext__`` gets them
    with no claim of its own), and a close gives back those it never got."""
    await queue.enqueue_jobs(jobs("c", 8))
    stream = queue.stream_jobs("w", max_assigned_jobs=2)
    first = await next_batch(stream)
    pause = PauseAfterApply(queue.backend, lambda changes, refill: refill is not None)
    completing = asyncio.ensure_future(queue.complete_jobs({j.id: b"" for j in first}))
    await pause.held()
    completing.cancel()
    pause.go()
    with pytest.raises(asyncio.CancelledError):
        await completing
    await until(lambda: len(stream._ready) == 2, "the refilled jobs reach the stream")
    assert sorted(j.id for j in await next_batch(stream)) == ["c002", "c003"]
    # Once more, and this time the stream closes before its next __anext__.
    pause = PauseAfterApply(queue.backend, lambda changes, refill: refill is not None)
    completing = asyncio.ensure_future(queue.complete_jobs({"c002": b"", "c003": b""}))
    await pause.held()
    completing.cancel()
    closing = asyncio.ensure_future(stream.aclose())
    await until(lambda: stream.closed, "the close has begun")
    assert not closing.done(), "aclose() waits for the refilling call"
    pause.go()
    await asyncio.wait_for(closing, DEADLINE)
    with pytest.raises(asyncio.CancelledError):
        await completing
    c4, c5, c6 = await queue.get_jobs(["c004", "c005", "c006"])
    assert (c4.status, c5.status, c6.status) == (S.FAILED_RETRY, S.FAILED_RETRY, S.INITIAL_PENDING)
    assert stream.assigned_job_ids == []
    assert (await queue.get_job_stats()).running_jobs == 0


async def test_a_refill_and_a_claim_in_flight_together_keep_the_slots(queue: PoolQueue) -> None:
    """``__anext__``'s own claim for two free slots is held after its write while
    another task completes one of the stream's jobs, whose call refills that slot:
    the stream ends with exactly ``max_assigned_jobs`` jobs, and that ``__anext__``
    hands over both the claimed and the refilled ones."""
    await queue.enqueue_jobs(jobs("a", 4))
    async with queue.stream_jobs("w", max_assigned_jobs=4) as stream:
        assert len(await next_batch(stream)) == 4
        await queue.complete_jobs({"a000": b"", "a001": b""})  # the refill finds nothing
        assert sorted(stream.assigned_job_ids) == ["a002", "a003"]
        await queue.enqueue_jobs(jobs("b", 6))
        calls = 0

        def first_call(*args: object, **kwargs: object) -> bool:
            nonlocal calls
            calls += 1
            return calls == 1

        claim = PauseAfter(queue.backend, "claim", first_call)
        taking = asyncio.ensure_future(stream.__anext__())
        try:
            await claim.held()  # b000, b001 are RUNNING for the stream
            await queue.complete_job("a002", None)  # refills one slot: b002
        finally:
            claim.go()
        batch = await asyncio.wait_for(taking, DEADLINE)
        assert sorted(j.id for j in batch) == ["b000", "b001", "b002"]
        assert sorted(stream.assigned_job_ids) == ["a003", "b000", "b001", "b002"]
        stats = await queue.get_job_stats()
        assert (stats.running_jobs, stats.pending_jobs) == (4, 3)


async def test_many_hand_loops_cancelled_at_random_deliver_each_job_to_one_holder(
    queue: PoolQueue,
) -> None:
    """Streams whose loops complete each batch (some in one call, some job by job, some
    leaving a job to another task) before asking for the next; consumer tasks are
    cancelled at random moments (mid-completion, mid-refill) and restarted. No job is
    held by two consumers at once, no stream holds more than its slots, and at the end
    every job is COMPLETED with nothing left RUNNING."""
    total = 300
    await queue.enqueue_jobs(jobs("m", total))
    rng = random.Random(11)
    holder: dict[str, str] = {}  # job id -> consumer that was handed it and has not finished
    problems: list[str] = []
    leftovers: set[str] = set()  # handed over, then the consumer was cancelled
    helpers: set[asyncio.Task[None]] = set()

    async def finish_later(job_id: str) -> None:
        await asyncio.sleep(rng.random() * 0.002)
        # Only if still its to finish: when its loop was cancelled meanwhile, the
        # main task took the job over as a leftover (and completes it itself).
        if holder.pop(job_id, None) is not None:
            await queue.complete_job(job_id, b"late")

    async def consume(name: str, slots: int, style: int) -> None:
        mine: set[str] = set()
        try:
            async with queue.stream_jobs(name, max_assigned_jobs=slots) as stream:
                async for batch in stream:
                    for job in batch:
                        if job.id in holder:
                            problems.append(f"{job.id} handed to {name}, held by {holder[job.id]}")
                        holder[job.id] = name
                        mine.add(job.id)
                    held = [i for i in mine if holder.get(i) == name]
                    if len(held) > slots:
                        problems.append(f"{name} holds {len(held)} > {slots}")
                    if style == 0:
                        for job in batch:
                            holder.pop(job.id, None)
                        await queue.complete_jobs({j.id: b"" for j in batch})
                    elif style == 1:
                        for job in batch:
                            holder.pop(job.id, None)
                            await queue.complete_job(job.id, b"")
                    else:
                        *now, last = batch
                        for job in now:
                            holder.pop(job.id, None)
                        if now:
                            await queue.complete_jobs({j.id: b"" for j in now})
                        task = asyncio.ensure_future(finish_later(last.id))
                        helpers.add(task)
                        task.add_done_callback(helpers.discard)
                    mine = {i for i in mine if holder.get(i) == name}
        except asyncio.CancelledError:
            leftovers.update(i for i in mine if holder.get(i) == name)
            raise

    specs = [(f"c{k}", 1 + k % 4, k % 3) for k in range(6)]
    tasks = {name: asyncio.ensure_future(consume(name, s, st)) for name, s, st in specs}
    async with asyncio.timeout(60):
        while (await queue.get_job_stats()).completed_jobs + len(leftovers) < total:
            await asyncio.sleep(rng.random() * 0.003)
            name, slots, style = rng.choice(specs)
            task = tasks[name]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for job_id in list(leftovers):  # handed to a cancelled loop: it is ours now
                if holder.pop(job_id, None) is not None:
                    await queue.complete_job(job_id, b"leftover")
                leftovers.discard(job_id)
            tasks[name] = asyncio.ensure_future(consume(name, slots, style))
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        while helpers:
            await asyncio.wait(list(helpers))
        for job_id in list(leftovers):
            if holder.pop(job_id, None) is not None:
                await queue.complete_job(job_id, b"leftover")
    assert problems == []
    stats = await queue.get_job_stats()
    assert stats.running_jobs == 0
    assert stats.completed_jobs == total, stats


async def test_a_hand_loop_costs_one_storage_call_per_batch(make_backend: BackendFactory) -> None:
    """10 slots, 200 jobs enqueued first, each batch completed in one call: 20 calls
    that complete and claim, plus the first claim; nothing else reaches storage."""
    counting = CountingBackend(make_backend())
    async with PoolQueue(counting, lease=None) as queue:
        await queue.enqueue_jobs(jobs("h", 200))
        counting.calls.clear()
        batches = 0
        async with queue.stream_jobs("w", max_assigned_jobs=10) as stream:
            async for batch in stream:
                batches += 1
                await queue.complete_jobs({j.id: b'{"ok": true}' for j in batch})
                if counting.completed == 200:
                    break
        assert (batches, dict(counting.calls)) == (20, {"claim": 1, "apply": 20})


async def test_a_refill_also_fills_the_slots_that_were_free(
    make_backend: BackendFactory,
) -> None:
    """A stream given fewer jobs than its slots (only 3 were there) holds all 10 after
    its next completing call, which claims for the slots that were free too: batches
    grow back to the stream's size without a claim of their own."""
    counting = CountingBackend(make_backend())
    async with PoolQueue(counting, lease=None) as queue:
        await queue.enqueue_jobs(jobs("s", 3))
        async with queue.stream_jobs("w", max_assigned_jobs=10) as stream:
            assert len(await next_batch(stream)) == 3
            await queue.enqueue_jobs(jobs("t", 20))
            counting.calls.clear()
            await queue.complete_jobs({f"s{i:03d}": b"" for i in range(3)})
            assert len(stream.assigned_job_ids) == 10
            assert [j.id for j in await next_batch(stream)] == [f"t{i:03d}" for i in range(10)]
            assert dict(counting.calls) == {"apply": 1}
            assert stream._used() == 10, "no slot is left reserved"


async def test_a_worker_costs_one_storage_call_per_batch(make_backend: BackendFactory) -> None:
    counting = CountingBackend(make_backend())

    async def processor(job: Job) -> bytes:
        await asyncio.sleep(0)
        return b'{"ok": true}'

    async with PoolQueue(counting, lease=None) as queue:
        await queue.enqueue_jobs(jobs("k", 200))
        counting.calls.clear()
        async with Worker(queue, processor, config=Config(concurrency=10)):
            await until(lambda: counting.completed == 200, "the worker completes every job")
        calls = dict(counting.calls)
    # the TTL cleanup at start; the first claim, maybe one finding the queue empty
    assert calls.pop("claim") in (1, 2)
    assert calls == {"delete_completed_before": 1, "apply": 20}


async def test_a_worker_runs_the_jobs_its_writes_refill_without_its_consumer(
    queue: PoolQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner that writes a batch's outcomes is handed the jobs the write claimed
    and runs them itself: the worker's stream returns one batch from ``__anext__``
    (the first), not one per batch, and every job runs once."""
    batches = 0
    real = JobStream.__anext__

    async def counted(stream: JobStream) -> list[Job]:
        nonlocal batches
        batch = await real(stream)
        batches += 1
        return batch

    monkeypatch.setattr(JobStream, "__anext__", counted)
    ran: list[str] = []

    async def processor(job: Job) -> bytes:
        ran.append(job.id)
        await asyncio.sleep(0)  # (each job suspends: a runner each, as real jobs)
        return b""

    await queue.enqueue_jobs(jobs("r", 100))
    async with Worker(queue, processor, config=Config(concurrency=10)):
        await until(lambda: len(ran) == 100, "every job runs")
    assert sorted(ran) == [j.id for j in jobs("r", 100)]
    assert (await queue.get_job_stats()).completed_jobs == 100
    assert batches == 1


async def test_a_stop_during_a_runners_write_gives_its_refill_back(queue: PoolQueue) -> None:
    """The worker stops while a runner's write (which claimed the next jobs) is under
    way: those jobs are not handed to the stopping worker, never run, and go back to
    FAILED_RETRY when its stream closes; nothing stays RUNNING."""
    pause = PauseAfterApply(queue.backend, lambda changes, refill: refill is not None)
    ran: list[str] = []

    async def processor(job: Job) -> bytes:
        ran.append(job.id)
        return b"ok"

    await queue.enqueue_jobs(jobs("s", 4))
    worker = Worker(queue, processor, config=Config(concurrency=2))
    async with worker:
        await pause.held()  # s000 and s001 written, s002 and s003 claimed
        stopping = asyncio.ensure_future(worker.stop())
        await asyncio.sleep(0)  # (the stop task's first step runs first: it is stopping)
        pause.go()
        await asyncio.wait_for(stopping, DEADLINE)
    assert ran == ["s000", "s001"]
    got = {j.id: j.status for j in await queue.get_jobs([j.id for j in jobs("s", 4)])}
    assert got == {
        "s000": S.COMPLETED,
        "s001": S.COMPLETED,
        "s002": S.FAILED_RETRY,
        "s003": S.FAILED_RETRY,
    }


async def test_hand_loops_on_many_streams_cost_one_storage_call_per_batch(
    make_backend: BackendFactory,
) -> None:
    """Three loops at once on one queue: each batch costs its completing call; the
    only other calls are each stream's first claim and those of streams that find
    the queue empty near the end."""
    counting = CountingBackend(make_backend())
    async with PoolQueue(counting, lease=None) as queue:
        await queue.enqueue_jobs(jobs("n", 300))
        counting.calls.clear()
        batches = 0

        async def loop(name: str) -> None:
            nonlocal batches
            async with queue.stream_jobs(name, max_assigned_jobs=10) as stream:
                async for batch in stream:
                    batches += 1
                    await queue.complete_jobs({j.id: b"" for j in batch})
                    if counting.completed == 300:
                        return

        async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
            loops = [tg.create_task(loop(f"w{k}")) for k in range(3)]
            await until(lambda: counting.completed == 300, "every job is completed")
            for task in loops:
                task.cancel()
        calls = dict(counting.calls)
    assert calls.pop("apply") == batches
    assert calls.pop("claim") <= 3 * 2, counting.calls
    assert calls == {}


async def test_a_stopping_worker_claims_no_jobs_it_would_give_back(queue: PoolQueue) -> None:
    """The outcomes a ``Worker`` writes after it stopped taking jobs refill nothing:
    the jobs it will never run stay as they were, not given back with a retry."""
    await queue.enqueue_jobs(jobs("z", 15))
    gate = asyncio.Event()
    started = 0

    async def processor(job: Job) -> bytes:
        nonlocal started
        started += 1
        await gate.wait()
        return b""

    worker = Worker(queue, processor, config=Config(concurrency=10))
    async with worker:
        await until(lambda: started == 10, "ten jobs run")
        stopping = asyncio.ensure_future(worker.stop())
        await until(lambda: worker._consumer is not None and worker._consumer.done(), "it stops")
        gate.set()
        await asyncio.wait_for(stopping, DEADLINE)
    stats = await queue.get_job_stats()
    assert (stats.completed_jobs, stats.pending_jobs, stats.failed_jobs) == (10, 5, 0)
    assert stats.total_retries == 0
