"""Enqueueing inside the caller's own PostgreSQL transaction (#19 item 8).

``enqueue_jobs(jobs, connection=conn)``: the jobs exist if and only if the caller's
transaction commits; streams wake on the commit, in this process and in others
(``NOTIFY`` is transactional); a rollback leaves nothing. Queues use
``poll_interval=30``, so a wake-up within the deadline came from ``NOTIFY``.
Other backends refuse ``connection=`` with ``TypeError``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from jobpool_async import DuplicateJobError, Job, JobNotFoundError, JobStream, PoolQueue

from .backends import backend_factory
from .test_postgres import DEADLINE, expect, kill, open_queue, run_child


@pytest.fixture
async def queue(dsn: str, schema: str) -> AsyncIterator[PoolQueue]:
    q = await open_queue(dsn, schema)
    try:
        yield q
    finally:
        await q.close()


@pytest.fixture
async def app_pool(dsn: str, schema: str, queue: PoolQueue) -> AsyncIterator[asyncpg.Pool]:
    """The application's own pool, with a business table beside the queue's."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3)
    await pool.execute(f'CREATE TABLE "{schema}".orders (id text PRIMARY KEY)')
    try:
        yield pool
    finally:
        await pool.close()


async def orders(pool: asyncpg.Pool, schema: str) -> list[str]:
    return [r[0] for r in await pool.fetch(f'SELECT id FROM "{schema}".orders ORDER BY id')]


async def assert_waiting(task: asyncio.Future[list[Job]], for_seconds: float = 0.2) -> None:
    done, _ = await asyncio.wait({task}, timeout=for_seconds)
    assert not done, f"the stream woke before the commit: {task.result() if done else None}"


async def next_batch(stream: JobStream) -> list[str]:
    return [job.id for job in await asyncio.wait_for(stream.__anext__(), DEADLINE)]


async def test_jobs_appear_on_commit_and_wake_streams_here_and_in_another_process(
    dsn: str, schema: str, queue: PoolQueue, app_pool: asyncpg.Pool
) -> None:
    local = queue.stream_jobs("here")
    waiting = asyncio.ensure_future(local.__anext__())
    async with app_pool.acquire() as conn, conn.transaction():
        await conn.execute(f'INSERT INTO "{schema}".orders VALUES ($1)', "order-1")
        ids = await queue.enqueue_jobs([Job("mine", "ship")], connection=conn)
        assert ids == ["mine"]
        with pytest.raises(JobNotFoundError):  # not committed: no one else sees it
            await queue.get_job("mine")
        await assert_waiting(waiting)
    assert [job.id for job in await asyncio.wait_for(waiting, DEADLINE)] == ["mine"]
    assert await orders(app_pool, schema) == ["order-1"]

    # Another process's stream wakes on the commit as well ("mine" is held here).
    child = await run_child("hold", dsn, schema, "elsewhere", "2")
    try:
        await expect(child, "ready")
        async with app_pool.acquire() as conn, conn.transaction():
            await conn.execute(f'INSERT INTO "{schema}".orders VALUES ($1)', "order-2")
            await queue.enqueue_jobs([Job("a", "ship"), Job("b", "ship")], connection=conn)
        assert json.loads(await expect(child, "holding")) == ["a", "b"]
    finally:
        kill(child)
        await child.wait()
    await local.aclose()


async def test_a_rollback_leaves_nothing_and_wakes_nobody(
    dsn: str, schema: str, queue: PoolQueue, app_pool: asyncpg.Pool
) -> None:
    stream = queue.stream_jobs("w")
    waiting = asyncio.ensure_future(stream.__anext__())
    conn = await asyncpg.connect(dsn)  # a plain connection, not from a pool, works too
    try:
        with pytest.raises(RuntimeError, match="payment declined"):
            async with conn.transaction():
                await conn.execute(f'INSERT INTO "{schema}".orders VALUES ($1)', "order-1")
                await queue.enqueue_job(Job("j", "ship"), connection=conn)
                raise RuntimeError("payment declined")
    finally:
        await conn.close()
    await assert_waiting(waiting, 0.3)
    assert (await queue.get_job_stats()).total_jobs == 0
    assert await orders(app_pool, schema) == []
    waiting.cancel()
    await stream.aclose()


async def test_a_duplicate_id_keeps_the_callers_transaction_usable(
    schema: str, queue: PoolQueue, app_pool: asyncpg.Pool
) -> None:
    await queue.enqueue_job(Job("taken", "ship"))
    async with app_pool.acquire() as conn, conn.transaction():
        await conn.execute(f'INSERT INTO "{schema}".orders VALUES ($1)', "order-1")
        with pytest.raises(DuplicateJobError, match="taken"):
            await queue.enqueue_jobs([Job("new", "ship"), Job("taken", "ship")], connection=conn)
        await queue.enqueue_jobs([Job("new", "ship")], connection=conn)  # it goes on
    assert await orders(app_pool, schema) == ["order-1"]
    assert [j.id for j in await queue.get_jobs(["new", "taken"])] == ["new", "taken"]
    # A duplicate of a job enqueued earlier in the same transaction is found too.
    async with app_pool.acquire() as conn, conn.transaction():
        await queue.enqueue_job(Job("twice", "ship"), connection=conn)
        with pytest.raises(DuplicateJobError, match="twice"):
            await queue.enqueue_job(Job("twice", "ship"), connection=conn)
    assert (await queue.get_job("twice")).job_type == "ship"


async def test_a_connection_that_is_not_an_asyncpg_one_is_refused(
    queue: PoolQueue, app_pool: asyncpg.Pool
) -> None:
    with pytest.raises(TypeError, match=r"asyncpg connection.*got Pool"):
        await queue.enqueue_job(Job("j", "t"), connection=app_pool)
    with pytest.raises(TypeError, match="got str"):
        await queue.enqueue_job(Job("j", "t"), connection="postgresql://")
    assert (await queue.get_job_stats()).total_jobs == 0


@pytest.mark.parametrize("name", ["memory", "sqlite", "leveldb"])
async def test_other_backends_refuse_connection(name: str, tmp_path: Path) -> None:
    async with PoolQueue(backend_factory(name, tmp_path)()) as q:
        with pytest.raises(TypeError, match=r"does not take connection=.*PostgreSQL"):
            await q.enqueue_jobs([Job("j", "t")], connection=object())
        assert (await q.get_job_stats()).total_jobs == 0
        assert await q.enqueue_jobs([Job("j", "t")], connection=None) == ["j"]


async def test_if_exists_ignore_inside_the_callers_transaction(
    queue: PoolQueue, app_pool: asyncpg.Pool
) -> None:
    await queue.enqueue_job(Job(id="old", job_type="t"))
    async with app_pool.acquire() as conn, conn.transaction():
        ids = await queue.enqueue_jobs(
            [Job(id="old", job_type="x"), Job(id="new", job_type="t"), Job(id="new", job_type="y")],
            connection=conn,
            if_exists="ignore",
        )
        assert ids == ["new"]
    old, new = await queue.get_jobs(["old", "new"])
    assert (old.job_type, new.job_type) == ("t", "t")
