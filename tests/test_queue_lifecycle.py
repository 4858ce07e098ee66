"""A queue's life in a real program: forgetting ``close()`` warns and still lets the
process exit; a queue used from an event loop other than its own says so (#19)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from jobpool_async import Config, Job, JobStatus, PoolQueue, QueueClosedError, Worker

from .backends import BACKENDS, backend_factory, drop_postgres_schema, new_schema_name

ROOT = Path(__file__).resolve().parent.parent

#: Opens a queue from a URL, uses a stream, and returns without closing anything.
FORGETFUL = textwrap.dedent(
    """
    import asyncio, sys
    from jobpool_async import Job, PoolQueue, open_backend

    async def main() -> None:
        options = {"schema": sys.argv[2]} if sys.argv[1].startswith("postgresql") else {}
        queue = PoolQueue(open_backend(sys.argv[1], **options))
        await queue.enqueue_jobs([Job(id=f"j{i}", job_type="t") for i in range(3)])
        stream = queue.stream_jobs("w", max_assigned_jobs=2)
        batch = await stream.__anext__()
        await queue.complete_job(batch[0].id, b"done")
        print("returning without close()", flush=True)

    asyncio.run(main())
    """
)


def _url(name: str, tmp_path: Path) -> tuple[str, str]:
    if name == "memory":
        return "memory://", ""
    if name == "sqlite":
        return f"sqlite:///{tmp_path}/jobs.db", ""
    if name == "leveldb":
        return f"leveldb:///{tmp_path}/jobs.ldb", ""
    from .backends import postgres_dsn

    return postgres_dsn(), new_schema_name()


@pytest.mark.parametrize("name", BACKENDS)
def test_an_unclosed_queue_warns_and_the_process_exits(name: str, tmp_path: Path) -> None:
    url, schema = _url(name, tmp_path)
    script = tmp_path / "forgetful.py"
    script.write_text(FORGETFUL)
    try:
        result = subprocess.run(
            [sys.executable, "-W", "always::ResourceWarning", str(script), url, schema],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,  # aiosqlite's non-daemon thread used to keep it alive for ever
            check=False,
        )
    finally:
        if schema:
            asyncio.run(drop_postgres_schema(schema))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "returning without close()\n"
    backend = {
        "memory": "MemoryBackend",
        "sqlite": "SQLiteBackend",
        "leveldb": "LevelDBBackend",
        "postgres": "PostgresBackend",
    }[name]
    assert f"ResourceWarning: PoolQueue({backend}" in result.stderr, result.stderr
    assert "was not closed: call 'await queue.close()'" in result.stderr


async def test_a_closed_or_never_opened_queue_does_not_warn(
    recwarn: pytest.WarningsRecorder,
) -> None:
    import gc

    from jobpool_async import MemoryBackend

    queue = PoolQueue(MemoryBackend())
    await queue.open()
    await queue.close()
    unopened = PoolQueue(MemoryBackend())
    del queue, unopened
    gc.collect()
    assert [w for w in recwarn if issubclass(w.category, ResourceWarning)] == []


async def test_a_dropped_open_queue_warns_when_collected() -> None:
    import gc

    from jobpool_async import MemoryBackend

    queue = PoolQueue(MemoryBackend())
    await queue.open()
    with pytest.warns(ResourceWarning, match=r"PoolQueue\(MemoryBackend"):
        del queue
        gc.collect()


@pytest.mark.parametrize("name", BACKENDS)
async def test_a_closed_queue_is_freed_without_the_cyclic_collector(
    name: str, tmp_path: Path
) -> None:
    """Dropping a closed queue frees it and its store at once: nothing it made (its
    lease keeper, a stream still holding a job handed to its caller) keeps a
    reference cycle that would wait for a full garbage collection (and keep the
    store's memory, connections or files until then)."""
    import gc
    import weakref

    schema = new_schema_name() if name == "postgres" else None
    backend = backend_factory(name, tmp_path, schema)()
    queue = PoolQueue(backend)
    assert queue.lease is not None  # (its keeper is made: every backend keeps leases)
    try:
        await queue.enqueue_jobs([Job(id=f"j{i}", job_type="t") for i in range(3)])
        async with queue.stream_jobs("w", max_assigned_jobs=2) as stream:
            batch = await stream.__anext__()
            await queue.complete_job(batch[0].id, b"done")  # the other stays handed over
        await queue.close()
        gc.collect()  # (what earlier tests left)
        gc.disable()
        try:
            queue_ref, backend_ref = weakref.ref(queue), weakref.ref(backend)
            del queue, backend, stream, batch
            await asyncio.sleep(0)
            assert queue_ref() is None
            assert backend_ref() is None
        finally:
            gc.enable()
    finally:
        if schema:
            await drop_postgres_schema(schema)


@pytest.mark.parametrize("name", BACKENDS)
async def test_a_stopped_worker_and_its_closed_queue_are_freed_without_the_cyclic_collector(
    name: str, tmp_path: Path
) -> None:
    """A Worker stopped with a job still running (cancelled at the end of its grace)
    leaves no cycle either (its cancelled tasks keep tracebacks whose frames refer
    to it): dropping it and its closed queue frees them and the store at once."""
    import gc
    import weakref

    schema = new_schema_name() if name == "postgres" else None
    backend = backend_factory(name, tmp_path, schema)()
    queue = PoolQueue(backend)
    started = asyncio.Event()

    async def processor(job: Job) -> bytes:
        if job.id == "slow":
            started.set()
            await asyncio.Event().wait()  # until cancelled by the stop
        return b"done"

    try:
        await queue.enqueue_jobs([Job(id=i, job_type="t") for i in ("a", "b", "slow")])
        worker = Worker(queue, processor, config=Config(concurrency=2))
        async with worker:
            await started.wait()
            await queue.wait_for("a")
            await queue.wait_for("b")
            await worker.stop(grace=0)
        assert (await queue.get_job("slow")).status is JobStatus.FAILED_RETRY
        await queue.close()
        gc.collect()  # (what earlier tests left)
        gc.disable()
        try:
            refs = weakref.ref(worker), weakref.ref(queue), weakref.ref(backend)
            del worker, queue, backend
            await asyncio.sleep(0)
            assert [ref() is None for ref in refs] == [True, True, True]
        finally:
            gc.enable()
    finally:
        if schema:
            await drop_postgres_schema(schema)


# --- one event loop per queue -----------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def two_loops(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop, PoolQueue]]:
    """A queue opened (and a job enqueued) in loop ``a``, and a second loop ``b``."""
    name = str(request.param)
    schema = new_schema_name() if name == "postgres" else None
    queue = PoolQueue(backend_factory(name, tmp_path, schema)())
    a, b = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        a.run_until_complete(queue.enqueue_job(Job(id="j", job_type="t")))
        yield a, b, queue
        a.run_until_complete(queue.close())
    finally:
        a.close()
        b.close()
        if schema is not None:
            asyncio.run(drop_postgres_schema(schema))


def test_a_second_event_loop_gets_one_clear_error(
    two_loops: tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop, PoolQueue],
) -> None:
    a, b, queue = two_loops

    async def stream_next() -> object:
        return await queue.stream_jobs("w").__anext__()

    async def run_worker() -> None:
        async def processor(job: Job) -> bytes:
            raise AssertionError("no job may run in the wrong loop")

        async with Worker(queue, processor, assignee_id="w"):
            pass

    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "get_job": lambda: queue.get_job("j"),
        "enqueue_job": lambda: queue.enqueue_job(Job(id="k", job_type="t")),
        "cancel_jobs": lambda: queue.cancel_jobs(job_ids=["j"]),
        "get_job_stats": lambda: queue.get_job_stats(),
        "stream": stream_next,
        "Worker": run_worker,
        "close": lambda: queue.close(),
    }
    for what, call in calls.items():
        with pytest.raises(RuntimeError) as info:
            b.run_until_complete(call())
        text = str(info.value)
        assert "belongs to the event loop" in text, (what, text)
        assert f"{id(a):#x}" in text and f"{id(b):#x}" in text, (what, text)
        assert repr(queue) in text
    # Nothing happened in loop b; the queue works on in its own loop.
    job = a.run_until_complete(queue.get_job("j"))
    assert job.status.value == "initial_pending"
    with pytest.raises(Exception, match="k"):
        a.run_until_complete(queue.get_job("k"))
    stream = queue.stream_jobs("w")
    assert [j.id for j in a.run_until_complete(stream.__anext__())] == ["j"]
    a.run_until_complete(stream.aclose())


def test_a_queue_that_failed_to_open_may_open_in_another_loop(tmp_path: Path) -> None:
    """The loop is bound by a successful open, not by an attempt."""
    from jobpool_async.backends.sqlite import SQLiteBackend

    queue = PoolQueue(SQLiteBackend(tmp_path / "later" / "jobs.db"))
    with pytest.raises(Exception, match="does not exist"):
        asyncio.run(queue.open())
    (tmp_path / "later").mkdir()

    async def use() -> int:
        async with queue:
            await queue.enqueue_job(Job(id="j", job_type="t"))
            return (await queue.get_job_stats()).total_jobs

    assert asyncio.run(use()) == 1
    with pytest.raises(QueueClosedError):
        asyncio.run(queue.get_job("j"))  # closed wins over the loop check


async def test_waiters_are_forgotten_when_they_end() -> None:
    """``wait_for`` keeps no waiter after it returns or times out (the kit checks what
    a user sees; this checks the queue's own bookkeeping)."""
    from jobpool_async import MemoryBackend

    async with PoolQueue(MemoryBackend()) as queue:
        await queue.enqueue_jobs([Job(id=i, job_type="t") for i in ("slow", "done")])
        with pytest.raises(TimeoutError):
            await queue.wait_for("slow", timeout=0.01)
        assert not queue._waiters, "a timed-out waiter is forgotten"
        waiters = [asyncio.create_task(queue.wait_for("done", timeout=10)) for _ in range(3)]
        await asyncio.sleep(0)
        await queue.cancel_jobs(job_ids=["done"])
        await asyncio.gather(*waiters)
        assert not queue._waiters, "an answered waiter is forgotten"


async def test_two_tasks_in_one_streams_anext_take_turns() -> None:
    """A stream's ``__anext__`` runs one at a time: a second call while the first
    waits for jobs waits for it (the lock taken through its own ``acquire``), then
    runs; a call cancelled while waiting its turn leaves the lock to the next, and
    the lock is free once they end (its state also set by ``__anext__`` itself when
    nobody waits: the uncontended path)."""
    from jobpool_async import MemoryBackend

    async with PoolQueue(MemoryBackend()) as queue:
        stream = queue.stream_jobs("w", max_assigned_jobs=1)
        first = asyncio.create_task(stream.__anext__())
        second = asyncio.create_task(stream.__anext__())
        third = asyncio.create_task(stream.__anext__())
        for _ in range(5):
            await asyncio.sleep(0)  # (each waits: the first for jobs, the others for it)
        assert stream._lock.locked() and not first.done() and not second.done()
        third.cancel()
        await queue.enqueue_jobs([Job(id=f"j{i}", job_type="t") for i in range(2)])
        batch = await asyncio.wait_for(first, 5)
        assert [job.id for job in batch] == ["j0"] and not second.done()
        await queue.complete_jobs({"j0": None})
        assert [job.id for job in await asyncio.wait_for(second, 5)] == ["j1"]
        with pytest.raises(asyncio.CancelledError):
            await third
        assert not stream._lock.locked()
        await queue.complete_jobs({"j1": None})
        await stream.aclose()
        assert not stream._lock.locked()
