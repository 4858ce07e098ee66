"""PostgreSQL calls driven in their caller's task (``_carry_calls``, session 13): a
caller's own ``asyncio.timeout`` around a call blocked in the server (a row lock held
by another session) raises ``TimeoutError`` in the caller, not in the call, which
goes on and commits once the lock goes; the caller's task is left with no pending
cancellation; the stream's slot frees and refills. And a call waiting for a pooled
connection (every one busy) whose caller gives up goes on once one frees, its claimed
jobs handed over or given back, no connection leaked.

(Reviewer, session 13.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from jobpool_async import Job, JobStatus, PoolQueue

from .backends import drop_postgres_schema, new_schema_name, postgres_dsn
from .test_carry_cancel import _nothing_stranded

asyncpg = pytest.importorskip("asyncpg")

from jobpool_async.backends.postgres import PostgresBackend  # noqa: E402
from jobpool_async.testing import DEADLINE, next_batch  # noqa: E402

S = JobStatus


@pytest.fixture
async def pg() -> AsyncIterator[tuple[str, str]]:
    dsn = postgres_dsn()
    schema = new_schema_name()
    yield dsn, schema
    await drop_postgres_schema(schema)


async def _locked_by_other(conn: Any, backend: PostgresBackend) -> None:
    """Until a session of ``backend`` waits for a row lock (polled, with a deadline)."""
    async with asyncio.timeout(DEADLINE):
        while True:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
                " AND wait_event_type = 'Lock'",
                backend.application_name,
            )
            if waiting:
                return
            await asyncio.sleep(0)


async def _becomes(queue: PoolQueue, job_id: str, status: JobStatus) -> None:
    async with asyncio.timeout(DEADLINE):
        while (await queue.get_job(job_id)).status is not status:  # noqa: ASYNC110
            await asyncio.sleep(0)


@pytest.mark.parametrize("consumer", [True, False], ids=["refilling", "plain"])
async def test_a_callers_timeout_around_a_blocked_completion(
    pg: tuple[str, str], consumer: bool
) -> None:
    dsn, schema = pg
    backend = PostgresBackend(dsn, schema=schema)
    queue = PoolQueue(backend, lease=None, poll_interval=3600)
    await queue.open()
    other = await asyncpg.connect(dsn)
    try:
        ids = ["b0", "b1", "b2"]
        await queue.enqueue_jobs([Job(id=i, job_type="t") for i in ids])
        stream = queue.stream_jobs("w", max_assigned_jobs=1)
        (first,) = await next_batch(stream)
        assert first.id == "b0"
        if not consumer:
            stream._refills = False  # (a plain observed apply: no refill)
        tx = other.transaction()
        await tx.start()
        await other.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = $1 FOR UPDATE', "b0")
        scopes: list[asyncio.Timeout] = []
        after: list[int] = []

        async def caller() -> None:
            try:
                async with asyncio.timeout(None) as scope:
                    scopes.append(scope)
                    await queue.complete_jobs({"b0": b"done"})
            finally:
                task = asyncio.current_task()
                assert task is not None
                after.append(task.cancelling())
                await asyncio.sleep(0)  # (the task goes on: nothing pending for it)

        calling = asyncio.ensure_future(caller())
        await _locked_by_other(other, backend)
        scopes[0].reschedule(asyncio.get_running_loop().time())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(calling, DEADLINE)
        assert after == [0]
        assert (await queue.get_job("b0")).status is S.RUNNING  # still blocked
        await tx.rollback()
        # the call went on: it commits once the lock goes, its move is seen
        await _becomes(queue, "b0", S.COMPLETED)
        assert (await queue.get_job("b0")).result == b"done"
        (second,) = await asyncio.wait_for(next_batch(stream), DEADLINE)
        assert second.id == "b1"
        await queue.complete_jobs({"b1": b""})
        (third,) = await asyncio.wait_for(next_batch(stream), DEADLINE)
        assert third.id == "b2"
        await asyncio.wait_for(stream.aclose(), DEADLINE)
        stats = await queue.get_job_stats()
        assert (stats.completed_jobs, stats.running_jobs) == (2, 1), stats
    finally:
        await other.close()
        await queue.close()


@pytest.mark.parametrize("what", ["claim", "refill"])
async def test_a_call_waiting_for_a_connection_whose_caller_gives_up(
    pg: tuple[str, str], what: str
) -> None:
    dsn, schema = pg
    backend = PostgresBackend(dsn, schema=schema, pool_min_size=1, pool_max_size=3)
    queue = PoolQueue(backend, lease=None, poll_interval=3600)
    await queue.open()
    pool: Any = backend._pool
    held: list[Any] = []
    try:
        ids = [f"q{i}" for i in range(4)]
        await queue.enqueue_jobs([Job(id=i, job_type="t") for i in ids])
        stream = queue.stream_jobs("w", max_assigned_jobs=2)
        first: list[Job] = []
        if what == "refill":
            first = await next_batch(stream)
        # every connection busy: nothing kept, the pool's all taken
        kept, backend._hot = backend._hot, []
        for conn in kept:
            await pool.release(conn)
        for _ in range(3):
            held.append(await asyncio.wait_for(pool.acquire(), DEADLINE))
        call: asyncio.Future[Any]
        if what == "claim":
            call = asyncio.ensure_future(stream.__anext__())
        else:
            call = asyncio.ensure_future(queue.complete_jobs({j.id: b"" for j in first}))
        async with asyncio.timeout(DEADLINE):  # until the call waits in the pool
            while not pool._queue._getters:  # noqa: ASYNC110 - polling with a deadline
                await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(call, DEADLINE)
        for conn in held:
            await pool.release(conn)
        held.clear()
        handed = {j.id for j in first}
        if what == "refill":
            # the completion went on once a connection freed, and its refill is the
            # stream's next batch
            await _becomes(queue, first[0].id, S.COMPLETED)
            await _becomes(queue, first[1].id, S.COMPLETED)
            nxt = await asyncio.wait_for(next_batch(stream), DEADLINE)
            assert sorted(j.id for j in nxt) == ["q2", "q3"]
            handed |= {j.id for j in nxt}
        else:
            # the claim went on; its jobs come back as the stream gives them back
            async with asyncio.timeout(DEADLINE):
                while True:
                    jobs = await queue.get_jobs(ids)
                    if S.RUNNING not in {j.status for j in jobs}:
                        break
                    await asyncio.sleep(0)
            _nothing_stranded(jobs, handed)
            again = await asyncio.wait_for(next_batch(stream), DEADLINE)
            assert len(again) == 2
            handed |= {j.id for j in again}
        await asyncio.wait_for(stream.aclose(), DEADLINE)
        _nothing_stranded(await queue.get_jobs(ids), handed)
        # no connection leaked: the pool hands out all of them again
        kept, backend._hot = backend._hot, []
        for conn in kept:
            await pool.release(conn)
        for _ in range(3):
            held.append(await asyncio.wait_for(pool.acquire(), DEADLINE))
    finally:
        for conn in held:
            await pool.release(conn)
        await queue.close()
