"""Cancellation at exact moments around a LevelDB, SQLite or PostgreSQL storage call
that the queue drives on in its caller's task (``_eager.carry``, c5edea8 and 0f319c2;
PostgreSQL since session 13): the caller is cancelled after ``hops`` loop callbacks
counted from the moment the storage thread's future (plyvel's worker thread,
aiosqlite's connection thread) got its outcome, or from the moment asyncpg's protocol
read the server's next answer (before, at and after the moment the awaiting task would
resume), or from inside the call's last step. Whatever the moment, SPEC §4 holds: the write happened
once, its moves are seen (slots freed), claimed jobs are handed over or given back,
and every slot of the stream can be filled again (no reservation is leaked).

(Reviewer, session 12.)
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from jobpool_async import Job, JobStatus, JobStream, PoolQueue, StorageError
from jobpool_async.backends import LevelDBBackend, SQLiteBackend
from jobpool_async.backends.postgres import PostgresBackend
from jobpool_async.testing import DEADLINE, next_batch

from .backends import drop_postgres_schema, postgres_dsn

S = JobStatus
RELEASE_MESSAGE = "stream closed before the job was handed to its consumer"
HOPS = range(7)


class _Tap:
    """aiosqlite's queue to its thread (a ``SimpleQueue``, whose methods cannot be
    replaced), with each call's future watched as it is queued."""

    def __init__(self, tx: Any, watch: Callable[[asyncio.Future[Any]], None]) -> None:
        self._tx, self._watch = tx, watch

    def put_nowait(self, item: Any) -> None:
        self._tx.put_nowait(item)
        if isinstance(item, tuple) and isinstance(item[0], asyncio.Future):
            self._watch(item[0])


class _Reading:
    """An asyncpg connection's protocol as its transport sees it: each read of a
    statement's outcome (the answer to its bind and execute, which starts with
    ``BindComplete``; not a prepare's answer) is told to ``watch`` once the protocol
    took it (and settled the future the statement awaits)."""

    def __init__(self, protocol: Any, watch: Callable[[], None]) -> None:
        self._protocol, self._watch = protocol, watch

    def data_received(self, data: bytes) -> None:
        self._protocol.data_received(data)
        if data[:1] == b"2":
            self._watch()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._protocol, name)


class CancelAfterHops:
    """Cancels ``target`` ``hops`` loop callbacks after the next storage call's future
    (of the backend's thread) gets its outcome, or (PostgreSQL) after the next read of
    the server's answer on one of the pool's connections, once armed."""

    def __init__(self, backend: LevelDBBackend | SQLiteBackend | PostgresBackend) -> None:
        self.target: asyncio.Future[Any] | None = None
        self.hops = 0
        self.fired = asyncio.Event()
        if isinstance(backend, PostgresBackend):  # every connection of the pool, made
            pool: Any = backend._pool  # at its start (``pool_min_size`` = ``pool_max_size``)
            assert pool is not None
            # No look for due jobs before a claim (the first claim's, the once-a-second
            # probe): each call is then one statement, whose answer the tap counts from.
            backend._probe_now, backend._probed_at = False, math.inf
            for holder in pool._holders:
                transport = holder._con._transport
                transport._protocol = _Reading(transport._protocol, self._read)
        elif isinstance(backend, LevelDBBackend):
            thread = backend._thread
            assert thread is not None
            submit = thread.submit

            def submitted(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
                future = submit(fn, *args)
                self._watch(future)
                return future

            thread.submit = submitted  # type: ignore[method-assign]
        else:  # aiosqlite queues (future, function) for its connection's thread
            db = backend._db
            assert db is not None
            db._tx = _Tap(db._tx, self._watch)  # type: ignore[assignment]

    def arm(self, target: asyncio.Future[Any], hops: int) -> None:
        self.target, self.hops = target, hops

    def _watch(self, future: asyncio.Future[Any]) -> None:
        if self.target is not None:
            future.add_done_callback(lambda _: self._read())

    def _read(self) -> None:
        target, self.target = self.target, None
        if target is not None:
            loop = asyncio.get_running_loop()

            def later(n: int) -> None:
                if n:
                    loop.call_soon(later, n - 1)
                else:
                    target.cancel()
                    self.fired.set()

            later(self.hops)


@pytest.fixture(params=["leveldb", "sqlite", "postgres"])
async def kind(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "leveldb":
        pytest.importorskip("plyvel")
    if request.param != "postgres":
        yield str(request.param)
        return
    pytest.importorskip("asyncpg")
    postgres_dsn()  # (skips without a server)
    try:
        yield "postgres"
    finally:
        await drop_postgres_schema(_schema_of(tmp_path / "store"))


def _schema_of(path: Path) -> str:
    """The PostgreSQL schema standing for the store at ``path`` (the test's own)."""
    return f"jp_test_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


def _backend(kind: str, path: Path) -> LevelDBBackend | SQLiteBackend | PostgresBackend:
    if kind == "postgres":
        # every connection made at the start (for the tap), two kept between calls
        return PostgresBackend(
            postgres_dsn(), schema=_schema_of(path), pool_min_size=4, pool_max_size=4
        )
    return LevelDBBackend(str(path)) if kind == "leveldb" else SQLiteBackend(path)


async def _queue_on(kind: str, tmp_path: Path) -> tuple[PoolQueue, CancelAfterHops]:
    backend = _backend(kind, tmp_path / "store")
    queue = PoolQueue(backend, lease=None)
    await queue.open()
    return queue, CancelAfterHops(backend)


async def _outcome(task: asyncio.Future[Any]) -> Any:
    try:
        return await asyncio.wait_for(asyncio.shield(task), DEADLINE)
    except asyncio.CancelledError:
        assert task.cancelled()
        return None


async def _slots_fill_again(queue: PoolQueue, stream: JobStream, tag: str) -> set[str]:
    """Every free slot of ``stream`` takes a job: none is held by a leaked reservation
    or a refill that never ended. Returns the jobs it took."""
    free = stream.max_assigned_jobs - len(stream.assigned_job_ids)
    assert free > 0
    await queue.enqueue_jobs(
        [Job(id=f"{tag}-extra{i}", job_type="t", tags=[tag] if tag else []) for i in range(free)]
    )
    got: list[Job] = []
    async with asyncio.timeout(DEADLINE):
        while len(got) < free:
            got += await stream.__anext__()
    assert len(stream.assigned_job_ids) == stream.max_assigned_jobs
    return {j.id for j in got}


def _nothing_stranded(jobs: list[Job], handed: set[str]) -> None:
    for job in jobs:
        if job.id in handed:
            continue
        assert job.status in (S.INITIAL_PENDING, S.FAILED_RETRY, S.COMPLETED), job
        if job.status is S.FAILED_RETRY:
            assert job.error_message == RELEASE_MESSAGE, job


@pytest.mark.parametrize("hops", HOPS)
async def test_a_refilling_completion_cancelled_around_its_outcome(
    kind: str, tmp_path: Path, hops: int
) -> None:
    queue, cancel = await _queue_on(kind, tmp_path)
    try:
        tag = "r"
        await queue.enqueue_jobs([Job(id=f"r{i}", job_type="t", tags=[tag]) for i in range(4)])
        stream = queue.stream_jobs("w", tags=[tag], max_assigned_jobs=2)
        first = await next_batch(stream)
        handed = {j.id for j in first}
        completing = asyncio.ensure_future(queue.complete_jobs({j.id: b"" for j in first}))
        cancel.arm(completing, hops)
        assert await _outcome(completing) is None
        await asyncio.wait_for(cancel.fired.wait(), DEADLINE)
        # The write happened (once): the batch is completed, its slots freed and
        # refilled; the refilled jobs are the stream's next batch.
        assert {j.status for j in await queue.get_jobs(sorted(handed))} == {S.COMPLETED}
        nxt = await next_batch(stream)
        assert len(nxt) == 2 and not handed & {j.id for j in nxt}, nxt
        handed |= {j.id for j in nxt}
        assert sorted(stream.assigned_job_ids) == sorted(j.id for j in nxt)
        await queue.complete_jobs({j.id: b"" for j in nxt})
        handed |= await _slots_fill_again(queue, stream, tag)
        await stream.aclose()
        jobs = await queue.get_jobs([f"r{i}" for i in range(4)])
        _nothing_stranded(jobs, handed)
        stats = await queue.get_job_stats([tag])
        assert stats.running_jobs == 2  # the extra jobs, handed over
    finally:
        await queue.close()


@pytest.mark.parametrize("hops", HOPS)
async def test_a_claim_cancelled_around_its_outcome(kind: str, tmp_path: Path, hops: int) -> None:
    queue, cancel = await _queue_on(kind, tmp_path)
    try:
        tag = "c"
        ids = [f"c{i}" for i in range(3)]
        await queue.enqueue_jobs([Job(id=i, job_type="t", tags=[tag]) for i in ids])
        stream = queue.stream_jobs("w", tags=[tag], max_assigned_jobs=3)
        waiting = asyncio.ensure_future(stream.__anext__())
        cancel.arm(waiting, hops)
        batch = await _outcome(waiting)
        await asyncio.wait_for(cancel.fired.wait(), DEADLINE)
        handed = {j.id for j in batch} if batch else set()
        if handed:
            assert handed == set(ids)
            await queue.complete_jobs(dict.fromkeys(ids, b""))
        else:
            # the claim was written: its jobs come back as the stream gives them back,
            # and the stream's slots are its own again
            async with asyncio.timeout(DEADLINE):
                while stream.assigned_job_ids:  # noqa: ASYNC110 - polling with a deadline
                    await asyncio.sleep(0.001)
        jobs = await queue.get_jobs(ids)
        _nothing_stranded(jobs, handed)
        if not handed:
            assert {j.status for j in jobs} == {S.FAILED_RETRY}, jobs
        handed |= await _slots_fill_again(queue, stream, tag)
        await stream.aclose()
        _nothing_stranded(await queue.get_jobs(ids), handed)
    finally:
        await queue.close()


@pytest.mark.parametrize("hops", HOPS)
async def test_a_plain_move_cancelled_around_its_outcome_frees_the_slot(
    kind: str, tmp_path: Path, hops: int
) -> None:
    """A call by another task (no refill: not the stream's consumer) is cancelled: its
    move is still seen, so the stream's slot frees and the waiting stream takes the
    next job."""
    queue, cancel = await _queue_on(kind, tmp_path)
    try:
        tag = "p"
        await queue.enqueue_jobs([Job(id=f"p{i}", job_type="t", tags=[tag]) for i in range(2)])
        stream = queue.stream_jobs("w", tags=[tag], max_assigned_jobs=1)
        (first,) = await next_batch(stream)
        stream._refills = False  # (no refill: the move is a plain observed apply)
        waiting = asyncio.ensure_future(stream.__anext__())
        async with asyncio.timeout(DEADLINE):
            while not stream._waiting:  # noqa: ASYNC110 - polling with a deadline
                await asyncio.sleep(0)
        stopping = asyncio.ensure_future(queue.cancel_jobs(job_ids=[first.id]))
        cancel.arm(stopping, hops)
        await _outcome(stopping)
        assert (await queue.get_job(first.id)).status is S.CANCELLING
        acking = asyncio.ensure_future(queue.acknowledge_cancellation({first.id: True}))
        cancel.arm(acking, hops)
        await _outcome(acking)
        assert (await queue.get_job(first.id)).status is S.STOPPED
        (second,) = await asyncio.wait_for(waiting, DEADLINE)
        assert second.id == "p1"
    finally:
        await queue.close()


@pytest.mark.parametrize("hops", [0, 1, 2, 3])
async def test_a_queue_closed_while_a_cancelled_refill_goes_on(
    kind: str, tmp_path: Path, hops: int
) -> None:
    """The consumer's refilling completion is cancelled around its outcome and the
    queue closed right after: close() returns only once the refill was seen, and the
    reopened store has the completion and no job RUNNING but those handed over."""
    path = tmp_path / "store"
    backend = _backend(kind, path)
    queue = PoolQueue(backend, lease=None)
    await queue.open()
    cancel = CancelAfterHops(backend)
    await queue.enqueue_jobs([Job(id=f"q{i}", job_type="t") for i in range(5)])
    stream = queue.stream_jobs("w", max_assigned_jobs=2)
    first = await next_batch(stream)
    completing = asyncio.ensure_future(queue.complete_jobs({j.id: b"" for j in first}))
    cancel.arm(completing, hops)
    await asyncio.sleep(0)
    await asyncio.wait_for(queue.close(), DEADLINE)
    await asyncio.wait_for(asyncio.gather(completing, return_exceptions=True), DEADLINE)
    async with PoolQueue(_backend(kind, path), lease=None) as again:
        jobs = await again.get_jobs([f"q{i}" for i in range(5)])
        done = {j.status for j in jobs if j.id in {f.id for f in first}}
        assert done == {S.COMPLETED}, jobs
        _nothing_stranded(jobs, set())
        stats = await again.get_job_stats()
        assert stats.running_jobs == 0, stats


async def test_a_refilling_completion_whose_last_step_cancels_its_caller(
    kind: str, tmp_path: Path
) -> None:
    """The call's own last step cancels the task driving it (a hook in the backend
    call, after the store wrote): the cancellation is raised, and the write's moves
    and refilled jobs are still the stream's (handed over next, slots not leaked)."""
    queue, _ = await _queue_on(kind, tmp_path)
    try:
        backend = queue.backend
        inner = backend.apply
        armed = True

        async def apply(*args: Any, **kwargs: Any) -> Any:
            nonlocal armed
            outcome = await inner(*args, **kwargs)
            if armed:
                armed = False
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
            return outcome

        backend.apply = apply  # type: ignore[method-assign]
        await queue.enqueue_jobs([Job(id=f"l{i}", job_type="t") for i in range(4)])
        stream = queue.stream_jobs("w", max_assigned_jobs=2)
        first = await next_batch(stream)
        completing = asyncio.ensure_future(queue.complete_jobs({j.id: b"" for j in first}))
        assert await _outcome(completing) is None
        assert completing.cancelled()
        assert {j.status for j in await queue.get_jobs([j.id for j in first])} == {S.COMPLETED}
        nxt = await next_batch(stream)
        assert sorted(j.id for j in nxt) == ["l2", "l3"]
        await queue.complete_jobs({j.id: b"" for j in nxt})
        await _slots_fill_again(queue, stream, "")
        await stream.aclose()
        stats = await queue.get_job_stats()
        assert (stats.completed_jobs, stats.running_jobs) == (4, 2)
    finally:
        await queue.close()


def _fail_next(backend: Any, method: str) -> list[int]:
    """The backend's next ``method`` call suspends on a real future, then fails with
    ``StorageError`` having written nothing (a failed write, as the caller sees it);
    returns a list that counts the failures made."""
    inner = getattr(backend, method)
    failed: list[int] = []

    async def failing(*args: Any, **kwargs: Any) -> Any:
        if failed:
            return await inner(*args, **kwargs)
        failed.append(1)
        await asyncio.get_running_loop().run_in_executor(None, lambda: None)
        raise StorageError("injected: the write failed")

    setattr(backend, method, failing)
    return failed


async def test_a_carried_refilling_completion_that_fails_leaks_no_slot(
    kind: str, tmp_path: Path
) -> None:
    """The carried call itself raises after suspending (``started.task`` stays None):
    the error reaches the caller, the batch is as it was, the refill's reserved slots
    are the stream's again, and the same completion then works and refills."""
    queue, _ = await _queue_on(kind, tmp_path)
    try:
        await queue.enqueue_jobs([Job(id=f"f{i}", job_type="t") for i in range(4)])
        stream = queue.stream_jobs("w", max_assigned_jobs=2)
        first = await next_batch(stream)
        failed = _fail_next(queue.backend, "apply")
        with pytest.raises(StorageError, match="injected"):
            await queue.complete_jobs({j.id: b"" for j in first})
        assert failed == [1]
        assert {j.status for j in await queue.get_jobs([j.id for j in first])} == {S.RUNNING}
        assert sorted(stream.assigned_job_ids) == sorted(j.id for j in first)
        assert (stream._reserved, stream._extra, stream._carrying) == ([], 0, 0)
        await queue.complete_jobs({j.id: b"" for j in first})
        nxt = await next_batch(stream)
        assert sorted(j.id for j in nxt) == ["f2", "f3"]
        await queue.complete_jobs({j.id: b"" for j in nxt})
        await _slots_fill_again(queue, stream, "")
        await stream.aclose()
    finally:
        await queue.close()


async def test_a_carried_claim_that_fails_leaves_the_stream_usable(
    kind: str, tmp_path: Path
) -> None:
    queue, _ = await _queue_on(kind, tmp_path)
    try:
        await queue.enqueue_jobs([Job(id=f"g{i}", job_type="t") for i in range(3)])
        stream = queue.stream_jobs("w", max_assigned_jobs=3)
        failed = _fail_next(queue.backend, "claim")
        with pytest.raises(StorageError, match="injected"):
            await stream.__anext__()
        assert failed == [1] and stream.assigned_job_ids == []
        jobs = await queue.get_jobs(["g0", "g1", "g2"])
        assert {j.status for j in jobs} == {S.INITIAL_PENDING}
        batch = await next_batch(stream)
        assert sorted(j.id for j in batch) == ["g0", "g1", "g2"]
        await stream.aclose()
        assert {j.status for j in await queue.get_jobs(["g0", "g1", "g2"])} == {S.RUNNING}
    finally:
        await queue.close()


@pytest.mark.parametrize("kind", ["postgres"], indirect=True)
async def test_a_carried_postgres_call_that_connects_does_so_in_a_task_of_its_own(
    kind: str, tmp_path: Path
) -> None:
    """asyncpg connects under ``asyncio.timeout``, which cancels the task it was entered
    in: a connect in a carried call's task (the caller's) would cancel the caller on a
    slow connect, and miss the caller's own cancellation. A carried claim and
    refilling completion that find no connection kept or connected make theirs in a
    task of their own."""
    queue, _ = await _queue_on(kind, tmp_path)
    try:
        backend = queue.backend
        assert isinstance(backend, PostgresBackend)
        pool: Any = backend._pool
        assert pool is not None
        inner = pool._connect
        connected_in: list[asyncio.Task[Any] | None] = []

        async def connect(*args: Any, **kwargs: Any) -> Any:
            connected_in.append(asyncio.current_task())
            return await inner(*args, **kwargs)

        pool._connect = connect

        async def no_connection() -> None:
            """Nothing kept, every pooled connection to be made again at its next use."""
            kept, backend._hot = backend._hot, []
            for conn in kept:
                await pool.release(conn)
            await pool.expire_connections()

        await queue.enqueue_jobs([Job(id=f"k{i}", job_type="t") for i in range(4)])
        stream = queue.stream_jobs("w", max_assigned_jobs=2)
        await no_connection()
        claiming = asyncio.ensure_future(stream.__anext__())
        first = await asyncio.wait_for(claiming, DEADLINE)
        assert sorted(j.id for j in first) == ["k0", "k1"]
        assert connected_in and claiming not in connected_in, connected_in
        await no_connection()
        connected_in.clear()
        completing = asyncio.ensure_future(queue.complete_jobs({j.id: b"" for j in first}))
        await asyncio.wait_for(completing, DEADLINE)
        assert connected_in and completing not in connected_in, connected_in
        nxt = await next_batch(stream)
        assert sorted(j.id for j in nxt) == ["k2", "k3"]
        await stream.aclose()
    finally:
        await queue.close()
