"""Child process running one peer job queue on the shared end-to-end workload.

Each peer runs in a fresh interpreter so that its threads, signal handlers,
event loop policy and imports cannot disturb the others. The workload is the
same for all: ``n`` jobs carrying their number, a no-op handler that records
the number, ``c``-way concurrency; the clock runs from the first enqueue to the
last completion. The child then checks that every number was handled exactly
once and prints one JSON line: ``ok``, ``seconds``, ``note``, ``metrics``.

Adapters are deliberately small; their deviations from a "natural" setup are
listed in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._common import drain_payload, drain_work

Seen = list[int]

#: Extra figures of this run (seconds spent enqueueing), sent back with the result.
METRICS: dict[str, float] = {}


def _enqueued(t0: float) -> None:
    METRICS["enqueue_s"] = time.perf_counter() - t0


def _check(n: int, seen: Seen) -> str:
    counts = collections.Counter(seen)
    dups = sum(c - 1 for c in counts.values() if c > 1)
    missing = n - len(set(range(n)) & set(counts))
    problems = []
    if dups:
        problems.append(f"{dups} jobs handled more than once")
    if missing:
        problems.append(f"{missing} jobs never handled")
    return "; ".join(problems)


def _wait_for(cond: Callable[[], bool], time_limit: float, what: str) -> None:
    deadline = time.monotonic() + time_limit
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.001)


async def _await_for(cond: Callable[[], bool], time_limit: float, what: str) -> None:
    deadline = time.monotonic() + time_limit
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


# --- embedded (SQLite) -------------------------------------------------------------------


def huey(
    n: int,
    c: int,
    workdir: Path,
    synchronous: str | None,
    time_limit: float,
    drain: bool = False,
) -> float:
    """SqliteHuey, thread consumer with ``c`` workers. ``synchronous=None``: huey's default.

    ``drain``: the drain workload (issue #20): each job carries a 100-byte JSON payload
    that its handler decodes before encoding a small JSON result; every job is
    enqueued before the consumer starts."""
    huey_mod: Any = importlib.import_module("huey")
    storage_mod: Any = importlib.import_module("huey.storage")
    base: Any = storage_mod.SqliteStorage

    class Storage(base):  # type: ignore[misc]
        def _create_connection(self) -> Any:
            conn = super()._create_connection()
            if synchronous is not None:
                conn.execute(f"pragma synchronous={synchronous}")
            return conn

    q = huey_mod.Huey(
        "bench", storage_class=Storage, filename=str(workdir / "huey.db"), results=False
    )
    seen: Seen = []
    lock = threading.Lock()

    @q.task()  # type: ignore[untyped-decorator]
    def noop(i: int | bytes) -> None:
        if isinstance(i, bytes):  # drain: decode, work, encode (huey handlers are sync)
            data = json.loads(i)
            json.dumps({"n": data["n"], "ok": True}).encode()
            i = int(data["n"])
        with lock:
            seen.append(i)

    consumer = q.create_consumer(
        workers=c,
        worker_type="thread",
        periodic=False,
        initial_delay=0.001,
        backoff=1.15,
        max_delay=0.05,
        check_worker_health=False,
    )
    cpu0 = 0.0
    if drain:
        payloads = [drain_payload(i) for i in range(n)]
        t0, cpu0 = time.perf_counter(), time.process_time()
        noop.map(payloads)  # huey's batch call: one enqueue per item
        _enqueued(t0)
        consumer.start()
    else:
        consumer.start()
    try:
        if not drain:
            t0 = time.perf_counter()
            noop.map(range(n))  # huey's batch call: one enqueue per item
            _enqueued(t0)
        _wait_for(lambda: len(seen) >= n, time_limit, "huey jobs")
        seconds = time.perf_counter() - t0
        if drain:  # every thread of this process (its consumer's workers too)
            METRICS["cpu_s"] = time.process_time() - cpu0
    finally:
        consumer.stop(graceful=True)
    problem = _check(n, seen)
    if problem:
        raise AssertionError(problem)
    return seconds


def persist_queue(n: int, c: int, workdir: Path, time_limit: float) -> float:
    """persist-queue ``SQLiteAckQueue`` (multithreading), ``c`` threads doing get + ack."""
    pq: Any = importlib.import_module("persistqueue")
    q = pq.SQLiteAckQueue(str(workdir / "pq"), multithreading=True, auto_commit=True)
    seen: Seen = []
    lock = threading.Lock()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                item = q.get(block=True, timeout=0.05)
            except pq.Empty:
                continue
            with lock:
                seen.append(item)
            q.ack(item)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(c)]
    for t in threads:
        t.start()
    try:
        t0 = time.perf_counter()
        for i in range(n):  # no batch put
            q.put(i)
        _enqueued(t0)
        _wait_for(lambda: len(seen) >= n and q.acked_count() >= n, time_limit, "persist-queue acks")
        seconds = time.perf_counter() - t0
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    problem = _check(n, seen)
    if problem:
        raise AssertionError(problem)
    return seconds


def litequeue(n: int, c: int, workdir: Path, time_limit: float) -> float:
    """litequeue: ``c`` threads, each with its own ``LiteQueue`` on the file, pop + done."""
    lq: Any = importlib.import_module("litequeue")
    path = str(workdir / "litequeue.db")
    producer = lq.LiteQueue(path)
    seen: Seen = []
    lock = threading.Lock()
    stop = threading.Event()
    done_count = [0]

    def work() -> None:
        q = lq.LiteQueue(path)
        try:
            while not stop.is_set():
                msg = q.pop()
                if msg is None:
                    time.sleep(0.001)
                    continue
                with lock:
                    seen.append(int(msg.data))
                q.done(msg.message_id)
                with lock:
                    done_count[0] += 1
        finally:
            q.close()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(c)]
    for t in threads:
        t.start()
    try:
        t0 = time.perf_counter()
        for i in range(n):  # no batch put
            producer.put(str(i))
        _enqueued(t0)
        _wait_for(lambda: done_count[0] >= n, time_limit, "litequeue jobs")
        seconds = time.perf_counter() - t0
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        producer.close()
    problem = _check(n, seen)
    if problem:
        raise AssertionError(problem)
    return seconds


# --- PostgreSQL -----------------------------------------------------------------------------


async def _pg_schema(dsn: str, schema: str, create: bool) -> None:
    asyncpg: Any = importlib.import_module("asyncpg")
    conn = await asyncpg.connect(dsn)
    try:
        if create:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        else:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def procrastinate(n: int, c: int, dsn: str, time_limit: float) -> float:
    """procrastinate (psycopg connector) in its own schema; ``batch_defer_async``; a worker
    with ``concurrency=c`` and ``wait=False`` (stops when the queue is empty)."""
    pc: Any = importlib.import_module("procrastinate")
    schema = f"jpbench_pc_{uuid.uuid4().hex[:10]}"
    await _pg_schema(dsn, schema, True)
    try:
        app = pc.App(
            connector=pc.PsycopgConnector(
                conninfo=dsn, kwargs={"options": f"-c search_path={schema}"}
            )
        )
        seen: Seen = []

        @app.task(name="noop")  # type: ignore[untyped-decorator]
        async def noop(i: int) -> None:
            seen.append(i)

        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            t0 = time.perf_counter()
            for start in range(0, n, 1000):
                await noop.batch_defer_async(
                    *({"i": i} for i in range(start, min(n, start + 1000)))
                )
            _enqueued(t0)
            await asyncio.wait_for(
                app.run_worker_async(
                    concurrency=c,
                    wait=False,
                    install_signal_handlers=False,
                    fetch_job_polling_interval=0.05,
                ),
                time_limit,
            )
            seconds = time.perf_counter() - t0
            rows = await app.connector.execute_query_all_async(
                "SELECT status::text AS status, count(*) AS n FROM procrastinate_jobs GROUP BY 1"
            )
        counts = {r["status"]: r["n"] for r in rows}
        problem = _check(n, seen)
        if counts != {"succeeded": n}:
            problem = "; ".join(p for p in (problem, f"job statuses {counts}") if p)
        if problem:
            raise AssertionError(problem)
        return seconds
    finally:
        await _pg_schema(dsn, schema, False)


async def pgqueuer(
    n: int, c: int, dsn: str, time_limit: float, capped: bool, drain: bool = False
) -> float:
    """pgqueuer in its own schema: one batch ``enqueue`` per 1,000, ``QueueManager.run``
    in drain mode (stops when the queue is empty). ``capped``: at most ``c`` jobs in
    flight (``max_concurrent_tasks=c``, ``batch_size=c // 2``, the largest it allows);
    else ``batch_size=c`` and no cap, which holds up to ``2c`` jobs picked at once."""
    schema = f"jpbench_pq_{uuid.uuid4().hex[:10]}"
    os.environ["PGQUEUER_SCHEMA"] = schema
    asyncpg: Any = importlib.import_module("asyncpg")
    pgq: Any = importlib.import_module("pgqueuer")
    types: Any = importlib.import_module("pgqueuer.types")
    with contextlib.suppress(ImportError, AttributeError):
        importlib.import_module("pgqueuer.domain.settings").db_settings.cache_clear()
    await _pg_schema(dsn, schema, True)
    try:
        conn = await asyncpg.connect(dsn)
        queries = pgq.Queries.from_asyncpg_connection(conn)
        await queries.install(create_schema=False)
        qm = pgq.QueueManager(queries)
        seen: Seen = []

        @qm.entrypoint("noop")  # type: ignore[untyped-decorator]
        async def noop(job: Any) -> None:
            if drain:  # decode, await, encode (issue #20's drain workload)
                result = await drain_work(job.payload)
                seen.append(int(result[5 : result.index(b",")]))  # b'{"n": 12, ...'

            else:
                seen.append(int(job.payload))

        if drain:  # every job in one enqueue call, as ours
            payloads = [drain_payload(i) for i in range(n)]
            t0 = time.perf_counter()
            await queries.enqueue(["noop"] * n, payloads, [0] * n)
        else:
            t0 = time.perf_counter()
            for start in range(0, n, 1000):
                ids = range(start, min(n, start + 1000))
                await queries.enqueue(
                    ["noop"] * len(ids), [str(i).encode() for i in ids], [0] * len(ids)
                )
        _enqueued(t0)
        limits = {"batch_size": max(1, c // 2), "max_concurrent_tasks": c} if capped else {}
        await asyncio.wait_for(
            qm.run(**({"batch_size": c} | limits), mode=types.QueueExecutionMode.drain),
            time_limit,
        )
        seconds = time.perf_counter() - t0
        conn2 = await asyncpg.connect(dsn)
        try:
            left = await conn2.fetchval(f'SELECT count(*) FROM "{schema}".pgqueuer')
        finally:
            await conn2.close()
        problem = _check(n, seen)
        if left:
            problem = "; ".join(p for p in (problem, f"{left} jobs left in the queue") if p)
        if problem:
            raise AssertionError(problem)
        return seconds
    finally:
        await _pg_schema(dsn, schema, False)


# --- Redis ----------------------------------------------------------------------------------


async def _redis_cleanup(url: str, patterns: list[str]) -> None:
    redis_mod: Any = importlib.import_module("redis.asyncio")
    r = redis_mod.from_url(url)
    try:
        for pattern in patterns:
            keys = [k async for k in r.scan_iter(match=pattern, count=1000)]
            for i in range(0, len(keys), 1000):
                await r.delete(*keys[i : i + 1000])
    finally:
        await r.aclose()


async def arq(n: int, c: int, url: str, time_limit: float) -> float:
    """arq: jobs enqueued concurrently 1,000 at a time (no batch API), a burst-mode worker
    with ``max_jobs=c`` that exits when the queue is empty; results not kept."""
    conns: Any = importlib.import_module("arq.connections")
    worker_mod: Any = importlib.import_module("arq.worker")
    token = f"jpbench-{uuid.uuid4().hex[:10]}"
    settings = conns.RedisSettings.from_dsn(url)
    pool = await conns.create_pool(settings)
    seen: Seen = []

    async def noop(ctx: Any, i: int) -> None:
        seen.append(i)

    try:
        t0 = time.perf_counter()
        for start in range(0, n, 1000):
            await asyncio.gather(
                *(
                    pool.enqueue_job("noop", i, _job_id=f"{token}-{i}", _queue_name=token)
                    for i in range(start, min(n, start + 1000))
                )
            )
        _enqueued(t0)
        worker = worker_mod.Worker(
            functions=[worker_mod.func(noop, name="noop")],
            redis_settings=settings,
            queue_name=token,
            max_jobs=c,
            burst=True,
            keep_result=0,
            poll_delay=0.05,
            handle_signals=False,
        )
        await asyncio.wait_for(worker.main(), time_limit)
        seconds = time.perf_counter() - t0
        complete, failed = worker.jobs_complete, worker.jobs_failed
        await worker.close()
    finally:
        await pool.aclose()
        await _redis_cleanup(url, [f"arq:*{token}*", f"{token}*"])
    problem = _check(n, seen)
    if complete != n or failed:
        problem = "; ".join(p for p in (problem, f"{complete} complete, {failed} failed") if p)
    if problem:
        raise AssertionError(problem)
    return seconds


async def saq(n: int, c: int, url: str, time_limit: float) -> float:
    """saq: jobs enqueued concurrently 1,000 at a time (as ``Queue.map`` does), a worker
    with ``concurrency=c``; done when no job is incomplete."""
    saq_mod: Any = importlib.import_module("saq")
    token = f"jpbench-{uuid.uuid4().hex[:10]}"
    queue = saq_mod.Queue.from_url(url, name=token)
    seen: Seen = []

    async def noop(ctx: Any, *, i: int) -> None:
        seen.append(i)

    worker = saq_mod.Worker(queue, functions=[("noop", noop)], concurrency=c)
    await queue.connect()
    task = asyncio.create_task(worker.start())
    try:
        t0 = time.perf_counter()
        for start in range(0, n, 1000):
            await asyncio.gather(
                *(queue.enqueue("noop", i=i) for i in range(start, min(n, start + 1000)))
            )
        _enqueued(t0)
        await _await_for(lambda: len(seen) >= n, time_limit, "saq jobs")
        deadline = time.monotonic() + time_limit
        while await queue.count("incomplete") > 0:
            if time.monotonic() > deadline:
                raise TimeoutError("saq jobs never all complete")
            await asyncio.sleep(0.001)
        seconds = time.perf_counter() - t0
    finally:
        await worker.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await queue.disconnect()
        await _redis_cleanup(url, [f"saq:*{token}*"])
    problem = _check(n, seen)
    if problem:
        raise AssertionError(problem)
    return seconds


# --- a reference ---------------------------------------------------------------------------


async def asyncio_queue(n: int, c: int, time_limit: float) -> float:
    """Not a job queue: an ``asyncio.Queue`` in this process, ``c`` consumer tasks,
    nothing stored or acknowledged. The cost of the workload's own loop, and an
    adapter that always runs (CI's quick benchmark run goes through this child with
    it)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    seen: Seen = []

    async def consume() -> None:
        while True:
            seen.append(await queue.get())
            queue.task_done()

    t0 = time.perf_counter()
    for i in range(n):
        queue.put_nowait(i)
    _enqueued(t0)
    consumers = [asyncio.create_task(consume()) for _ in range(c)]
    try:
        await asyncio.wait_for(queue.join(), time_limit)
        seconds = time.perf_counter() - t0
    finally:
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
    problem = _check(n, seen)
    if problem:
        raise AssertionError(problem)
    return seconds


def run(
    peer: str,
    n: int,
    c: int,
    workdir: Path,
    dsn: str,
    redis: str,
    time_limit: float,
    drain: bool = False,
) -> float:
    if drain and peer not in ("huey-normal", "huey-default", "pgqueuer", "pgqueuer-batch"):
        raise ValueError(f"{peer} has no drain mode (huey and pgqueuer have)")
    if peer == "asyncio-queue":
        return asyncio.run(asyncio_queue(n, c, time_limit))
    if peer == "huey-normal":
        return huey(n, c, workdir, "NORMAL", time_limit, drain)
    if peer == "huey-default":
        return huey(n, c, workdir, None, time_limit, drain)
    if peer == "persist-queue":
        return persist_queue(n, c, workdir, time_limit)
    if peer == "litequeue":
        return litequeue(n, c, workdir, time_limit)
    if peer == "procrastinate":
        return asyncio.run(procrastinate(n, c, dsn, time_limit))
    if peer in ("pgqueuer", "pgqueuer-batch"):
        return asyncio.run(pgqueuer(n, c, dsn, time_limit, peer == "pgqueuer", drain))
    if peer == "arq":
        return asyncio.run(arq(n, c, redis, time_limit))
    if peer == "saq":
        return asyncio.run(saq(n, c, redis, time_limit))
    raise ValueError(f"unknown peer {peer!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("peer")
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--postgres-dsn", default="")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--drain", action="store_true", help="the drain workload (issue #20)")
    a = parser.parse_args()
    try:
        seconds = run(
            a.peer,
            a.jobs,
            a.concurrency,
            a.workdir,
            a.postgres_dsn,
            a.redis_url,
            a.timeout,
            a.drain,
        )
        out: dict[str, Any] = {"ok": True, "seconds": seconds, "note": "", "metrics": METRICS}
    except Exception as exc:
        note = f"{type(exc).__name__}: {exc}"[:300]
        out = {"ok": False, "seconds": 0.0, "note": note, "metrics": METRICS}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # peers may leave non-daemon threads behind


if __name__ == "__main__":
    main()
