"""The hot paths of issue #20 on every backend, at awkward moments (reviewer, session 12).

A batch's storage call (a claim, a completion that refills its stream, an enqueue) is
interrupted after every number of event-loop turns in turn: the task awaiting it is
cancelled, or the queue is closed under it. Whatever the moment, SPEC §2 and §4 hold:
a batch moves all or nothing, no job is stranded RUNNING without a holder, a stream
never exceeds its slots, and the counts, the listings and the records read back from
the reopened store are the ones the calls' outcomes imply.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from jobpool_async import (
    Job,
    JobPoolError,
    JobStatus,
    PoolQueue,
    QueueClosedError,
)
from jobpool_async.backends import MemoryBackend
from jobpool_async.testing import DEADLINE, BackendFactory, FakeClock, next_batch

S = JobStatus
FINAL = {S.COMPLETED, S.STOPPED, S.UNSCHEDULED, S.UNKNOWN_STOPPED, S.DISCARDED}
RELEASE_MESSAGE = "stream closed before the job was handed to its consumer"
#: Event-loop turns after which a call is interrupted: every one of the first few,
#: then sparser (a PostgreSQL call spans many turns; a thread hop a few).
TURNS = [*range(12), 16, 24, 32, 48, 64, 96, 128, 192, 256]
_rounds = itertools.count()


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def _jobs(tag: str, n: int, **kwargs: Any) -> list[Job]:
    return [Job(id=f"{tag}-{i}", job_type="hot", tags=[tag], **kwargs) for i in range(n)]


async def _all_pages(queue: PoolQueue, **filters: Any) -> list[Job]:
    out: list[Job] = []
    after: str | None = None
    for _ in range(10_000):
        page = await queue.list_jobs(limit=7, after=after, **filters)
        out += page.jobs
        if page.next_after is None:
            return out
        after = page.next_after
    raise AssertionError("paging did not end")


async def _counts_agree(queue: PoolQueue, tag: str, ids: list[str]) -> dict[JobStatus, int]:
    """Stats by ``tag`` and the listings by status agree with the jobs read one by one."""
    jobs = await queue.get_jobs(ids)
    assert [j.id for j in jobs] == ids, "every job of the round exists"
    by = Counter(j.status for j in jobs)
    stats = await queue.get_job_stats([tag])
    assert stats.by_status == {s: by.get(s, 0) for s in S}, (stats.by_status, by)
    assert stats.total_jobs == len(ids)
    assert stats.running_jobs == by[S.RUNNING] + by[S.CANCELLING]
    assert stats.total_retries == sum(j.retry_count for j in jobs)
    for status in (S.RUNNING, S.FAILED_RETRY, S.COMPLETED, S.INITIAL_PENDING):
        listed = await _all_pages(queue, statuses=[status], tags=[tag])
        assert sorted(j.id for j in listed) == sorted(j.id for j in jobs if j.status is status), (
            status
        )
        assert all(j.status is status for j in listed)
    return by


def _not_stranded(jobs: list[Job], handed: set[str]) -> None:
    """SPEC §4: a job assigned but never handed over is given back (FAILED_RETRY, one
    retry, the release message); only jobs handed to the caller may stay RUNNING."""
    for job in jobs:
        if job.id in handed:
            continue
        assert job.status in (S.INITIAL_PENDING, S.FAILED_RETRY), (job.id, job.status, handed)
        if job.status is S.FAILED_RETRY:
            assert (job.retry_count, job.error_message) == (1, RELEASE_MESSAGE), job
            assert job.assignee_id and job.assigned_at is not None


async def _interrupted(call: Awaitable[Any], turns: int) -> tuple[bool, Any]:
    """Run ``call`` as a task, cancel it after ``turns`` loop turns unless it finished:
    (finished, its value or the exception it ended with)."""
    task = asyncio.ensure_future(call)
    await _turns(turns)
    finished = task.done()
    if not finished:
        task.cancel()
    try:
        return finished, await task
    except BaseException as exc:  # CancelledError included: what the caller saw
        return finished, exc


# --- cancellation during a batch's storage call -------------------------------------


@pytest.mark.timeout(300)
async def test_cancelling_a_refilling_completion_at_any_turn_moves_all_or_nothing(
    queue: PoolQueue,
) -> None:
    """A hand loop's ``complete_jobs`` (which claims the stream's next jobs in the same
    storage call) cancelled after n turns: its batch is all COMPLETED or all still
    RUNNING; the jobs it claimed are handed over by the next ``__anext__`` or, once
    the stream closes, given back; none is left RUNNING without a holder."""
    for turns in TURNS:
        tag = f"c{next(_rounds)}"
        ids = [j.id for j in _jobs(tag, 7)]
        await queue.enqueue_jobs(_jobs(tag, 7))
        handed: set[str] = set()
        stream = queue.stream_jobs("w", tags=[tag], max_assigned_jobs=3)
        try:
            batch = await next_batch(stream)
            assert len(batch) == 3
            handed.update(j.id for j in batch)
            finished, outcome = await _interrupted(
                queue.complete_jobs({j.id: b"r" for j in batch}), turns
            )
            if finished:
                assert outcome is None, outcome
            else:
                assert isinstance(outcome, asyncio.CancelledError), (turns, outcome)
            await _settled(queue, [j.id for j in batch])
            completed = {j.status for j in await queue.get_jobs([j.id for j in batch])}
            # Whatever the moment, the stream goes on: once the batch is done, its next
            # batch (refilled or claimed) holds jobs it never had, within its slots.
            if turns % 2 == 0 and completed == {S.COMPLETED}:
                nxt = await next_batch(stream)
                assert nxt and not handed & {j.id for j in nxt}, (turns, nxt)
                handed.update(j.id for j in nxt)
                assert len(stream.assigned_job_ids) <= 3
        finally:
            await stream.aclose()
        await _settled(queue, [j.id for j in batch])
        jobs = await queue.get_jobs(ids)
        first = [j for j in jobs if j.id in {b.id for b in batch}]
        statuses = {j.status for j in first}
        assert statuses in ({S.COMPLETED}, {S.RUNNING}), (turns, statuses)
        if finished:
            assert statuses == {S.COMPLETED}
        _not_stranded(jobs, handed)
        assert sum(j.status is S.RUNNING for j in jobs) <= 6
        await _counts_agree(queue, tag, ids)


async def _settled(queue: PoolQueue, ids: list[str]) -> None:
    """Wait (with a deadline) until a cancelled caller's shielded write has ended: the
    jobs' statuses no longer change over a few storage round trips."""
    last: list[JobStatus] | None = None
    same = 0
    async with asyncio.timeout(DEADLINE):
        while same < 3:
            now = [j.status for j in await queue.get_jobs(ids)]
            same = same + 1 if now == last else 0
            last = now
            await asyncio.sleep(0.005)


@pytest.mark.timeout(300)
async def test_cancelling_a_claim_at_any_turn_gives_its_jobs_back(queue: PoolQueue) -> None:
    """``__anext__`` cancelled after n turns while its claim is in flight: the claimed
    jobs are handed over (it had finished) or given back by the time ``aclose()``
    returns (SPEC §4); a second stream then takes every one of them."""
    for turns in TURNS:
        tag = f"k{next(_rounds)}"
        ids = [j.id for j in _jobs(tag, 4)]
        await queue.enqueue_jobs(_jobs(tag, 4))
        handed: set[str] = set()
        async with queue.stream_jobs("w", tags=[tag], max_assigned_jobs=4) as stream:
            finished, outcome = await _interrupted(stream.__anext__(), turns)
            if finished:
                assert isinstance(outcome, list) and outcome, outcome
                handed.update(j.id for j in outcome)
            else:
                assert isinstance(outcome, asyncio.CancelledError), (turns, outcome)
        jobs = await queue.get_jobs(ids)
        _not_stranded(jobs, handed)
        assert {j.id for j in jobs if j.status is S.RUNNING} == handed
        by = await _counts_agree(queue, tag, ids)
        assert by[S.RUNNING] == len(handed)
        # What was given back is eligible: another stream takes it all.
        rest = set(ids) - handed
        async with queue.stream_jobs("v", tags=[tag], max_assigned_jobs=4) as again:
            got: set[str] = set()
            while got != rest:
                got.update(j.id for j in await next_batch(again))
                assert got <= rest, (got, rest)
        await queue.complete_jobs(dict.fromkeys(ids, b""))


# --- the queue closed during a call -------------------------------------------------


@pytest.mark.timeout(300)
async def test_a_queue_closed_at_any_turn_of_its_calls_keeps_the_store_whole(
    make_backend: BackendFactory,
) -> None:
    """``close()`` after n turns of a refilling completion, a second stream's claim and
    an enqueue, all in flight: each call finishes or ends with a library error
    (``QueueClosedError``, ``StorageError``; the stream's iteration simply stops),
    never hangs; the reopened store holds the enqueue all or nothing, the completion
    all or nothing, no job RUNNING that was not handed over, and counts that agree."""
    for turns in TURNS:
        tag = f"q{next(_rounds)}"
        queue = PoolQueue(make_backend())
        await queue.open()
        ids = [j.id for j in _jobs(tag, 8)]
        await queue.enqueue_jobs(_jobs(tag, 8))
        first = queue.stream_jobs("w1", tags=[tag], max_assigned_jobs=2)
        second = queue.stream_jobs("w2", tags=[tag], max_assigned_jobs=3)
        batch = await next_batch(first)
        handed = {j.id for j in batch}
        late = _jobs(f"{tag}x", 5)
        calls: dict[str, asyncio.Future[Any]] = {
            "complete": asyncio.ensure_future(queue.complete_jobs({j.id: b"" for j in batch})),
            "claim": asyncio.ensure_future(second.__anext__()),
            "enqueue": asyncio.ensure_future(queue.enqueue_jobs(late)),
        }
        await _turns(turns)
        async with asyncio.timeout(DEADLINE):
            await queue.close()
            outcomes = await asyncio.gather(*calls.values(), return_exceptions=True)
        result = dict(zip(calls, outcomes, strict=True))
        for name, value in result.items():
            if isinstance(value, BaseException):
                allowed: tuple[type[BaseException], ...] = (JobPoolError,)
                if name == "claim":
                    allowed = (StopAsyncIteration,)
                assert isinstance(value, allowed), (turns, name, repr(value))
        if isinstance(result["claim"], list):
            handed.update(j.id for j in result["claim"])
        assert first.closed and second.closed

        reopened = PoolQueue(make_backend())
        async with reopened:
            jobs = await reopened.get_jobs(ids)
            done = {j.status for j in jobs if j.id in {b.id for b in batch}}
            assert done in ({S.COMPLETED}, {S.RUNNING}), (turns, done)
            if result["complete"] is None:
                assert done == {S.COMPLETED}, turns
            _not_stranded(jobs, handed)
            await _counts_agree(reopened, tag, ids)
            stored = [j.id for j in await reopened.get_jobs([j.id for j in late])]
            assert stored in ([], [j.id for j in late]), (turns, stored)
            if result["enqueue"] == [j.id for j in late]:
                assert stored == result["enqueue"], turns
            if stored:
                await _counts_agree(reopened, f"{tag}x", stored)


@pytest.mark.timeout(120)
async def test_calls_after_close_raise_queue_closed(make_backend: BackendFactory) -> None:
    """SPEC §5: any call on a closed queue raises QueueClosedError, not the store's
    own error about a closed handle or pool."""
    queue = PoolQueue(make_backend())
    await queue.enqueue_jobs(_jobs("z", 2))
    stream = queue.stream_jobs("w")
    await next_batch(stream)
    await queue.close()
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: queue.enqueue_job(Job(id="after", job_type="t")),
        lambda: queue.complete_jobs({"z-0": b""}),
        lambda: queue.get_jobs(["z-0"]),
        lambda: queue.get_job_stats(),
        lambda: queue.list_jobs(),
        lambda: queue.cancel_jobs(job_ids=["z-1"]),
    ]
    for call in calls:
        with pytest.raises(QueueClosedError):
            await call()
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


# --- many streams -------------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_many_streams_over_overlapping_tags_deliver_each_job_once(
    queue: PoolQueue,
) -> None:
    """Twenty-four hand loops (six assignees, some sharing one; AND tag filters that
    overlap) drain 600 jobs by ``complete_jobs`` of each batch, while more jobs are
    enqueued: each job is handed over once, to a stream whose filter it matches, no
    stream ever holds more than its slots, and afterwards every count and listing says
    COMPLETED."""
    tags = ["red", "green", "blue"]
    jobs = [
        Job(
            id=f"m{i:04d}",
            job_type=("a", "b")[i % 2],
            tags=[t for k, t in enumerate(tags) if (i >> k) & 1] or ["plain"],
            priority=i % 3,
        )
        for i in range(600)
    ]
    filters = [[], ["red"], ["green"], ["blue"], ["red", "green"], ["plain"]]
    seen: dict[str, str] = {}
    completed: set[str] = set()
    problems: list[str] = []
    done = asyncio.Event()

    async def loop(name: str, assignee: str, tag_filter: list[str], slots: int) -> None:
        async with queue.stream_jobs(assignee, tags=tag_filter, max_assigned_jobs=slots) as s:
            async for batch in s:
                for job in batch:
                    if job.id in seen:
                        problems.append(f"{job.id}: {seen[job.id]} and {name}")
                    seen[job.id] = name
                    if not set(tag_filter) <= set(job.tags):
                        problems.append(f"{job.id} {job.tags} to {name} {tag_filter}")
                if len(s.assigned_job_ids) > slots:
                    problems.append(f"{name} holds {len(s.assigned_job_ids)} > {slots}")
                await queue.complete_jobs({j.id: j.id.encode() for j in batch})
                completed.update(j.id for j in batch)
                if len(completed) == len(jobs):  # (every completion returned)
                    done.set()

    tasks = [
        asyncio.ensure_future(loop(f"s{k}", f"w{k % 6}", filters[k % 6], 1 + k % 5))
        for k in range(24)
    ]
    try:
        for start in range(0, len(jobs), 50):
            await queue.enqueue_jobs(jobs[start : start + 50])
            await asyncio.sleep(0)
        async with asyncio.timeout(60):
            await done.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert not problems, problems[:10]
    assert sorted(seen) == [j.id for j in jobs]
    stored = await queue.get_jobs([j.id for j in jobs])
    assert all(j.status is S.COMPLETED and j.result == j.id.encode() for j in stored)
    stats = await queue.get_job_stats()
    assert (stats.total_jobs, stats.completed_jobs, stats.running_jobs) == (600, 600, 0)
    for tag in tags:
        want = sum(tag in j.tags for j in jobs)
        assert (await queue.get_job_stats([tag])).completed_jobs == want, tag
    assert len(await _all_pages(queue, statuses=[S.COMPLETED])) == 600
    assert await _all_pages(queue, statuses=[S.RUNNING, S.CANCELLING]) == []
    assert await _all_pages(queue, statuses=[S.INITIAL_PENDING]) == []


# --- records written by the hot paths, read back exactly ----------------------------

T0 = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
PAST = datetime(2021, 2, 3, 4, 5, 6, 7, tzinfo=UTC)


def _odd_jobs(tag: str) -> list[Job]:
    """Jobs whose every field is unusual: extreme priorities and times, odd text and
    payloads, attempt limits, a schedule in the past."""
    return [
        Job(
            id=f"{tag}-é\u2028/'\"{i}",
            job_type=["t", "ünï type", "x" * 300][i % 3],
            job_definition=[b"", b"\x00\xff" * 4, bytes(range(250, 256))][i % 3],
            tags=[tag, ["", "b c", "😀", "/slash"][i % 4] or "plain"],
            created_at=[
                T0,
                datetime(1, 1, 1, tzinfo=UTC),
                datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            ][i % 3],
            priority=[-32768, 32767, 0, 5][i % 4],
            max_attempts=[None, 1, 3, 32767][i % 4],
            scheduled_at=[None, PAST][i % 2],
        )
        for i in range(12)
    ] + [
        # plain jobs (untagged, unscheduled, pending: an enqueue's usual kind)
        Job(
            id=f"{tag}-plain-\u00e9\x7f{i}",
            job_type=["t", "\u00fcn\u00ef type", "t"][i % 3],
            job_definition=[b"", b"\x00\xff" * 4][i % 2],
            created_at=[T0, datetime(1, 1, 1, tzinfo=UTC), T0][i % 3],
            priority=[0, -32768, 32767][i % 3],
            max_attempts=[None, 1, 2][i % 3],
        )
        for i in range(6)
    ]


async def _reread(make_backend: BackendFactory, live: list[Job], ids: list[str]) -> None:
    """The records as the live queue returned them equal those a new backend reads
    from the store, field by field, and those its listing returns."""
    async with PoolQueue(make_backend(), lease=None) as fresh:
        again = await fresh.get_jobs(ids)
        assert [j.id for j in again] == [j.id for j in live]
        for a, b in zip(live, again, strict=True):
            assert a == b, f"live {a!r}\nstored {b!r}"
        listed = {j.id: j for j in await _all_pages(fresh)}
        for job in again:
            assert listed[job.id] == job, f"listed {listed[job.id]!r}\nread {job!r}"


Act = Callable[[PoolQueue, FakeClock], Awaitable[Any]]


@pytest.mark.timeout(300)
async def test_records_written_by_every_move_read_back_exactly(
    make_backend: BackendFactory,
) -> None:
    """The same calls at the same (fake) instants on this backend and on the memory
    backend, the reference: after each kind of write (enqueue, claim, refill, fail
    with a delay, stop, cancel, acknowledge, discard, update, rescue, requeue,
    complete with b"" and None), every field of every job is the reference's, as the
    live queue returns it, as a new backend reads it from the store, and as listed."""
    tag = "odd"
    jobs = _odd_jobs(tag)
    ids = [j.id for j in jobs]
    start = datetime(2030, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    ref_clock, clock = FakeClock(start), FakeClock(start)
    reference = PoolQueue(MemoryBackend(), clock=ref_clock, lease=None)

    async def step(act: Act) -> None:
        want_value = await act(reference, ref_clock)
        want = await reference.get_jobs(ids)
        queue = PoolQueue(make_backend(), clock=clock, lease=None)
        async with queue:
            value = await act(queue, clock)
            live = await queue.get_jobs(ids)
        assert clock.now() == ref_clock.now()
        assert value == want_value, (value, want_value)
        assert [j.id for j in live] == [j.id for j in want]
        for got, ref in zip(live, want, strict=True):
            assert got == ref, f"got {got!r}\nreference {ref!r}"
        await _reread(make_backend, live, ids)

    def tick(c: FakeClock) -> None:
        c.advance(timedelta(seconds=1, microseconds=123))

    async def enqueue(q: PoolQueue, c: FakeClock) -> list[str]:
        return await q.enqueue_jobs(jobs)

    async def claim_some_refill_others(q: PoolQueue, c: FakeClock) -> list[str]:
        async with q.stream_jobs("w1", tags=[tag], max_assigned_jobs=4) as s:
            tick(c)
            batch = sorted(await next_batch(s), key=lambda j: j.id)
            assert len(batch) == 4
            # completes two (b"" and None), fails one with a delay, stops one: each
            # call frees slots and refills them in the same storage call
            a, b, x, d = (j.id for j in batch)
            tick(c)
            await q.complete_jobs({a: b"", b: None})
            tick(c)
            await q.fail_jobs({x: ("boom \u00fc", timedelta(seconds=90))})
            tick(c)
            await q.stop_job(d, "")
            tick(c)
            more = await next_batch(s)
            assert len(more) == 4 and not {j.id for j in more} & {a, b, x, d}
            more.sort(key=lambda j: j.id)
            tick(c)
            await q.cancel_jobs(job_ids=[more[0].id])
            tick(c)
            await q.acknowledge_cancellation({more[0].id: True})
            tick(c)
            await q.discard_jobs({more[1].id: "given up"})
            tick(c)
            await q.update_job_status(more[2].id, S.CANCELLING)
            # the rest stays RUNNING (handed over) past the stream's close
            return [j.id for j in batch + more]

    async def rescue_and_requeue(q: PoolQueue, c: FakeClock) -> tuple[int, list[str], list[str]]:
        tick(c)
        rescued = await q.mark_worker_unresponsive("w1")
        tick(c)
        moved = await q.requeue_jobs(tags=[tag], scheduled_at=c.now() - timedelta(hours=1))
        async with q.stream_jobs("w2", tags=[tag], max_assigned_jobs=12) as s:
            tick(c)
            batch = sorted(await next_batch(s), key=lambda j: j.id)
            tick(c)
            await q.complete_jobs({j.id: j.id.encode() for j in batch[0::3]})
            tick(c)
            await q.fail_jobs({j.id: ("once more", timedelta(hours=1)) for j in batch[1::3]})
            # batch[2::3] stays RUNNING, handed over
        return rescued, sorted(moved), [j.id for j in batch]

    async def finish(q: PoolQueue, c: FakeClock) -> tuple[int, list[str]]:
        c.advance(timedelta(days=3))
        rescued = await q.mark_worker_unresponsive("w2")
        async with q.stream_jobs("w3", max_assigned_jobs=12) as s:
            tick(c)
            batch = sorted(await next_batch(s), key=lambda j: j.id)
        for j in batch[0::2]:
            tick(c)
            await q.update_job_status(j.id, S.COMPLETED, result=b"late", error_message="m")
        tick(c)
        await q.fail_jobs({j.id: "again" for j in batch[1::2]})
        return rescued, [j.id for j in batch]

    async with reference:
        await step(enqueue)
        await step(claim_some_refill_others)
        await step(rescue_and_requeue)
        await step(finish)
    async with PoolQueue(make_backend()) as q:
        stats = await q.get_job_stats()
        stored = await q.get_jobs(ids)
        assert stats.total_jobs == len(ids)
        plain = {j.status for j in stored if "-plain-" in j.id}
        assert plain - {S.INITIAL_PENDING}, "plain jobs were claimed and moved too"
        assert stats.by_status == {s: sum(j.status is s for j in stored) for s in S}
        assert stats.total_retries == sum(j.retry_count for j in stored)


@pytest.mark.timeout(300)
async def test_a_large_enqueue_reads_back_and_is_claimed_in_the_references_order(
    make_backend: BackendFactory,
) -> None:
    """One enqueue of 1,500 jobs (PostgreSQL's large insert, 2e55fa6: its arrays
    behind sub-selects), some plain, some tagged, scheduled, prioritised or with
    history: every record, the listing order and the claim order (batch by batch) are
    those of the memory backend, the reference, at the same fake instants."""
    start = datetime(2030, 1, 1, 0, 0, 0, 7, tzinfo=UTC)

    def make(i: int) -> Job:
        kwargs: dict[str, Any] = {}
        if i % 7 == 0:
            kwargs.update(retry_count=2, last_retry_at=start - timedelta(seconds=i))
            kwargs.update(error_message=f"earlier {i} \u00e9", started_at=PAST)
        if i % 11 == 0:
            kwargs["scheduled_at"] = start + timedelta(minutes=i % 3)
        return Job(
            id=f"big-{i:05d}",
            job_type=("t", "u \u00fc")[i % 2],
            job_definition=bytes([i % 256]) * (i % 5),
            tags=[["x"], [], ["x", "y"], []][i % 4],
            created_at=start - timedelta(seconds=i % 13, microseconds=i),
            priority=(0, 0, 3, -2)[i % 4],
            max_attempts=(None, 2)[i % 2],
            **kwargs,
        )

    jobs = [make(i) for i in range(1500)]
    ids = [j.id for j in jobs]
    ref_clock, clock = FakeClock(start), FakeClock(start)
    async with (
        PoolQueue(MemoryBackend(), clock=ref_clock, lease=None) as reference,
        PoolQueue(make_backend(), clock=clock, lease=None) as queue,
    ):
        assert await reference.enqueue_jobs(jobs) == ids
        assert await queue.enqueue_jobs(jobs) == ids
        assert await queue.get_jobs(ids) == await reference.get_jobs(ids)
        assert [j.id for j in await _all_pages(queue)] == [
            j.id for j in await _all_pages(reference)
        ]
        for c in (ref_clock, clock):
            c.advance(timedelta(minutes=5))
        orders: list[list[frozenset[str]]] = []
        for q in (reference, queue):
            order: list[frozenset[str]] = []
            async with q.stream_jobs("w", max_assigned_jobs=50) as stream:
                while sum(map(len, order)) < len(jobs):
                    batch = await next_batch(stream)
                    order.append(frozenset(j.id for j in batch))
                    await q.complete_jobs({j.id: None for j in batch})
            orders.append(order)
        assert orders[0] == orders[1]
        assert await queue.get_jobs(ids) == await reference.get_jobs(ids)


# --- jobs handed over are snapshots -------------------------------------------------


@pytest.mark.timeout(120)
async def test_jobs_handed_over_by_claims_and_refills_are_the_callers_alone(
    queue: PoolQueue,
) -> None:
    """SPEC §1: returned jobs are snapshots. The jobs a claim and a refill hand over
    (820f583: LevelDB hands out the object its record held) are not changed by the
    calls that move them later, and changing them (fields, the tags list in place)
    changes nothing stored: records, tag counts, listings."""
    tag = "snap"
    await queue.enqueue_jobs(
        [Job(id=f"s{i}", job_type="t", tags=[tag, f"k{i % 2}"]) for i in range(6)]
        + [Job(id=f"p{i}", job_type="t") for i in range(2)]
    )
    stream = queue.stream_jobs("w", tags=[tag], max_assigned_jobs=3)
    first = await next_batch(stream)
    kept = [j.copy() for j in first]
    await queue.complete_jobs({j.id: b"done" for j in first[:2]})  # refills two
    await queue.fail_job(first[2].id, "failed")  # refills one more
    assert first == kept, "moving the jobs changed the objects handed over"
    second = await next_batch(stream)
    assert len(second) == 3
    kept2 = [j.copy() for j in second]
    await queue.cancel_jobs(job_ids=[second[0].id])
    await queue.acknowledge_cancellation({second[0].id: True})
    await queue.complete_jobs({j.id: None for j in second[1:]})
    assert second == kept2
    third = await next_batch(stream)  # the failed job, or the last new one
    stored_before = await queue.get_jobs([j.id for j in third])
    for job in [*first, *second, *third]:
        job.tags.append("mutated")
        job.tags[0] = "other"
        job.status = S.DISCARDED
        job.error_message = "changed by the caller"
        job.result = b"caller"
        job.job_definition = b"caller"
        job.attempts = 99
    assert await queue.get_jobs([j.id for j in third]) == stored_before
    await queue.complete_jobs({j.id: b"end" for j in third})
    await stream.aclose()
    stored = {j.id: j for j in await queue.get_jobs([f"s{i}" for i in range(6)])}
    assert all(j.tags == [tag, f"k{int(j.id[1:]) % 2}"] for j in stored.values())
    assert all(j.job_definition == b"" for j in stored.values())
    stats = await queue.get_job_stats([tag])
    assert stats.by_status == {s: sum(j.status is s for j in stored.values()) for s in S}
    assert (await queue.get_job_stats(["mutated"])).total_jobs == 0
    assert (await queue.get_job_stats(["other"])).total_jobs == 0
    assert await _all_pages(queue, tags=["mutated"]) == []
    listed = await _all_pages(queue, tags=[tag])
    assert sorted(j.id for j in listed) == sorted(stored)
    assert all(listed_job == stored[listed_job.id] for listed_job in listed)
