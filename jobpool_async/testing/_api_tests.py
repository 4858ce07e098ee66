"""Submitting, reading, stats, deletion and cleanup (SPEC §1, §3) through a queue."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest

from jobpool_async import (
    DuplicateJobError,
    Job,
    JobsNotFinalError,
    JobStatus,
    PoolQueue,
    QueueClosedError,
)

from ._clock import FakeClock
from ._helpers import DEADLINE, job_in, take
from ._types import BackendFactory

S = JobStatus


MANY_TAGS = 5000


class QueueApiTests:
    async def test_enqueue_and_get_round_trip_every_field(self, queue: PoolQueue) -> None:
        created = datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=UTC)
        job = Job(
            id="ünïcødé/id:with|separators 'quotes' \"double\"",
            job_type="render",
            job_definition=bytes(range(256)) * 3,
            tags=["b", "a", "b", "with space", "ταγ"],
            created_at=created,
        )
        assert await queue.enqueue_job(job) == job.id
        got = await queue.get_job(job.id)
        assert got.id == job.id
        assert got.job_type == "render"
        assert got.job_definition == bytes(range(256)) * 3
        assert sorted(got.tags) == sorted(["a", "b", "with space", "ταγ"]), "duplicates collapse"
        assert got.status is S.INITIAL_PENDING
        assert got.created_at == created and got.created_at.tzinfo is not None
        assert got.created_at.utcoffset() == timedelta(0)
        assert (got.started_at, got.finalized_at, got.last_retry_at, got.assigned_at) == (
            None,
            None,
            None,
            None,
        )
        assert (got.error_message, got.result, got.retry_count, got.assignee_id) == (
            "",
            None,
            0,
            "",
        )

    async def test_enqueue_keeps_history_fields_and_orders_by_them(self, queue: PoolQueue) -> None:
        """A job enqueued with history fields set (a re-import, say) keeps every one of
        them, beside a fresh job in the same batch, and is selected by ``last_retry_at``."""
        t = datetime(2024, 1, 1, 8, 0, 0, 7, tzinfo=UTC)
        fresh = Job(id="fresh", job_type="t", tags=["x"], created_at=t + timedelta(seconds=2))
        imported = Job(
            id="imported",
            job_type="t",
            job_definition=b"def",
            tags=["x", "y"],
            created_at=t + timedelta(seconds=3),
            started_at=t,
            finalized_at=t + timedelta(microseconds=1),
            error_message="failed before",
            result=b"partial",
            retry_count=2,
            last_retry_at=t + timedelta(seconds=1),
            assignee_id="old-worker",
            assigned_at=t + timedelta(microseconds=5),
        )
        await queue.enqueue_jobs([fresh, imported])
        got = await queue.get_job("imported")
        assert got == imported
        async with queue.stream_jobs("w", tags=["x"], max_assigned_jobs=1) as stream:
            (first,) = await asyncio.wait_for(stream.__anext__(), DEADLINE)
        assert first.id == "imported", "oldest by last_retry_at goes first"
        assert first.status is JobStatus.RUNNING and first.assignee_id == "w"
        assert first.started_at == t, "a job that ran before keeps its first start"
        assert (first.result, first.retry_count, first.error_message) == (
            b"partial",
            2,
            "failed before",
        )
        assert first.last_retry_at == t + timedelta(seconds=1)
        assert await queue.get_job("imported") == first

    async def test_timestamps_keep_microseconds_and_become_utc(self, queue: PoolQueue) -> None:
        plus_two = timezone(timedelta(hours=2))
        local = datetime(2030, 1, 1, 12, 0, 0, 1, tzinfo=plus_two)
        await queue.enqueue_job(Job(id="tz", job_type="t", created_at=local))
        got = await queue.get_job("tz")
        assert got.created_at == local
        assert got.created_at.utcoffset() == timedelta(0)
        assert got.created_at.microsecond == 1
        running = await take(queue, "tz2")
        stored = await queue.get_job("tz2")
        assert stored.assigned_at == running.assigned_at
        assert stored.started_at == running.started_at
        assert stored.assigned_at is not None and stored.assigned_at.tzinfo is not None

    @pytest.mark.parametrize(
        "when",
        [
            datetime.min.replace(tzinfo=UTC),
            datetime.min.replace(tzinfo=UTC) + timedelta(microseconds=1),
            datetime.max.replace(tzinfo=UTC),
            datetime.max.replace(tzinfo=UTC) - timedelta(microseconds=1),
        ],
        ids=["min", "min+1us", "max", "max-1us"],
    )
    async def test_extreme_datetimes_round_trip_exactly_as_utc(
        self, queue: PoolQueue, when: datetime
    ) -> None:
        """The first and last representable instants (PostgreSQL stores them as
        ±infinity) come back equal and timezone-aware, in every field, and are
        selected in order."""
        job = Job(
            id="extreme",
            job_type="t",
            tags=["x"],
            created_at=when,
            started_at=when,
            finalized_at=when,
            last_retry_at=when,
            assigned_at=when,
        )
        ordinary = datetime(2024, 1, 1, tzinfo=UTC)
        other = Job(id="ordinary", job_type="t", tags=["x"], created_at=ordinary)
        await queue.enqueue_jobs([job, other])
        got = await queue.get_job("extreme")
        assert got == job
        for value in (got.created_at, got.started_at, got.finalized_at, got.last_retry_at):
            assert value is not None and value.utcoffset() == timedelta(0)
        assert got.assigned_at is not None and got.assigned_at.utcoffset() == timedelta(0)
        async with queue.stream_jobs("w", tags=["x"], max_assigned_jobs=1) as stream:
            (first,) = await asyncio.wait_for(stream.__anext__(), DEADLINE)
        assert first.id == ("extreme" if when.year == 1 else "ordinary")
        if first.id == "extreme":
            assert (first.created_at, first.started_at, first.last_retry_at) == (when, when, when)
            assert first.created_at.utcoffset() == timedelta(0)

    async def test_enqueue_jobs_returns_ids_in_order_and_is_all_or_nothing(
        self, queue: PoolQueue
    ) -> None:
        ids = await queue.enqueue_jobs([Job(id=f"j{i}", job_type="t") for i in (3, 1, 2)])
        assert ids == ["j3", "j1", "j2"]
        with pytest.raises(DuplicateJobError):
            await queue.enqueue_jobs([Job(id="new1", job_type="t"), Job(id="j1", job_type="t")])
        assert await queue.get_jobs(["new1"]) == []
        with pytest.raises(DuplicateJobError):
            await queue.enqueue_jobs([Job(id="twice", job_type="t"), Job(id="twice", job_type="t")])
        assert await queue.get_jobs(["twice"]) == []
        with pytest.raises(DuplicateJobError):
            await queue.enqueue_job(Job(id="j3", job_type="t"))
        assert (await queue.get_job_stats()).total_jobs == 3

    async def test_get_jobs_in_input_order_skipping_missing(self, queue: PoolQueue) -> None:
        await queue.enqueue_jobs([Job(id=i, job_type="t") for i in "abc"])
        got = await queue.get_jobs(["c", "zz", "a", "b"])
        assert [j.id for j in got] == ["c", "a", "b"]
        assert await queue.get_jobs([]) == []

    async def test_returned_jobs_are_snapshots(self, queue: PoolQueue) -> None:
        original = Job(id="snap", job_type="t", tags=["a"])
        await queue.enqueue_job(original)
        original.tags.append("mutated-after-enqueue")
        got = await queue.get_job("snap")
        got.tags.append("x")
        got.status = S.COMPLETED
        again = await queue.get_job("snap")
        assert again.tags == ["a"]
        assert again.status is S.INITIAL_PENDING

    async def test_stats_count_every_status_with_tag_and_filter(self, queue: PoolQueue) -> None:
        for status in S:
            await job_in(queue, status)
        await queue.enqueue_jobs(
            [
                Job(id="t1", job_type="t", tags=["red", "big"]),
                Job(id="t2", job_type="t", tags=["red"]),
                Job(id="t3", job_type="t", tags=["big"]),
            ]
        )
        stats = await queue.get_job_stats()
        assert stats.total_jobs == 13
        assert set(stats.by_status) == set(S)
        assert stats.discarded_jobs == stats.by_status[S.DISCARDED] == 1
        assert stats.by_status[S.INITIAL_PENDING] == 4
        assert stats.pending_jobs == 4
        assert stats.running_jobs == 2
        assert stats.completed_jobs == 1
        assert stats.stopped_jobs == 3
        assert stats.failed_jobs == 2
        assert stats.total_retries == 1
        assert stats.tags == []
        red_big = await queue.get_job_stats(["red", "big"])
        assert (red_big.total_jobs, red_big.tags) == (1, ["red", "big"])
        assert (await queue.get_job_stats(["red"])).total_jobs == 2
        assert (await queue.get_job_stats(["nothing-has-this"])).total_jobs == 0
        assert (await queue.get_job_stats(["Red"])).total_jobs == 0, "tags are case-sensitive"
        assert (await queue.get_job_stats([])).total_jobs == 13

    async def test_filters_of_thousands_of_tags_work_everywhere(self, queue: PoolQueue) -> None:
        """Stats, claim, cancel and delete with a 5,000-tag filter select exactly the
        jobs carrying every one of those tags."""
        tags = [f"tag-{i}" for i in range(MANY_TAGS)]
        await queue.enqueue_jobs(
            [
                Job(id="all", job_type="t", tags=tags),
                Job(id="all-too", job_type="t", tags=[*reversed(tags), "extra"]),
                Job(id="all-but-one", job_type="t", tags=tags[:-1]),
                Job(id="untagged", job_type="t"),
            ]
        )
        stats = await queue.get_job_stats(tags)
        assert (stats.total_jobs, stats.pending_jobs) == (2, 2)
        async with queue.stream_jobs("w", tags=tags, max_assigned_jobs=1) as stream:
            (first,) = await asyncio.wait_for(stream.__anext__(), DEADLINE)
            assert first.id == "all"
            cancelled = await queue.cancel_jobs(tags=tags)
            assert sorted(cancelled.cancelled) == ["all", "all-too"]
            assert cancelled.unknown == []
            with pytest.raises(JobsNotFinalError) as caught:
                await queue.delete_jobs(tags=tags)
            assert caught.value.job_ids == ["all"]
            await queue.acknowledge_cancellation({"all": False})
        assert await queue.delete_jobs(tags=tags) == 2
        left = await queue.get_jobs(["all", "all-too", "all-but-one", "untagged"])
        assert [j.id for j in left] == ["all-but-one", "untagged"]
        assert (await queue.get_job_stats(tags)).total_jobs == 0

    async def test_hostile_tags_match_exactly(self, queue: PoolQueue) -> None:
        tags = ["a/b", "a", "a%", "_", "'; DROP TABLE jobs; --", "x" * 5000, "a,b", '"q"', "%"]
        await queue.enqueue_jobs(
            [Job(id=f"h{i}", job_type="t", tags=[t]) for i, t in enumerate(tags)]
        )
        for i, tag in enumerate(tags):
            stats = await queue.get_job_stats([tag])
            assert stats.total_jobs == 1, tag
            async with queue.stream_jobs("w", tags=[tag]) as stream:
                (got,) = await stream.__anext__()
            assert got.id == f"h{i}"

    async def test_delete_jobs_only_when_all_selected_are_final(self, queue: PoolQueue) -> None:
        done = await job_in(queue, S.COMPLETED)
        stopped = await job_in(queue, S.STOPPED)
        running = await job_in(queue, S.RUNNING)
        pending = await job_in(queue, S.INITIAL_PENDING)
        with pytest.raises(JobsNotFinalError) as info:
            await queue.delete_jobs(job_ids=[done, running, pending, "missing"])
        assert sorted(info.value.job_ids) == sorted([running, pending])
        assert len(await queue.get_jobs([done, running, pending])) == 3, "nothing deleted"
        assert await queue.delete_jobs(job_ids=[done, stopped, "missing"]) == 2
        assert await queue.get_jobs([done, stopped]) == []
        assert await queue.delete_jobs(job_ids=["missing"]) == 0

    async def test_delete_by_tags(self, queue: PoolQueue) -> None:
        await queue.enqueue_jobs(
            [Job(id="d1", job_type="t", tags=["old"]), Job(id="d2", job_type="t", tags=["old"])]
        )
        await queue.cancel_jobs(job_ids=["d1"])
        with pytest.raises(JobsNotFinalError) as info:
            await queue.delete_jobs(tags=["old"])
        assert info.value.job_ids == ["d2"]
        await queue.cancel_jobs(tags=["old"])
        assert await queue.delete_jobs(tags=["old"]) == 2
        assert (await queue.get_job_stats()).total_jobs == 0

    async def test_deleted_id_can_be_reused(self, queue: PoolQueue) -> None:
        await job_in(queue, S.COMPLETED, "reuse")
        await queue.delete_jobs(job_ids=["reuse"])
        await queue.enqueue_job(Job(id="reuse", job_type="again"))
        job = await queue.get_job("reuse")
        assert (job.job_type, job.status, job.result) == ("again", S.INITIAL_PENDING, None)

    async def test_cleanup_expired_deletes_only_old_completed(self, queue: PoolQueue) -> None:
        done = await job_in(queue, S.COMPLETED)
        stopped = await job_in(queue, S.STOPPED)
        assert await queue.cleanup_expired_jobs(timedelta(hours=1)) == 0
        assert await queue.cleanup_expired_jobs(timedelta(microseconds=1)) == 1
        assert await queue.get_jobs([done]) == []
        assert len(await queue.get_jobs([stopped])) == 1

    async def test_cleanup_cutoff_is_inclusive(self, make_backend: BackendFactory) -> None:
        """A job finalized exactly ``ttl`` ago is expired; one finalized a microsecond
        later is not (a controlled clock, no sleeping)."""
        clock = FakeClock(datetime(2030, 1, 1, tzinfo=UTC))
        async with PoolQueue(make_backend(), clock=clock) as queue:
            done = await job_in(queue, S.COMPLETED)
            finalized = (await queue.get_job(done)).finalized_at
            assert finalized == clock.now()
            ttl = timedelta(minutes=5)
            clock.advance(ttl - timedelta(microseconds=1))
            assert await queue.cleanup_expired_jobs(ttl) == 0
            assert len(await queue.get_jobs([done])) == 1
            clock.advance(timedelta(microseconds=1))
            assert await queue.cleanup_expired_jobs(ttl) == 1
            assert await queue.get_jobs([done]) == []

    async def test_store_survives_reopen(self, make_backend: BackendFactory) -> None:
        first = PoolQueue(make_backend())
        async with first:
            ids = [await job_in(first, status) for status in S]
            before = await first.get_jobs(ids)
        async with PoolQueue(make_backend()) as second:
            assert await second.get_jobs(ids) == before

    async def test_calls_on_closed_queue_raise(self, queue: PoolQueue) -> None:
        await queue.enqueue_job(Job(id="x", job_type="t"))
        await queue.close()
        await queue.close()  # idempotent
        with pytest.raises(QueueClosedError):
            await queue.get_job("x")
        with pytest.raises(QueueClosedError):
            await queue.enqueue_job(Job(id="y", job_type="t"))
        with pytest.raises(QueueClosedError):
            queue.stream_jobs("w")
        with pytest.raises(QueueClosedError):
            await queue.get_job_stats()
