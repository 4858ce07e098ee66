"""Refilled jobs waiting in a stream (``_ready``) whose assignment another process
ended, unseen here, and that another stream of this queue then claims (c79ea78: a
stream hands its ``_ready`` jobs over unchecked unless it was told one may have left
it). Two queues on one store (SQLite file, PostgreSQL schema): the second marks the
first stream's worker unresponsive; the first queue's other stream then claims the
jobs, by its own claim or by its consumer's refilling completion. The first stream
must not hand them over: no job is ever assigned to two streams at once (SPEC §4).

(Reviewer, session 13.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from jobpool_async import Backend, Job, JobStatus, PoolQueue
from jobpool_async.testing import DEADLINE, next_batch

from .backends import backend_factory, drop_postgres_schema, new_schema_name

S = JobStatus


@pytest.fixture(params=["sqlite", "postgres"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Backend]]:
    name = str(request.param)
    schema = new_schema_name() if name == "postgres" else None
    yield backend_factory(name, tmp_path, schema)
    if schema is not None:
        await drop_postgres_schema(schema)


@pytest.mark.parametrize("taken_by", ["claim", "refill"])
async def test_ready_jobs_another_process_released_and_another_stream_claimed(
    store: Callable[[], Backend], taken_by: str
) -> None:
    here = PoolQueue(store(), lease=None, poll_interval=3600)
    there = PoolQueue(store(), lease=None, poll_interval=3600)
    await here.open()
    await there.open()
    try:
        b = here.stream_jobs("B", tags=["x"], max_assigned_jobs=2)
        if taken_by == "refill":
            await here.enqueue_jobs([Job(id="b0", job_type="t", tags=["x"])])
            assert [j.id for j in await next_batch(b)] == ["b0"]
        await here.enqueue_jobs([Job(id=f"a{i}", job_type="t") for i in range(2)])
        a = here.stream_jobs("A", max_assigned_jobs=2)
        assert sorted(j.id for j in await next_batch(a)) == ["a0", "a1"]
        await here.enqueue_jobs([Job(id=f"x{i}", job_type="t", tags=["x"]) for i in range(2)])
        # A's consumer completes its batch: the refill claims x0, x1 for A, where they
        # wait until A's next __anext__
        await here.complete_jobs({"a0": b"", "a1": b""})
        assert sorted(j.id for j in a._ready) == ["x0", "x1"]
        # another process: A's worker is gone (this queue is not told)
        assert await there.mark_worker_unresponsive("A") == 2
        # B takes x0, x1 (now UNKNOWN_RETRY, eligible) in this queue
        if taken_by == "claim":
            got = await asyncio.wait_for(next_batch(b), DEADLINE)
        else:
            await here.complete_jobs({"b0": b""})  # B's refill claims them
            got = await asyncio.wait_for(next_batch(b), DEADLINE)
        assert sorted(j.id for j in got) == ["x0", "x1"]
        jobs = await here.get_jobs(["x0", "x1"])
        assert {(j.status, j.assignee_id) for j in jobs} == {(S.RUNNING, "B")}, jobs
        # A must not hand them over too: its next batch is a new job only
        await here.enqueue_jobs([Job(id="z", job_type="t")])
        again = await asyncio.wait_for(next_batch(a), DEADLINE)
        assert [j.id for j in again] == ["z"], again
        assert sorted(a.assigned_job_ids) == ["z"]
        assert sorted(b.assigned_job_ids) == ["x0", "x1"]
        await a.aclose()
        await b.aclose()
    finally:
        await there.close()
        await here.close()
