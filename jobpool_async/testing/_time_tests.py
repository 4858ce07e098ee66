"""Schedules, priorities, attempts, DISCARDED, requeue, idempotent enqueue (SPEC §8.1-8.3,
§8.5) through a queue, with a controllable clock (nothing sleeps for a schedule)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest

from jobpool_async import (
    InvalidTransitionError,
    Job,
    JobStatus,
    PoolQueue,
    RetryPolicy,
)

from ._clock import FakeClock
from ._helpers import DEADLINE, assert_pending
from ._types import BackendFactory

S = JobStatus


T0 = datetime(2030, 1, 1, tzinfo=UTC)


#: How long a stream is given to show that no job is due (it would get one at once).
NONE_DUE = 0.2


async def claim_all(
    q: PoolQueue, n: int = 100, tags: list[str] | None = None, *, wait: float = DEADLINE
) -> list[str]:
    """Ids a fresh stream is assigned right now (its first batch, or none after
    ``wait`` seconds: short where the test expects none, long where it expects jobs,
    so a loaded machine's slow first claim is not taken for none)."""
    async with q.stream_jobs("w", tags=tags, max_assigned_jobs=n) as stream:
        task = asyncio.ensure_future(stream.__anext__())
        done, _ = await asyncio.wait({task}, timeout=wait)
        if not done:
            task.cancel()
            return []
        return [j.id for j in task.result()]


async def run_one(q: PoolQueue, job_id: str) -> Job:
    """Assign exactly ``job_id`` (it must be the next due job)."""
    async with q.stream_jobs("w") as stream:
        (job,) = await asyncio.wait_for(stream.__anext__(), DEADLINE)
    assert job.id == job_id
    return job


class TimeTests:
    async def test_new_fields_round_trip_and_default(self, tq: PoolQueue) -> None:
        at = T0 + timedelta(hours=1, microseconds=7)
        await tq.enqueue_jobs(
            [
                Job(id="plain", job_type="t"),
                Job(id="timed", job_type="t", scheduled_at=at, priority=-32768, max_attempts=3),
                Job(id="top", job_type="t", priority=32767, max_attempts=1),
            ]
        )
        plain, timed, top = await tq.get_jobs(["plain", "timed", "top"])
        assert (plain.scheduled_at, plain.priority, plain.max_attempts, plain.attempts) == (
            None,
            0,
            None,
            0,
        )
        assert timed.scheduled_at == at and timed.scheduled_at.tzinfo is not None
        assert (timed.priority, timed.max_attempts, timed.attempts) == (-32768, 3, 0)
        assert (top.priority, top.max_attempts) == (32767, 1)
        plus5 = timezone(timedelta(hours=5, minutes=30))
        await tq.enqueue_job(Job(id="zoned", job_type="t", scheduled_at=at.astimezone(plus5)))
        zoned = await tq.get_job("zoned")
        assert zoned.scheduled_at == at and zoned.scheduled_at.utcoffset() == timedelta(0)

    @pytest.mark.parametrize(
        ("kwargs", "error", "text"),
        [
            ({"scheduled_at": datetime(2030, 1, 1)}, ValueError, "scheduled_at"),
            ({"priority": 32768}, ValueError, "priority"),
            ({"priority": -32769}, ValueError, "priority"),
            ({"priority": 1.5}, TypeError, "priority"),
            ({"max_attempts": 0}, ValueError, "max_attempts"),
            ({"attempts": 1}, ValueError, "attempts"),
        ],
    )
    async def test_bad_time_fields_are_rejected_before_writing(
        self, tq: PoolQueue, kwargs: dict[str, object], error: type[Exception], text: str
    ) -> None:
        with pytest.raises(error, match=text):
            bad = Job(id="bad", job_type="t", **kwargs)  # type: ignore[arg-type]
            await tq.enqueue_jobs([Job(id="ok", job_type="t"), bad])
        assert await tq.get_jobs(["ok", "bad"]) == []

    async def test_bad_arguments_of_the_new_calls(self, tq: PoolQueue) -> None:
        await tq.enqueue_job(Job(id="a", job_type="t"))
        await run_one(tq, "a")
        with pytest.raises(ValueError, match="retry_in"):
            await tq.fail_job("a", "x", retry_in=timedelta(seconds=-1))
        with pytest.raises(ValueError, match="retry_in"):
            await tq.fail_jobs({"a": ("x", timedelta(seconds=-1))})
        with pytest.raises(ValueError, match="if_exists"):
            await tq.enqueue_jobs([Job(id="b", job_type="t")], if_exists="replace")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="scheduled_at"):
            await tq.requeue_jobs(job_ids=["a"], scheduled_at=datetime(2030, 1, 1))
        with pytest.raises(ValueError, match="requeue_jobs"):
            await tq.requeue_jobs()
        assert (await tq.get_job("a")).status is S.RUNNING
        assert await tq.get_jobs(["b"]) == []

    async def test_order_is_priority_then_due_key_then_enqueue_order(
        self, tq: PoolQueue, clock: FakeClock
    ) -> None:
        await tq.enqueue_jobs(
            [
                Job(id="low-old", job_type="t", created_at=T0 - timedelta(hours=2), priority=-1),
                Job(id="zero-b", job_type="t", created_at=T0 - timedelta(minutes=1)),
                Job(id="zero-a", job_type="t", created_at=T0 - timedelta(minutes=1)),
                Job(id="high", job_type="t", priority=5),
                Job(id="zero-sched", job_type="t", scheduled_at=T0 - timedelta(hours=1)),
                Job(id="future", job_type="t", scheduled_at=T0 + timedelta(seconds=5), priority=9),
            ]
        )
        order = []
        async with tq.stream_jobs("w") as stream:
            for _ in range(5):
                (job,) = await asyncio.wait_for(stream.__anext__(), DEADLINE)
                order.append(job.id)
                await tq.complete_job(job.id, None)
        assert order == ["high", "zero-sched", "zero-b", "zero-a", "low-old"]
        assert (await tq.get_job("future")).status is S.INITIAL_PENDING

    async def test_a_scheduled_job_waits_and_its_stream_wakes_when_it_comes_due(
        self, tq: PoolQueue, clock: FakeClock
    ) -> None:
        await tq.enqueue_job(Job(id="later", job_type="t", scheduled_at=T0 + timedelta(minutes=5)))
        async with tq.stream_jobs("w", tags=None) as stream:
            waiting = asyncio.ensure_future(stream.__anext__())
            await assert_pending(waiting, 0.05)  # a scheduled job is never assigned early
            clock.advance(timedelta(minutes=4, seconds=59))
            await asyncio.sleep(0.05)
            assert not waiting.done(), "nor does it wake its stream early"
            clock.advance(timedelta(seconds=1))
            (job,) = await asyncio.wait_for(waiting, DEADLINE)
        assert job.id == "later"
        assert job.assigned_at == T0 + timedelta(minutes=5)
        assert job.attempts == 1

    async def test_fail_with_retry_in_schedules_the_next_run(
        self, tq: PoolQueue, clock: FakeClock
    ) -> None:
        await tq.enqueue_jobs([Job(id="a", job_type="t"), Job(id="b", job_type="t")])
        first = await claim_all(tq, 2)
        assert sorted(first) == ["a", "b"]
        await tq.fail_jobs({"a": ("boom", timedelta(seconds=30)), "b": "plain"})
        a, b = await tq.get_jobs(["a", "b"])
        assert a.status is S.FAILED_RETRY and a.scheduled_at == T0 + timedelta(seconds=30)
        assert (a.retry_count, a.last_retry_at, a.error_message) == (1, T0, "boom")
        assert b.scheduled_at is None, "no delay: no schedule"
        assert await claim_all(tq) == ["b"]
        clock.advance(29)
        assert await claim_all(tq, wait=NONE_DUE) == []
        clock.advance(1)
        assert await claim_all(tq) == ["a"]
        assert (await tq.get_job("a")).attempts == 2

    async def test_zero_retry_in_clears_an_earlier_schedule(
        self, tq: PoolQueue, clock: FakeClock
    ) -> None:
        await tq.enqueue_job(Job(id="a", job_type="t", scheduled_at=T0))
        await run_one(tq, "a")
        await tq.fail_job("a", "x", retry_in=timedelta(0))
        assert (await tq.get_job("a")).scheduled_at is None

    async def test_max_attempts_discards_a_job_that_keeps_failing(
        self, tq: PoolQueue, clock: FakeClock
    ) -> None:
        await tq.enqueue_job(Job(id="a", job_type="t", max_attempts=2, tags=["x"]))
        await run_one(tq, "a")
        await tq.fail_job("a", "one")
        assert (await tq.get_job("a")).status is S.FAILED_RETRY
        clock.advance(1)
        await run_one(tq, "a")
        clock.advance(1)
        await tq.fail_job("a", "two", retry_in=timedelta(hours=1))
        job = await tq.get_job("a")
        assert job.status is S.DISCARDED
        assert (job.attempts, job.retry_count, job.error_message) == (2, 2, "two")
        assert job.finalized_at == job.last_retry_at == T0 + timedelta(seconds=2)
        stats = await tq.get_job_stats(["x"])
        assert stats.discarded_jobs == 1 and stats.by_status[S.DISCARDED] == 1
        assert stats.failed_jobs == 0 and stats.stopped_jobs == 0
        assert (await tq.get_job_stats()).discarded_jobs == 1

    async def test_the_queue_policy_sets_delay_and_default_limit(
        self, make_backend: BackendFactory, clock: FakeClock
    ) -> None:
        policy = RetryPolicy(base=timedelta(seconds=10), factor=3, jitter=0, max_attempts=3)
        async with PoolQueue(make_backend(), clock=clock, retry=policy) as q:
            await q.enqueue_jobs(
                [Job(id="a", job_type="t"), Job(id="own", job_type="t", max_attempts=9)]
            )
            delays = []
            for _ in range(3):
                ids = await claim_all(q)
                assert "a" in ids
                await q.fail_jobs({i: "boom" for i in ids})
                job = await q.get_job("a")
                if job.status is S.DISCARDED:
                    break
                assert job.scheduled_at is not None
                delays.append(job.scheduled_at - clock.now())
                clock.set(job.scheduled_at)
            assert delays == [timedelta(seconds=10), timedelta(seconds=30)]
            assert (await q.get_job("a")).status is S.DISCARDED
            assert (await q.get_job("own")).status is S.FAILED_RETRY, "a job's own limit wins"

    async def test_discard_and_requeue(self, tq: PoolQueue, clock: FakeClock) -> None:
        await tq.enqueue_jobs([Job(id=i, job_type="t", max_attempts=1, tags=["g"]) for i in "abc"])
        assert sorted(await claim_all(tq, 3)) == ["a", "b", "c"]
        await tq.discard_job("a", "gave up")
        await tq.discard_jobs({"b": ""})
        await tq.stop_job("c")
        with pytest.raises(InvalidTransitionError):
            await tq.discard_job("a")
        a = await tq.get_job("a")
        assert (a.status, a.error_message, a.finalized_at) == (S.DISCARDED, "gave up", T0)
        clock.advance(5)
        later = clock.now() + timedelta(minutes=1)
        moved = await tq.requeue_jobs(tags=["g"], job_ids=["a", "missing"], scheduled_at=later)
        assert sorted(moved) == ["a", "b", "c"]
        a = await tq.get_job("a")
        assert (a.status, a.finalized_at, a.result, a.scheduled_at) == (
            S.FAILED_RETRY,
            None,
            None,
            later,
        )
        assert (a.attempts, a.retry_count) == (1, 0), "counters kept"
        assert await tq.requeue_jobs(job_ids=["a"]) == [], "only final jobs are requeued"
        assert await claim_all(tq, wait=NONE_DUE) == []
        clock.set(later)
        assert sorted(await claim_all(tq, 3)) == ["a", "b", "c"]
        await tq.fail_job("a", "again")
        assert (await tq.get_job("a")).status is S.DISCARDED, "a requeue grants one more run"

    async def test_update_job_status_to_discarded(self, tq: PoolQueue) -> None:
        await tq.enqueue_jobs([Job(id="a", job_type="t"), Job(id="p", job_type="t", priority=-5)])
        await run_one(tq, "a")
        await tq.update_job_status("a", S.DISCARDED, error_message="by hand")
        await tq.update_job_status("a", S.DISCARDED, error_message="again")
        job = await tq.get_job("a")
        assert (job.status, job.error_message) == (S.DISCARDED, "again")
        with pytest.raises(InvalidTransitionError):
            await tq.update_job_status("p", S.DISCARDED)
        with pytest.raises(InvalidTransitionError):
            await tq.update_job_status("a", S.FAILED_RETRY)

    async def test_cancel_treats_a_waiting_job_by_its_status(
        self, tq: PoolQueue, clock: FakeClock
    ) -> None:
        later = T0 + timedelta(hours=1)
        await tq.enqueue_jobs(
            [Job(id="new", job_type="t", scheduled_at=later), Job(id="retry", job_type="t")]
        )
        await run_one(tq, "retry")
        await tq.fail_job("retry", "x", retry_in=timedelta(hours=1))
        result = await tq.cancel_jobs(job_ids=["new", "retry"])
        assert sorted(result.cancelled) == ["new", "retry"]
        new, retry = await tq.get_jobs(["new", "retry"])
        assert (new.status, retry.status) == (S.UNSCHEDULED, S.STOPPED)
        clock.set(later)
        assert await claim_all(tq, wait=NONE_DUE) == []

    async def test_if_exists_ignore(self, tq: PoolQueue) -> None:
        await tq.enqueue_job(Job(id="a", job_type="old"))
        ids = await tq.enqueue_jobs(
            [Job(id="a", job_type="new"), Job(id="b", job_type="t"), Job(id="b", job_type="dup")],
            if_exists="ignore",
        )
        assert ids == ["b"]
        a, b = await tq.get_jobs(["a", "b"])
        assert (a.job_type, b.job_type) == ("old", "t")
        assert await tq.enqueue_jobs([Job(id="a", job_type="t")], if_exists="ignore") == []

    async def test_scheduled_jobs_survive_reopening(
        self, make_backend: BackendFactory, clock: FakeClock
    ) -> None:
        later = T0 + timedelta(minutes=1)
        async with PoolQueue(make_backend(), clock=clock) as q:
            await q.enqueue_job(Job(id="a", job_type="t", scheduled_at=later, priority=3))
        async with PoolQueue(make_backend(), clock=clock) as q:
            assert await claim_all(q, wait=NONE_DUE) == []
            async with q.stream_jobs("w") as stream:
                waiting = asyncio.ensure_future(stream.__anext__())
                await asyncio.sleep(0.05)
                assert not waiting.done()
                clock.set(later)
                (job,) = await asyncio.wait_for(waiting, DEADLINE)
            assert (job.id, job.priority, job.scheduled_at) == ("a", 3, later)

    async def test_a_waiting_stream_wakes_on_the_real_clock(
        self, make_backend: BackendFactory
    ) -> None:
        async with PoolQueue(make_backend()) as q:
            async with q.stream_jobs("w") as stream:
                waiting = asyncio.ensure_future(stream.__anext__())
                await asyncio.sleep(0.02)
                due = datetime.now(UTC) + timedelta(milliseconds=50)
                await q.enqueue_job(Job(id="soon", job_type="t", scheduled_at=due))
                (job,) = await asyncio.wait_for(waiting, DEADLINE)
            assert job.id == "soon"
            assert job.assigned_at is not None and job.assigned_at >= due
