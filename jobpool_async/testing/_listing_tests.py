"""``list_jobs`` pages and ``wait_for`` (SPEC §9) through a queue."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import pytest

from jobpool_async import Job, JobNotFoundError, JobPage, JobStatus, PoolQueue
from jobpool_async.backends.base import ELIGIBLE

from ._helpers import DEADLINE, job_in, take

S = JobStatus


T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _expected(jobs: list[Job]) -> list[str]:
    """Newest first by created_at, then id (descending, by code point)."""
    return [j.id for j in sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)]


async def _all_pages(queue: PoolQueue, limit: int, **filters: object) -> list[str]:
    ids: list[str] = []
    after: str | None = None
    for _ in range(1000):
        page = await queue.list_jobs(limit=limit, after=after, **filters)  # type: ignore[arg-type]
        assert isinstance(page, JobPage)
        assert len(page.jobs) <= limit
        ids += [j.id for j in page.jobs]
        if page.next_after is None:
            return ids
        assert len(page.jobs) == limit, "only a full page has a next page"
        after = page.next_after
    raise AssertionError("paging did not end")


class ListingTests:
    async def test_pages_walk_every_job_newest_first_with_ties_broken_by_id(
        self,
        queue: PoolQueue,
    ) -> None:
        rng = random.Random(7)
        jobs = [
            Job(
                id=f"j{i:03d}-{rng.choice('abc')}",
                job_type=rng.choice(["render", "mail"]),
                tags=rng.sample(["red", "green", "blue"], rng.randint(0, 2)),
                # many ties on created_at, in an order unrelated to enqueue order
                created_at=T0 + timedelta(seconds=rng.randint(0, 9)),
            )
            for i in range(57)
        ]
        rng.shuffle(jobs)
        await queue.enqueue_jobs(jobs)
        for limit in (1, 7, 57, 100):
            assert await _all_pages(queue, limit) == _expected(jobs)
        first = await queue.list_jobs(limit=100)
        assert first.next_after is None and len(first.jobs) == 57
        assert first.jobs[0].job_definition == b"" and first.jobs[0].status is S.INITIAL_PENDING

    async def test_filters_match_like_stats(self, queue: PoolQueue) -> None:
        rng = random.Random(11)
        jobs = [
            Job(
                id=f"f{i:03d}",
                job_type=rng.choice(["render", "mail", "odd/type 'x'"]),
                tags=rng.sample(["red", "green", "blue", "a b"], rng.randint(0, 3)),
                created_at=T0 + timedelta(milliseconds=rng.randint(0, 50)),
            )
            for i in range(80)
        ]
        await queue.enqueue_jobs(jobs)
        # move some through their life so statuses differ
        cancelled = [j.id for j in jobs[:10]]
        await queue.cancel_jobs(job_ids=cancelled)
        status_of = {j.id: S.UNSCHEDULED if j.id in cancelled else S.INITIAL_PENDING for j in jobs}

        def expect(
            statuses: set[JobStatus] | None, tags: list[str], job_type: str | None
        ) -> list[str]:
            return _expected(
                [
                    j
                    for j in jobs
                    if (statuses is None or status_of[j.id] in statuses)
                    and set(tags).issubset(j.tags)
                    and (job_type is None or j.job_type == job_type)
                ]
            )

        cases: list[tuple[set[JobStatus] | None, list[str], str | None]] = [
            ({S.UNSCHEDULED}, [], None),
            ({S.UNSCHEDULED, S.INITIAL_PENDING}, [], None),
            ({S.COMPLETED}, [], None),
            (None, ["red"], None),
            (None, ["red", "blue"], None),
            (None, ["a b"], "mail"),
            (None, [], "odd/type 'x'"),
            (None, [], "nope"),
            (None, ["no-such-tag"], None),
            ({S.INITIAL_PENDING}, ["green"], "render"),
            ({S.UNSCHEDULED}, ["green"], None),
        ]
        for statuses, tags, job_type in cases:
            for limit in (3, 100):
                got = await _all_pages(
                    queue, limit, statuses=statuses, tags=tags or None, job_type=job_type
                )
                assert got == expect(statuses, tags, job_type), (statuses, tags, job_type, limit)

    async def test_a_page_reflects_status_moves_and_deletes(self, queue: PoolQueue) -> None:
        done = await job_in(queue, S.COMPLETED)
        running = await job_in(queue, S.RUNNING)
        page = await queue.list_jobs(statuses=[S.RUNNING])
        assert [j.id for j in page.jobs] == [running]
        assert page.jobs[0].assignee_id
        page = await queue.list_jobs(statuses=[S.COMPLETED])
        assert [j.id for j in page.jobs] == [done]
        await queue.delete_jobs(job_ids=[done])
        assert (await queue.list_jobs(statuses=[S.COMPLETED])).jobs == []
        assert [j.id for j in (await queue.list_jobs()).jobs] == [running]

    async def test_cursor_survives_deletion_of_its_job(self, queue: PoolQueue) -> None:
        jobs = [
            Job(id=f"c{i}", job_type="t", created_at=T0 + timedelta(seconds=i)) for i in range(5)
        ]
        await queue.enqueue_jobs(jobs)
        page = await queue.list_jobs(limit=2)
        assert [j.id for j in page.jobs] == ["c4", "c3"]
        await queue.cancel_jobs(job_ids=["c3"])
        await queue.delete_jobs(job_ids=["c3"])
        rest = await queue.list_jobs(limit=10, after=page.next_after)
        assert [j.id for j in rest.jobs] == ["c2", "c1", "c0"]

    async def test_bad_arguments_are_refused_before_reading(self, queue: PoolQueue) -> None:
        with pytest.raises(ValueError, match="limit"):
            await queue.list_jobs(limit=0)
        with pytest.raises(TypeError, match="limit"):
            await queue.list_jobs(limit="10")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="status"):
            await queue.list_jobs(statuses=["nope"])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="cursor"):
            await queue.list_jobs(after="not a cursor")
        with pytest.raises(ValueError, match="tag"):
            await queue.list_jobs(tags=[""])
        with pytest.raises(TypeError, match="job_type"):
            await queue.list_jobs(job_type=3)  # type: ignore[arg-type]

    async def test_wait_for_returns_when_a_final_status_is_reached(self, queue: PoolQueue) -> None:
        job = await take(queue, "waited")
        waiter = asyncio.create_task(queue.wait_for(job.id, timeout=DEADLINE))
        await asyncio.sleep(0)
        assert not waiter.done()
        await queue.complete_job(job.id, b"ok")
        got = await waiter
        assert got.status is S.COMPLETED and got.result == b"ok"

    async def test_wait_for_other_statuses_and_an_already_reached_one(
        self, queue: PoolQueue
    ) -> None:
        await queue.enqueue_job(Job(id="w2", job_type="t", tags=["w2"]))
        assert (
            await queue.wait_for("w2", statuses=[S.INITIAL_PENDING])
        ).status is S.INITIAL_PENDING
        waiter = asyncio.create_task(queue.wait_for("w2", statuses=[S.RUNNING], timeout=DEADLINE))
        async with queue.stream_jobs("a", tags=["w2"]) as stream:
            await asyncio.wait_for(stream.__anext__(), DEADLINE)
            got = await waiter
            assert got.status is S.RUNNING and got.assignee_id == "a"

    async def test_wait_for_times_out_naming_the_status(self, queue: PoolQueue) -> None:
        await queue.enqueue_job(Job(id="slow", job_type="t"))
        # long enough for the first read to finish on a loaded machine (the message
        # names the status the waiter last read; it times out all the same)
        with pytest.raises(TimeoutError, match=r"within 0\.5 s; it is INITIAL_PENDING"):
            await queue.wait_for("slow", timeout=0.5)

    async def test_wait_for_missing_or_deleted_job(self, queue: PoolQueue) -> None:
        with pytest.raises(JobNotFoundError):
            await queue.wait_for("never", timeout=DEADLINE)
        await queue.enqueue_job(Job(id="gone", job_type="t"))
        waiter = asyncio.create_task(
            queue.wait_for("gone", statuses=[S.COMPLETED], timeout=DEADLINE)
        )
        await asyncio.sleep(0.01)
        await queue.cancel_jobs(job_ids=["gone"])  # UNSCHEDULED: not what it waits for
        await queue.delete_jobs(job_ids=["gone"])
        with pytest.raises(JobNotFoundError):
            await waiter

    async def test_many_waiters_on_many_jobs(self, queue: PoolQueue) -> None:
        ids = [f"m{i}" for i in range(20)]
        await queue.enqueue_jobs([Job(id=i, job_type="t", tags=["many"]) for i in ids])
        waiters = [
            asyncio.create_task(queue.wait_for(i, timeout=DEADLINE)) for i in ids for _ in "ab"
        ]
        async with queue.stream_jobs("w", tags=["many"], max_assigned_jobs=20) as stream:
            taken: list[str] = []
            while len(taken) < 20:
                taken += [j.id for j in await asyncio.wait_for(stream.__anext__(), DEADLINE)]
            await queue.complete_jobs({i: b"" for i in taken})
        done = await asyncio.gather(*waiters)
        assert {j.id for j in done} == set(ids)
        assert all(j.status is S.COMPLETED for j in done)

    async def test_many_tags_and_extreme_times(self, queue: PoolQueue) -> None:
        tags = [f"t{i}" for i in range(600)]
        low = datetime.min.replace(tzinfo=UTC)
        high = datetime.max.replace(tzinfo=UTC)
        await queue.enqueue_jobs(
            [
                Job(id="low", job_type="t", tags=tags, created_at=low),
                Job(id="high", job_type="t", tags=tags, created_at=high),
                Job(id="mid", job_type="t", tags=tags[:1], created_at=T0),
            ]
        )
        assert await _all_pages(queue, 1, tags=tags) == ["high", "low"]
        assert await _all_pages(queue, 1) == ["high", "mid", "low"]
        assert await _all_pages(queue, 2, statuses=[S.INITIAL_PENDING]) == ["high", "mid", "low"]
        page = await queue.list_jobs(limit=1)
        assert page.jobs[0].created_at == high

    async def test_oldest_created_per_status_set(self, queue: PoolQueue) -> None:
        backend = queue.backend
        assert await backend.oldest_created(ELIGIBLE) is None
        await queue.enqueue_jobs(
            [Job(id=f"o{i}", job_type="t", created_at=T0 + timedelta(minutes=i)) for i in range(3)]
        )
        assert await backend.oldest_created(ELIGIBLE) == T0
        await queue.cancel_jobs(job_ids=["o0"])
        assert await backend.oldest_created(ELIGIBLE) == T0 + timedelta(minutes=1)
        assert await backend.oldest_created(frozenset({S.UNSCHEDULED})) == T0
        assert await backend.oldest_created(frozenset({S.COMPLETED})) is None

    async def test_running_cancelling_and_idle_statuses_page_together(
        self, queue: PoolQueue
    ) -> None:
        ids = {s: [await job_in(queue, s) for _ in range(3)] for s in (S.RUNNING, S.CANCELLING)}
        ids[S.COMPLETED] = [await job_in(queue, S.COMPLETED) for _ in range(3)]
        await queue.enqueue_job(Job(id="idle", job_type="t"))
        everything = [j.id for j in (await queue.list_jobs(limit=100)).jobs]
        for wanted in ([S.RUNNING], [S.CANCELLING, S.RUNNING], [S.RUNNING, S.COMPLETED]):
            got = await _all_pages(queue, 2, statuses=wanted)
            expected = [i for i in everything if any(i in ids[s] for s in wanted)]
            assert got == expected, wanted
        assert await queue.backend.oldest_created(frozenset({S.RUNNING})) is not None
