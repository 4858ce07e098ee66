"""Claimed jobs moved in the ways a claim's record may be left behind by (LevelDB
format 6, 45333b2: a claim writes no record, its time sits in the job's assignee key)
read back, from a reopened store, exactly as the memory reference has them; on every
backend (reviewer, session 14).

* a job failed with no delay and claimed again by the same stream in the same
  refilling write (the same assignee key deleted and written again in one batch);
* a claimed job moved to CANCELLING, and updated RUNNING -> RUNNING (message only): the
  record is written, and the key must no longer hold a claim;
* then every job moved on from there (completion, acknowledgement), read again.

(PostgreSQL is left out: its refill cannot see the moves of its own statement, so the
first case does not arise there; docs/postgres.md.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from jobpool_async import Job, JobStatus, PoolQueue
from jobpool_async.backends import MemoryBackend
from jobpool_async.testing import BackendFactory, FakeClock, next_batch

S = JobStatus
START = datetime(2030, 1, 1, tzinfo=UTC)
IDS = ["a", "b", "c", "d"]


async def _claim_and_move(q: PoolQueue, clock: FakeClock) -> list[str]:
    await q.enqueue_jobs(
        [Job(id=i, job_type="t", tags=["x"], created_at=START + timedelta(seconds=n))
         for n, i in enumerate(IDS)]
    )  # fmt: skip
    stream = q.stream_jobs("w", tags=["x"], max_assigned_jobs=1)
    first = await next_batch(stream)
    assert [j.id for j in first] == ["a"]
    clock.advance(timedelta(seconds=1))
    await q.fail_jobs({"a": ("again", timedelta(0))})  # the refill takes "a" again
    again = await next_batch(stream)
    other = q.stream_jobs("v", tags=["x"], max_assigned_jobs=3)
    clock.advance(timedelta(seconds=1))
    rest = await next_batch(other)
    clock.advance(timedelta(seconds=1))
    await q.cancel_jobs(job_ids=["b"])
    clock.advance(timedelta(seconds=1))
    await q.update_job_status("c", S.RUNNING, error_message="noted")
    return [j.id for j in again] + sorted(j.id for j in rest)


async def _finish(q: PoolQueue, clock: FakeClock) -> None:
    clock.advance(timedelta(seconds=1))
    await q.complete_jobs({"a": b"1", "c": b"3", "d": None})
    clock.advance(timedelta(seconds=1))
    await q.acknowledge_cancellation({"b": True})


async def _same(q: PoolQueue, reference: PoolQueue) -> None:
    got, want = await q.get_jobs(IDS), await reference.get_jobs(IDS)
    for a, b in zip(got, want, strict=True):
        assert a == b, f"stored {a!r}\nreference {b!r}"
    assert await q.get_job_stats(["x"]) == await reference.get_job_stats(["x"])
    for status in S:
        listed = await q.list_jobs(statuses=[status], tags=["x"])
        want_listed = await reference.list_jobs(statuses=[status], tags=["x"])
        assert listed.jobs == want_listed.jobs, status


async def test_claims_moved_every_way_read_back_from_a_reopened_store(
    make_backend: BackendFactory, backend_name: str
) -> None:
    if backend_name == "postgres":
        pytest.skip("PostgreSQL's refill cannot take a job its own statement moved (docs)")
    ref_clock, clock = FakeClock(START), FakeClock(START)
    steps: list[Callable[[PoolQueue, FakeClock], Awaitable[Any]]] = [_claim_and_move, _finish]
    async with PoolQueue(MemoryBackend(), clock=ref_clock, lease=None) as reference:
        for step in steps:
            want = await step(reference, ref_clock)
            queue = PoolQueue(make_backend(), clock=clock, lease=None)
            async with queue:
                assert await step(queue, clock) == want
                await _same(queue, reference)
            async with PoolQueue(make_backend(), clock=clock, lease=None) as reopened:
                await _same(reopened, reference)
