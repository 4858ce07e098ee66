"""PostgreSQL backend: schema handling, cross-process waking, recovery, connection loss.

Runs against the server named by ``JOBPOOL_TEST_POSTGRES_DSN`` (skipped with that
reason otherwise); each test works in a schema of its own, dropped afterwards.
Queues here use ``poll_interval=30`` wherever a wake-up is checked, so a wake-up
within the test's deadline can only come from ``LISTEN/NOTIFY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from jobpool_async import (
    BatchError,
    DuplicateJobError,
    InvalidTransitionError,
    Job,
    JobStatus,
    JobStream,
    PoolQueue,
    StorageError,
    open_backend,
)
from jobpool_async.backends.base import (
    CANCEL,
    COMPLETE,
    FAIL,
    STOP,
    WORKER_LOST,
    Change,
    Moved,
    Refill,
    Selection,
    check_new_job,
)
from jobpool_async.backends.postgres import (
    COPY_DEFAULTS,
    COPY_INSERT,
    SCHEMA_VERSION,
    PostgresBackend,
)

from .backends import drop_postgres_schema, new_schema_name

WORKER = str(Path(__file__).with_name("postgres_worker.py"))
DEADLINE = 20.0  # seconds; generous for a busy machine, far below anything that hangs
NO_POLL = 30.0  # poll_interval: any wake-up sooner than this came from NOTIFY

# --- fixtures and helpers -------------------------------------------------------------


def backend(dsn: str, schema: str, **options: Any) -> PostgresBackend:
    return PostgresBackend(dsn, schema=schema, **options)


async def open_queue(dsn: str, schema: str, **options: Any) -> PoolQueue:
    q = PoolQueue(backend(dsn, schema, **options), poll_interval=NO_POLL)
    await q.open()
    return q


@pytest.fixture
async def queues(dsn: str, schema: str) -> AsyncIterator[tuple[PoolQueue, PoolQueue]]:
    """Two queues on one store, as two processes would have (separate pools and listeners)."""
    a = await open_queue(dsn, schema)
    b = await open_queue(dsn, schema)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def jobs(n: int, prefix: str = "job", **kwargs: Any) -> list[Job]:
    return [Job(f"{prefix}-{i}", "test", **kwargs) for i in range(n)]


async def sql(dsn: str, statement: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(statement, *args))
    finally:
        await conn.close()


async def index_defs(dsn: str, schema: str) -> dict[str, str]:
    """Each index of ``schema`` by name: its ``CREATE INDEX`` statement."""
    rows = await sql(
        dsn, "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1", schema
    )
    return {r[0]: r[1] for r in rows}


async def wait_for(predicate: Any, what: str, deadline: float = DEADLINE) -> None:
    """Poll a condition with a deadline (test-side checking only)."""
    end = time.monotonic() + deadline
    while not await predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def waiting(stream: JobStream) -> None:
    """Until ``stream``'s pending ``__anext__`` waits to be woken (deadline)."""
    async with asyncio.timeout(DEADLINE):
        while not stream._waiting:  # noqa: ASYNC110 - polling with a deadline
            await asyncio.sleep(0.001)


async def terminate_connections(dsn: str, b: PostgresBackend) -> int:
    """Kill every server connection of ``b`` (as a server restart would), nobody else's."""
    rows = await sql(
        dsn,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = $1 AND pid <> pg_backend_pid()",
        b.application_name,
    )
    return int(rows[0][0])


async def run_child(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        WORKER,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), DEADLINE)
    if not raw:
        assert proc.stderr is not None
        err = await proc.stderr.read()
        raise AssertionError(f"child ended early: {err.decode()}")
    return raw.decode().rstrip("\n")


async def expect(proc: asyncio.subprocess.Process, prefix: str) -> str:
    """The next line starting with ``prefix`` (other lines are skipped)."""
    while True:
        text = await line(proc)
        if text.startswith(prefix):
            return text[len(prefix) :].strip()


async def finish(proc: asyncio.subprocess.Process) -> str:
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()


# --- construction, import, schema -----------------------------------------------------


def test_without_asyncpg_the_library_works_and_the_backend_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['asyncpg'] = None\n"
        "import asyncio, jobpool_async\n"
        "from jobpool_async import PoolQueue, MemoryBackend, Job\n"
        "async def main():\n"
        "    async with PoolQueue(MemoryBackend()) as q:\n"
        "        await q.enqueue_job(Job('a', 't'))\n"
        "asyncio.run(main())\n"
        "from jobpool_async.backends.postgres import PostgresBackend\n"
        "try:\n"
        "    PostgresBackend('postgresql://x/y')\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'jobpool_async[postgres]'" in out.stdout


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"schema": ""}, ValueError),
        ({"schema": "x" * 64}, ValueError),
        ({"schema": "a\x00b"}, ValueError),
        ({"pool_max_size": 0}, ValueError),
        ({"pool_min_size": 5, "pool_max_size": 2}, ValueError),
        ({"pool_max_size": 2.5}, TypeError),
        ({"self_vacuum": "yes"}, TypeError),
    ],
)
def test_bad_options(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        PostgresBackend("postgresql://postgres@127.0.0.1/test", **kwargs)


def test_open_backend_builds_a_postgres_backend() -> None:
    b = open_backend("postgresql://postgres@127.0.0.1:5432/test", schema="s1", pool_max_size=3)
    assert isinstance(b, PostgresBackend)
    assert b.schema == "s1"
    assert PostgresBackend.default_poll_interval == 1.0


async def test_unreachable_server_is_a_storage_error() -> None:
    b = PostgresBackend("postgresql://postgres@127.0.0.1:1/test", connect_timeout=5)
    with pytest.raises(StorageError):
        await b.open()
    await b.close()


async def test_schema_tables_indexes_and_version(dsn: str, schema: str) -> None:
    q = await open_queue(dsn, schema)
    await q.close()
    tables = {
        r[0]
        for r in await sql(
            dsn, "SELECT table_name FROM information_schema.tables WHERE table_schema=$1", schema
        )
    }
    assert tables == {"jobs", "jobpool_version", "leases"}
    indexes = await index_defs(dsn, schema)
    assert "(assignee_key, holder)" in indexes["leases_pkey"]
    assert (
        "(priority DESC, COALESCE(scheduled_at, last_retry_at, created_at), seq)"
        in indexes["jobs_eligible"]
    )
    assert "WHERE ((status = ANY" in indexes["jobs_eligible"]
    assert "(wait_until IS NULL)" in indexes["jobs_eligible"]
    assert "(wait_until)" in indexes["jobs_waiting"]
    assert "gin (tag_keys)" in indexes["jobs_tags"]
    assert "id_key" in indexes["jobs_pkey"]
    assert "assignee_id" in indexes["jobs_active_assignee"]
    assert "jobs_completed" not in indexes  # (cleanup walks jobs_idle_status: version 6)
    assert "(finalized_at)" in indexes["jobs_completed_early"]
    assert "(finalized_at < created_at)" in indexes["jobs_completed_early"]
    types = {
        r[0]: r[1]
        for r in await sql(
            dsn,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = $1 AND table_name = 'jobs'",
            schema,
        )
    }
    assert types["created_at"] == "timestamp with time zone"
    assert types["tags"] == "ARRAY"
    assert await byte_order_columns(dsn, schema) == {"id_key", "status", "job_type", "assignee_id"}
    rows = await sql(dsn, f'SELECT version FROM "{schema}".jobpool_version')
    assert [r[0] for r in rows] == [SCHEMA_VERSION]


async def byte_order_columns(dsn: str, schema: str) -> set[str]:
    """The columns of the store's jobs table in ``COLLATE "C"`` (store version 7: the
    text keys every index compares; the others in the database's collation)."""
    rows = await sql(
        dsn,
        "SELECT a.attname, c.collname FROM pg_attribute a "
        "JOIN pg_collation c ON c.oid = a.attcollation "
        "WHERE a.attrelid = ($1 || '.jobs')::regclass AND a.attnum > 0",
        f'"{schema}"',
    )
    assert {r[1] for r in rows} <= {"C", "default"}, rows
    return {r[0] for r in rows if r[1] == "C"}


async def test_many_processes_opening_a_fresh_schema_at_once(dsn: str, schema: str) -> None:
    backends = [backend(dsn, schema, pool_min_size=0, pool_max_size=1) for _ in range(6)]
    try:
        await asyncio.gather(*(b.open() for b in backends))
        await backends[0].insert(jobs(1))
        assert [j.id for j in await backends[5].get_jobs(["job-0"])] == ["job-0"]
    finally:
        await asyncio.gather(*(b.close() for b in backends))


async def test_newer_store_version_is_refused(dsn: str, schema: str) -> None:
    q = await open_queue(dsn, schema)
    await q.enqueue_job(Job("keep", "t"))
    await q.close()
    await sql(dsn, f'UPDATE "{schema}".jobpool_version SET version = $1', SCHEMA_VERSION + 1)
    with pytest.raises(StorageError, match="newer"):
        await open_queue(dsn, schema)
    rows = await sql(dsn, f'SELECT id FROM "{schema}".jobs')
    assert [r[0] for r in rows] == ["keep"]


async def test_schema_holding_other_tables_is_refused_and_left_alone(dsn: str, schema: str) -> None:
    await sql(dsn, f'CREATE SCHEMA "{schema}"')
    await sql(dsn, f'CREATE TABLE "{schema}".jobs (x int)')
    with pytest.raises(StorageError, match="not a jobpool store"):
        await open_queue(dsn, schema)
    tables = await sql(
        dsn, "SELECT table_name FROM information_schema.tables WHERE table_schema=$1", schema
    )
    assert [r[0] for r in tables] == ["jobs"]


async def test_odd_schema_names_are_quoted(dsn: str) -> None:
    name = 'jp test "odd"; DROP TABLE x; --' + new_schema_name()[-8:]
    try:
        async with await open_queue(dsn, name) as q, await open_queue(dsn, name) as other:
            s = q.stream_jobs("w")
            got = asyncio.ensure_future(s.__anext__())
            await other.enqueue_job(Job("j", "t", tags=["a'b", 'c"d']))
            batch = await asyncio.wait_for(got, DEADLINE)  # woken through NOTIFY
            assert [j.id for j in batch] == ["j"]
            await s.aclose()
    finally:
        await drop_postgres_schema(name)


async def test_calls_after_close_are_storage_errors(dsn: str, schema: str) -> None:
    b = backend(dsn, schema)
    await b.open()
    await b.close()
    await b.close()  # idempotent
    with pytest.raises(StorageError):
        await b.get_jobs(["x"])


# --- values -------------------------------------------------------------------------------


async def test_ids_of_any_length_go_through_every_call(dsn: str, schema: str) -> None:
    """Ids are indexed by a key (the id itself up to 256 UTF-8 bytes, else its SHA-256).
    Statements compute the key inline; it must equal the schema's ``id_key()`` at every
    length around the limit, and every call must find the job by it."""
    ids = ["a" * 256, "b" * 257, "é" * 128, "é" * 129, "ü" * 3000, "short"]
    async with await open_queue(dsn, schema) as q:
        await q.enqueue_jobs([Job(i, "t") for i in ids])
        async with q.stream_jobs("w", max_assigned_jobs=len(ids)) as s:
            batch = await asyncio.wait_for(s.__anext__(), 10)
        assert sorted(j.id for j in batch) == sorted(ids)
        await q.complete_jobs({i: i.encode()[:8] for i in ids[:3]})
        await q.cancel_jobs(job_ids=ids[3:])
        got = {j.id: j for j in await q.get_jobs(ids)}
        assert [got[i].status for i in ids] == [JobStatus.COMPLETED] * 3 + [
            JobStatus.CANCELLING
        ] * 3
        assert got[ids[1]].result == b"b" * 8
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                f'SELECT id, id_key, "{schema}".id_key(id) AS expected FROM "{schema}".jobs'
            )
        finally:
            await conn.close()
        assert len(rows) == len(ids)
        for row in rows:
            assert row["id_key"] == row["expected"], row["id"][:20]
            assert (row["id_key"] == row["id"]) == (len(row["id"].encode()) <= 256)
        await q.acknowledge_cancellation(dict.fromkeys(ids[3:], True))
        assert await q.delete_jobs(job_ids=ids) == len(ids)


async def test_every_field_round_trips_exactly(dsn: str, schema: str) -> None:
    tz = timezone(timedelta(hours=5, minutes=30))
    created = datetime(2001, 2, 3, 4, 5, 6, 789012, tzinfo=tz)
    job = Job(
        "ü id/'\"",
        "type",
        b"\x00\xffpayload",
        tags=["b", "a", "a", "x y", "quote'\"", "long" * 500],
        created_at=created,
    )
    async with await open_queue(dsn, schema) as q:
        await q.enqueue_job(job)
        got = await q.get_job(job.id)
        assert got.created_at == created
        assert got.created_at.tzinfo is UTC
        assert got.created_at.utcoffset() == timedelta(0)
        assert got.tags == ["b", "a", "x y", "quote'\"", "long" * 500]
        assert got.job_definition == b"\x00\xffpayload"
        assert got.result is None and got.error_message == ""
        async with q.stream_jobs("w") as s:
            (claimed,) = await s.__anext__()
        assert claimed.assigned_at is not None and claimed.assigned_at.tzinfo is UTC
        await q.fail_job(job.id, "boom \u00e9")
    async with await open_queue(dsn, schema) as q:
        again = await q.get_job(job.id)
        assert again.status is JobStatus.FAILED_RETRY
        assert again.started_at == claimed.started_at
        assert again.retry_count == 1 and again.error_message == "boom \u00e9"
        assert again.last_retry_at is not None and again.last_retry_at.tzinfo is UTC


async def test_columns_sent_as_null_when_all_default_keep_each_jobs_own_values(
    dsn: str, schema: str
) -> None:
    """An insert sends the tag slices, messages and assignees as NULL when every job
    of the batch has the default; batches mixing defaults with values keep each."""
    batches = [
        [Job("plain-0", "t"), Job("plain-1", "t")],
        [
            Job("mixed-0", "t"),
            Job("mixed-1", "t", tags=["a", "b"], error_message="note", assignee_id="someone"),
            Job("mixed-2", "t", tags=["c"]),
            Job("mixed-3", "t", error_message="only a note"),
        ],
    ]
    async with await open_queue(dsn, schema) as q:
        for batch in batches:
            await q.enqueue_jobs(batch)
            assert await q.get_jobs([j.id for j in batch]) == batch
        page = await q.list_jobs(tags=["c"])
        assert [j.id for j in page.jobs] == ["mixed-2"]


# --- a large enqueue of new jobs is a binary COPY ------------------------------------------


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of rows of each ``copy_records_to_table`` of any asyncpg connection."""
    seen: list[int] = []
    real = asyncpg.Connection.copy_records_to_table

    async def counted(self: Any, table: str, *, records: Any, **kwargs: Any) -> Any:
        seen.append(len(records))
        return await real(self, table, records=records, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "copy_records_to_table", counted)
    return seen


async def test_a_large_enqueue_of_new_jobs_is_a_copy_that_keeps_every_value(
    dsn: str, schema: str, copies: list[int]
) -> None:
    """From ``COPY_INSERT`` new jobs without tags, messages or assignees, an enqueue is a
    binary ``COPY`` of five columns (the others take the table's defaults) and a
    ``NOTIFY`` in one transaction: every value as the ``INSERT`` writes it (ids of any
    length and character, their keys, payloads, times in any zone), rows in input order
    (``seq``), and a stream of another process woken by the commit."""
    zones = [UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=5, minutes=30))]
    odd = ["tab\tid", "new\nline", "back\\slash", "quote'\"", "é" * 64, "é" * 65, "x" * 300]
    jobs = [
        Job(
            odd[i] if i < len(odd) else f"job-{COPY_INSERT - i:05d}",
            "t\tab" if i % 2 else "plain",
            bytes([i % 256]) * (i % 7) + b"\x00\\",
            created_at=(
                datetime(2020, 1, 1, tzinfo=UTC) + timedelta(microseconds=i * 1001)
            ).astimezone(zones[i % 3]),
        )
        for i in range(COPY_INSERT + 5)
    ]
    async with await open_queue(dsn, schema) as a, await open_queue(dsn, schema) as b:
        async with b.stream_jobs("w", max_assigned_jobs=1) as stream:
            got = asyncio.ensure_future(stream.__anext__())
            await waiting(stream)
            await a.enqueue_jobs(jobs)
            (first,) = await asyncio.wait_for(got, DEADLINE)  # woken by the NOTIFY
        assert copies == [len(jobs)]
        assert first.id == jobs[0].id  # the oldest
        stored = await a.get_jobs([j.id for j in jobs])
        assert [j.id for j in stored] == [j.id for j in jobs]
        for job, back in zip(jobs[1:], stored[1:], strict=True):
            assert back == job
        assert stored[0].status is JobStatus.RUNNING
    rows = await sql(
        dsn, f'SELECT id, id_key, "{schema}".id_key(id) FROM "{schema}".jobs ORDER BY seq'
    )
    assert [r[0] for r in rows] == [j.id for j in jobs]
    assert all(r[1] == r[2] for r in rows)


async def test_a_copy_of_an_existing_id_is_a_duplicate_and_writes_nothing(
    dsn: str, schema: str, copies: list[int]
) -> None:
    async with await open_queue(dsn, schema) as q:
        await q.enqueue_job(Job("taken", "t"))
        batch = [Job(f"n{i}", "t") for i in range(COPY_INSERT)] + [Job("taken", "t")]
        with pytest.raises(DuplicateJobError) as caught:
            await q.enqueue_jobs(batch)
        assert caught.value.job_id == "taken"
        assert copies == [len(batch)]
        assert (await q.get_job_stats()).total_jobs == 1


@pytest.mark.parametrize("odd_one", ["tags", "message", "assignee", "max", "min", "scheduled"])
async def test_a_large_enqueue_needing_other_columns_is_an_insert(
    dsn: str, schema: str, copies: list[int], odd_one: str
) -> None:
    """A batch with a job whose values the ``COPY`` leaves to defaults (tags, a message,
    an assignee, a schedule), or a creation time the ``INSERT`` writes as
    ``infinity``/``-infinity``, goes through the ``INSERT``: each value kept."""
    choices: dict[str, dict[str, Any]] = {
        "tags": {"tags": ["a"]},
        "message": {"error_message": "note"},
        "assignee": {"assignee_id": "someone"},
        "max": {"created_at": datetime.max.replace(tzinfo=UTC)},
        "min": {"created_at": datetime.min.replace(tzinfo=UTC)},
        "scheduled": {"scheduled_at": datetime(2000, 1, 1, tzinfo=UTC)},
    }
    fields = choices[odd_one]
    batch = [Job(f"n{i}", "t") for i in range(COPY_INSERT)] + [Job("odd", "t", **fields)]
    async with await open_queue(dsn, schema) as q:
        await q.enqueue_jobs(batch)
        assert copies == []
        assert await q.get_jobs(["n0", "odd"]) == [batch[0], batch[-1]]
    if odd_one in ("max", "min"):
        rows = await sql(dsn, f"SELECT created_at::text FROM \"{schema}\".jobs WHERE id = 'odd'")
        assert rows[0][0] == ("infinity" if odd_one == "max" else "-infinity")


async def test_a_store_without_the_copy_defaults_gets_them_when_opened(
    dsn: str, schema: str, copies: list[int]
) -> None:
    """A store made before the defaults of the columns a ``COPY`` leaves out (version 7
    of the previous release) gets them when opened; its version stays, and code that
    writes every column (that release's) is unaffected."""
    async with await open_queue(dsn, schema) as q:
        await q.enqueue_job(Job("old", "t"))
    t = f'"{schema}".jobs'
    await sql(
        dsn,
        f"ALTER TABLE {t} " + ", ".join(f"ALTER COLUMN {c} DROP DEFAULT" for c in COPY_DEFAULTS),
    )
    query = (
        "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND atthasdef "
        "AND attname = ANY($2::text[])"
    )
    assert await sql(dsn, query, t, list(COPY_DEFAULTS)) == []
    async with await open_queue(dsn, schema) as q:
        assert {r[0] for r in await sql(dsn, query, t, list(COPY_DEFAULTS))} == set(COPY_DEFAULTS)
        batch = [Job(f"n{i}", "t") for i in range(COPY_INSERT)]
        await q.enqueue_jobs(batch)
        assert copies == [COPY_INSERT]
        assert (await q.get_job("old")).status is JobStatus.INITIAL_PENDING
        assert await q.get_jobs(["n5"]) == [batch[5]]
    rows = await sql(dsn, f'SELECT version FROM "{schema}".jobpool_version')
    assert [r[0] for r in rows] == [SCHEMA_VERSION]


# --- waking across processes (two queues stand for two processes) -----------------------


async def test_enqueue_in_one_process_wakes_a_stream_in_another(
    queues: tuple[PoolQueue, PoolQueue],
) -> None:
    a, b = queues
    async with a.stream_jobs("w", tags=["gpu"]) as s:
        got = asyncio.ensure_future(s.__anext__())
        await waiting(s)
        await b.enqueue_job(Job("cpu-job", "t", tags=["cpu"]))
        start = time.monotonic()
        await b.enqueue_job(Job("gpu-job", "t", tags=["gpu", "big"]))
        batch = await asyncio.wait_for(got, DEADLINE)
        latency = time.monotonic() - start
    assert [j.id for j in batch] == ["gpu-job"]
    assert latency < NO_POLL / 3  # far below the poll interval: pushed, not polled


async def test_retry_and_recovery_in_one_process_wake_a_stream_in_another(
    queues: tuple[PoolQueue, PoolQueue],
) -> None:
    a, b = queues
    await b.enqueue_jobs(jobs(2))
    async with b.stream_jobs("dies", max_assigned_jobs=2) as held:
        first = await held.__anext__()
        assert len(first) == 2
        async with a.stream_jobs("w") as s:
            got = asyncio.ensure_future(s.__anext__())
            await b.fail_job("job-0", "boom")
            assert [j.id for j in await asyncio.wait_for(got, DEADLINE)] == ["job-0"]
            got = asyncio.ensure_future(s.__anext__())
            await a.complete_job("job-0", b"ok")  # frees a's slot in a (no NOTIFY needed)
            assert await b.mark_worker_unresponsive("dies") == 1
            assert [j.id for j in await asyncio.wait_for(got, DEADLINE)] == ["job-1"]


async def test_slot_freed_by_another_process_is_freed_here(
    queues: tuple[PoolQueue, PoolQueue],
) -> None:
    a, b = queues
    await b.enqueue_jobs(jobs(2))
    async with a.stream_jobs("w", max_assigned_jobs=1) as s:
        (first,) = await s.__anext__()
        got = asyncio.ensure_future(s.__anext__())
        await waiting(s)
        assert not got.done()  # its only slot is taken
        await b.complete_job(first.id, b"done elsewhere")
        (second,) = await asyncio.wait_for(got, DEADLINE)
    assert {first.id, second.id} == {"job-0", "job-1"}


async def test_cancel_in_one_process_reaches_the_cancel_listener_in_another(
    queues: tuple[PoolQueue, PoolQueue],
) -> None:
    a, b = queues
    await b.enqueue_job(Job("long", "t"))
    heard = asyncio.Event()
    cancelled: list[str] = []

    def listener(job_id: str) -> None:
        cancelled.append(job_id)
        heard.set()

    async with a.stream_jobs("w") as s:
        s.add_cancel_listener(listener)
        await s.__anext__()
        result = await b.cancel_jobs(job_ids=["long"])
        assert result.cancelled == ["long"]
        await asyncio.wait_for(heard.wait(), DEADLINE)
        assert cancelled == ["long"]
        await a.acknowledge_cancellation({"long": True})
    assert (await b.get_job("long")).status is JobStatus.STOPPED


async def test_own_moves_send_no_notification(dsn: str, schema: str) -> None:
    """A worker completing the jobs it claimed itself notifies nobody."""
    q = await open_queue(dsn, schema)
    b = q.backend
    assert isinstance(b, PostgresBackend)
    received: list[str] = []
    fence = asyncio.Event()
    conn = await asyncpg.connect(dsn)

    def on_note(_c: Any, _pid: int, _ch: str, payload: object) -> None:
        if payload == "fence":
            fence.set()
        else:
            received.append(str(payload))

    try:
        await conn.add_listener(b.channel, on_note)
        await q.enqueue_jobs(jobs(3))
        async with q.stream_jobs("w", max_assigned_jobs=3) as s:
            batch = await s.__anext__()
            await q.complete_jobs({j.id: b"" for j in batch})
        await conn.execute("SELECT pg_notify($1, 'fence')", b.channel)
        await asyncio.wait_for(fence.wait(), DEADLINE)  # notifications arrive in commit order
        assert len(received) == 1 and "initial_pending" in received[0]  # the enqueue only
    finally:
        await conn.close()
        await q.close()


class Heard:
    """A backend listener recording what it is told; ``next()`` waits for a notice."""

    def __init__(self) -> None:
        self.events: list[Sequence[Moved] | None] = []
        self._got = asyncio.Event()

    def __call__(self, moved: Sequence[Moved] | None) -> None:
        self.events.append(moved)
        self._got.set()

    async def next(self) -> list[Sequence[Moved] | None]:
        await asyncio.wait_for(self._got.wait(), DEADLINE)
        out, self.events = self.events, []
        self._got.clear()
        return out


@contextlib.asynccontextmanager
async def two_backends(
    dsn: str, schema: str
) -> AsyncIterator[tuple[PostgresBackend, PostgresBackend]]:
    """Two instances on one schema, as two processes would have."""
    a = backend(dsn, schema)
    b = backend(dsn, schema)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_large_change_is_announced_as_recheck(dsn: str, schema: str) -> None:
    async with two_backends(dsn, schema) as (a, b):
        heard = Heard()
        a.set_listener(heard)
        many = [Job("x" * 200 + str(i), "t", tags=["t" * 100]) for i in range(100)]
        await b.insert(many)
        events = await heard.next()  # tag sets deduplicated: fits
        assert events[0] is not None and {m.tags for m in events[0]} == {("t" * 100,)}
        from jobpool_async.backends.base import CANCEL, Selection

        out = await b.apply_selected(CANCEL, Selection(tags=("t" * 100,)), datetime.now(UTC))
        assert len(out.moved) == 100
        assert await heard.next() == [None]  # too big for one NOTIFY: "re-check"


async def test_pushed_moves_name_the_assignment_they_ended(dsn: str, schema: str) -> None:
    """A NOTIFY carries each move's ``assigned_at`` exactly, so the listening queue
    frees or tells only the stream holding that assignment (issue #14)."""
    from jobpool_async.backends.base import CANCEL, FAIL, Change

    async with two_backends(dsn, schema) as (a, b):
        heard = Heard()
        b.set_listener(heard)
        await b.insert([Job("x", "t", tags=["k"]), Job("y", "t", tags=["k"])])
        claimed = await b.claim("w", (), 2, datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))
        at = {j.id: j.assigned_at for j in claimed}
        await a.apply_selected(CANCEL, Selection(job_ids=("x",)), datetime.now(UTC))
        events = await heard.next()
        assert [[m[:3] for m in e or ()] for e in events] == [
            [("x", JobStatus.CANCELLING, at["x"])]
        ]
        await a.apply([Change("y", FAIL, error_message="boom")], datetime.now(UTC))
        assert await heard.next() == [[Moved("y", JobStatus.FAILED_RETRY, at["y"], ("k",))]]


# --- connection loss ------------------------------------------------------------------


async def test_lost_connections_are_reestablished_and_streams_recheck(
    dsn: str, schema: str
) -> None:
    a = await open_queue(dsn, schema)
    b = await open_queue(dsn, schema)
    ba = a.backend
    assert isinstance(ba, PostgresBackend)
    rechecks: list[None] = []
    original = a._on_backend_event

    def spy(moved: Sequence[Moved] | None) -> None:
        if moved is None:
            rechecks.append(None)
        original(moved)

    ba.set_listener(spy)
    try:
        await a.enqueue_job(Job("before", "t"))
        assert await terminate_connections(dsn, ba) >= 2  # pool and listener

        async def usable() -> bool:
            try:
                await a.get_job_stats()
            except StorageError:
                return False
            return True

        await wait_for(usable, "the pool to reconnect")

        async def rechecked() -> bool:
            return bool(rechecks)

        await wait_for(rechecked, "the listener to reconnect and ask for a re-check")
        async with a.stream_jobs("w", max_assigned_jobs=2) as s:
            assert [j.id for j in await s.__anext__()] == ["before"]
            got = asyncio.ensure_future(s.__anext__())
            await b.enqueue_job(Job("after", "t"))
            assert [j.id for j in await asyncio.wait_for(got, DEADLINE)] == ["after"]
    finally:
        await a.close()
        await b.close()


async def test_calls_after_every_connection_was_ended_do_not_fail(dsn: str, schema: str) -> None:
    """Connections kept between calls (and idle in the pool) that the server ended
    are dropped and replaced: the next calls succeed. (Before, each kept connection
    failed its next call: ``InterfaceError: ... released back to the pool``.)"""
    q = await open_queue(dsn, schema, pool_max_size=10)
    b = q.backend
    assert isinstance(b, PostgresBackend)
    try:
        await q.enqueue_jobs(jobs(40))
        now = datetime.now(UTC)
        await asyncio.gather(*(b.claim("w", ["no such tag"], 1, now) for _ in range(8)))
        assert len(b._hot) == 4, "four connections kept between calls"
        pids = await sql(
            dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = $1", b.application_name
        )
        assert await terminate_connections(dsn, b) >= 5

        async def ended() -> bool:  # (so no call below can be sent before the end)
            rows = await sql(
                dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = ANY($1)", [r[0] for r in pids]
            )
            return not rows

        await wait_for(ended, "the server to end the connections")
        for round_ in range(6):  # more calls than there were dead connections
            async with q.stream_jobs(f"w{round_}", max_assigned_jobs=3) as stream:
                batch = await asyncio.wait_for(stream.__anext__(), DEADLINE)
                await q.complete_jobs({j.id: b"ok" for j in batch})
            assert (await q.get_job_stats()).completed_jobs == 3 * (round_ + 1)
            await q.enqueue_job(Job(f"extra{round_}", "t"))
            assert len(await q.get_jobs([batch[0].id, f"extra{round_}"])) == 2
        assert (await q.cancel_jobs(job_ids=["extra0"])).cancelled == ["extra0"]
        assert await q.delete_jobs(job_ids=["extra0"]) == 1
    finally:
        await q.close()


async def test_a_call_refused_before_sending_is_run_on_another_connection(
    dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg refuses a connection whose end it has half seen (the server's notice
    read, the socket's end not yet: ``InternalClientError: cannot switch to state``)
    before sending anything; the call then runs on another connection, even a write,
    and the refused connection is closed, not kept."""
    q = await open_queue(dsn, schema)
    b = q.backend
    assert isinstance(b, PostgresBackend)
    real_fetch = asyncpg.pool.PoolConnectionProxy.fetch
    refused: list[Any] = []

    async def fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not refused:
            refused.append(self)
            raise asyncpg.InternalClientError("cannot switch to state 12; injected")
        return await real_fetch(self, *args, **kwargs)

    try:
        await q.enqueue_jobs(jobs(3))
        monkeypatch.setattr(asyncpg.pool.PoolConnectionProxy, "fetch", fetch)
        async with q.stream_jobs("w", max_assigned_jobs=3) as stream:
            batch = await asyncio.wait_for(stream.__anext__(), DEADLINE)
        assert len(refused) == 1 and len(batch) == 3
        assert refused[0] not in b._hot
        with contextlib.suppress(asyncpg.InterfaceError):  # (raised: taken back, closed)
            assert refused[0].is_closed(), "the refused connection was closed"
    finally:
        monkeypatch.undo()
        await q.close()


async def test_a_read_cut_off_mid_statement_is_retried_a_write_is_not(
    dsn: str, schema: str
) -> None:
    """A connection ended while its statement runs (here: while it waits for a table
    lock held by another session) may have done its work: a read is run again on a
    fresh connection, a write raises ``StorageError`` (it may have committed)."""
    q = await open_queue(dsn, schema)
    b = q.backend
    assert isinstance(b, PostgresBackend)
    locker = await asyncpg.connect(dsn)

    async def waiting_pids() -> list[int]:
        rows = await sql(
            dsn,
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
            "AND wait_event_type = 'Lock'",
            b.application_name,
        )
        return [r[0] for r in rows]

    async def cut_off_while_waiting(call: Any) -> tuple[asyncio.Future[Any], int]:
        """Start ``call``; once it waits for the lock, end its connection."""
        task = asyncio.ensure_future(call)
        await wait_for(waiting_pids, "the call to wait for the lock")
        (pid,) = await waiting_pids()
        await sql(dsn, "SELECT pg_terminate_backend($1)", pid)
        return task, pid

    try:
        await q.enqueue_job(Job("a", "t"))
        for call, retried in ((q.get_job_stats(), True), (q.enqueue_job(Job("b", "t")), False)):
            transaction = locker.transaction()
            await transaction.start()
            await locker.execute(f'LOCK TABLE "{schema}".jobs IN ACCESS EXCLUSIVE MODE')
            task, killed = await cut_off_while_waiting(call)
            if retried:

                async def run_again(killed: int = killed) -> bool:
                    return any(pid != killed for pid in await waiting_pids())

                await wait_for(run_again, "the read to be run again (and wait again)")
            await transaction.rollback()
            if retried:
                assert (await asyncio.wait_for(task, DEADLINE)).total_jobs == 1
            else:
                with pytest.raises(StorageError):
                    await asyncio.wait_for(task, DEADLINE)
        assert [j.id for j in await q.get_jobs(["a", "b"])] == ["a"]
    finally:
        await locker.close()
        await q.close()


async def test_connection_loss_during_work_loses_and_duplicates_nothing(
    dsn: str, schema: str
) -> None:
    """Connections killed several times under load: failed calls raise StorageError,
    the callers retry, and every job is completed exactly once."""
    total = 300
    q = await open_queue(dsn, schema, pool_max_size=4)
    b = q.backend
    assert isinstance(b, PostgresBackend)
    errors: list[BaseException] = []
    delivered: list[str] = []
    stop = asyncio.Event()

    async def retrying(call: Any) -> Any:
        while True:
            try:
                return await call()
            except StorageError as exc:
                errors.append(exc)
                await asyncio.sleep(0.01)

    async def produce() -> None:
        for i in range(0, total, 10):
            batch = jobs(10, prefix=f"p{i}")
            try:
                await retrying(lambda batch=batch: q.enqueue_jobs(batch))
            except DuplicateJobError as exc:  # a failed call had committed after all
                errors.append(exc)
            await asyncio.sleep(0.01)  # spread the work over the chaos window

    async def consume(name: str) -> None:
        async with q.stream_jobs(name, max_assigned_jobs=5) as s:
            while not stop.is_set():
                try:
                    batch = await s.__anext__()
                except StorageError as exc:
                    errors.append(exc)
                    continue
                except StopAsyncIteration:
                    return
                delivered.extend(j.id for j in batch)
                await complete(batch)

    async def complete(batch: Sequence[Job]) -> None:
        ids = {j.id: b"ok" for j in batch}
        failed = False
        while True:
            try:
                await q.complete_jobs(ids)
                return
            except StorageError as exc:
                errors.append(exc)
                failed = True
                await asyncio.sleep(0.01)
            except BatchError as exc:
                # a failed call had committed after all (its reply lost with the
                # connection, as the producer's DuplicateJobError): the retry finds
                # every job of the batch completed by it, and moves none
                assert failed and set(exc.errors) == set(ids), exc
                for error in exc.errors.values():
                    assert isinstance(error, InvalidTransitionError), error
                    assert error.current is JobStatus.COMPLETED, error
                done = await retrying(lambda: q.get_jobs(sorted(ids)))
                assert {(j.status, j.result) for j in done} == {(JobStatus.COMPLETED, b"ok")}
                errors.append(exc)
                return

    async def chaos() -> None:
        # as a server restarting several times during use (at least until a call has
        # seen it fail, and at most 40 times); then it stays up
        for cut in range(40):
            if stop.is_set() or (cut >= 8 and errors):
                return
            await asyncio.sleep(0.05)
            await terminate_connections(dsn, b)

    async def watch() -> None:
        async def done() -> bool:
            stats = await retrying(q.get_job_stats)
            return bool(stats.completed_jobs == total)

        try:
            await wait_for(done, "all jobs to complete", deadline=60)
        finally:
            stop.set()
            for s in list(q._streams):
                await s.aclose()

    consumers = [asyncio.ensure_future(consume(f"w{i}")) for i in range(3)]
    try:
        await asyncio.gather(produce(), chaos(), watch(), *consumers)
    finally:
        stop.set()
        await q.close()
    assert errors, "the connections were never cut while in use"
    assert all(isinstance(e, StorageError | DuplicateJobError | BatchError) for e in errors)
    assert len(delivered) == len(set(delivered)) == total, "a job was delivered twice or lost"


# --- compare-and-set against races ---------------------------------------------------


async def test_late_completion_and_recovery_never_overwrite_each_other(
    queues: tuple[PoolQueue, PoolQueue],
) -> None:
    a, b = queues
    n = 40
    for round_ in range(5):
        batch = jobs(n, prefix=f"r{round_}")
        await a.enqueue_jobs(batch)
        async with a.stream_jobs(f"w{round_}", max_assigned_jobs=n) as s:
            claimed: list[Job] = []
            while len(claimed) < n:
                claimed += await s.__anext__()
            half = [j.id for j in claimed[: n // 2]]
            # cancel half so that stop_with_retry (CANCELLING only) races recovery too
            await a.cancel_jobs(job_ids=half)
            completing = a.complete_jobs({j.id: b"late" for j in claimed[n // 2 :]})
            stopping = a.stop_jobs_with_retry(dict.fromkeys(half, "stopped"))
            recovering = b.mark_worker_unresponsive(f"w{round_}")
            outcome = await asyncio.gather(completing, stopping, recovering, return_exceptions=True)
        stop_errors = outcome[1].errors if isinstance(outcome[1], BatchError) else {}
        assert outcome[1] is None or isinstance(outcome[1], BatchError), outcome[1]
        assert outcome[0] is None  # COMPLETE is allowed from RUNNING and UNKNOWN_RETRY
        for job in await a.get_jobs([j.id for j in claimed]):
            if job.id in half:
                if job.id in stop_errors:  # recovery came first
                    assert job.status is JobStatus.UNKNOWN_STOPPED
                    err = stop_errors[job.id]
                    assert isinstance(err, InvalidTransitionError)
                    assert err.current is JobStatus.UNKNOWN_STOPPED
                else:
                    assert job.status is JobStatus.STOPPED and job.retry_count == 1
            else:
                assert job.status is JobStatus.COMPLETED and job.result == b"late"


async def test_many_streams_in_many_instances_never_share_a_job(dsn: str, schema: str) -> None:
    qs = [await open_queue(dsn, schema, pool_max_size=3) for _ in range(3)]
    total = 400
    seen: dict[str, str] = {}
    dupes: list[str] = []
    streams = [
        q.stream_jobs(f"q{i}s{k}", max_assigned_jobs=7) for i, q in enumerate(qs) for k in range(3)
    ]

    async def consume(q: PoolQueue, s: Any) -> None:
        async with s:
            async for batch in s:
                for j in batch:
                    if j.id in seen:
                        dupes.append(j.id)
                    seen[j.id] = s.assignee_id
                await q.complete_jobs({j.id: b"" for j in batch})
                if len(seen) >= total:
                    for other in streams:
                        await other.aclose()

    try:
        await qs[0].enqueue_jobs(jobs(total))
        await asyncio.wait_for(
            asyncio.gather(*(consume(s._queue, s) for s in streams)), DEADLINE * 2
        )
        assert dupes == []
        stats = await qs[0].get_job_stats()
        assert stats.completed_jobs == total == len(seen)
        assert stats.total_retries == 0
    finally:
        for q in qs:
            await q.close()


# --- separate OS processes -------------------------------------------------------------


async def test_three_processes_stream_one_queue_without_duplicates(dsn: str, schema: str) -> None:
    total = 300
    async with await open_queue(dsn, schema) as q:  # creates the schema first
        procs = [await run_child("stream", dsn, schema, f"p{i}", str(total)) for i in range(3)]
        try:
            for p in procs:
                assert await line(p) == "ready"
            for i in range(0, total, 25):  # enqueued while they stream: NOTIFY wakes them
                await q.enqueue_jobs(jobs(25, prefix=f"b{i}"))
            outs = [await finish(p) for p in procs]
        finally:
            for p in procs:
                kill(p)
        delivered = [json.loads(out.strip().splitlines()[-1]) for out in outs]
        everything = [job_id for d in delivered for job_id in d]
        assert len(everything) == len(set(everything)) == total
        assert all(d for d in delivered), "some process got no job at all"
        done = await q.get_jobs([j for d in delivered for j in d])
        assert all(j.status is JobStatus.COMPLETED and j.retry_count == 0 for j in done)
        owner = {job_id: f"p{i}".encode() for i, d in enumerate(delivered) for job_id in d}
        assert all(j.result == owner[j.id] for j in done)


async def test_cancel_in_this_process_stops_a_worker_in_another(dsn: str, schema: str) -> None:
    async with await open_queue(dsn, schema) as q:
        proc = await run_child("worker", dsn, schema, "remote")
        try:
            assert await expect(proc, "ready") == ""
            start = time.monotonic()
            await q.enqueue_job(Job("slow", "t"))
            assert await expect(proc, "started") == "slow"
            assert time.monotonic() - start < NO_POLL / 3  # the other process was notified
            start = time.monotonic()
            result = await q.cancel_jobs(job_ids=["slow"])
            assert result.cancelled == ["slow"]
            assert await expect(proc, "cancelled") == "slow"
            latency = time.monotonic() - start
            assert latency < NO_POLL / 3  # pushed by NOTIFY, not found by polling

            async def stopped() -> bool:
                return (await q.get_job("slow")).status is JobStatus.STOPPED

            await wait_for(stopped, "the worker to acknowledge the cancellation")
            assert proc.stdin is not None
            proc.stdin.close()
            await finish(proc)
        finally:
            kill(proc)


async def test_killed_worker_process_is_recovered_with_mark_worker_unresponsive(
    dsn: str, schema: str
) -> None:
    async with await open_queue(dsn, schema) as q:
        await q.enqueue_jobs(jobs(3))
        proc = await run_child("hold", dsn, schema, "doomed", "2")
        try:
            assert await line(proc) == "ready"
            held = json.loads(await expect(proc, "holding"))
            assert held == ["job-0", "job-1"]
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), DEADLINE)
        finally:
            kill(proc)
        assert [j.status for j in await q.get_jobs(held)] == [JobStatus.RUNNING] * 2
        assert await q.mark_worker_unresponsive("doomed") == 2
        assert await q.mark_worker_unresponsive("doomed") == 0
        assert [j.status for j in await q.get_jobs(held)] == [JobStatus.UNKNOWN_RETRY] * 2
        async with q.stream_jobs("rescuer", max_assigned_jobs=3) as s:
            got: list[Job] = []
            while len(got) < 3:
                got += await s.__anext__()
        assert sorted(j.id for j in got) == ["job-0", "job-1", "job-2"]
        assert all(j.assignee_id == "rescuer" for j in got)


# --- claiming internals ------------------------------------------------------------------


async def test_claim_reads_only_the_eligible_indexes(dsn: str, schema: str) -> None:
    """A claim walks the eligible index and fetches the rows it locked again by tuple
    id (no second lookup in the primary key); so does a refill's claim."""
    b = backend(dsn, schema)
    await b.open()
    try:
        await b.insert(jobs(3000, tags=["a"]))
        t = f'"{schema}".jobs'
        await sql(dsn, f"UPDATE {t} SET status = 'completed', finalized_at = now() WHERE seq > 20")
        await sql(dsn, f"ANALYZE {t}")
        now = datetime.now(UTC)
        for statement, args in (
            (b._sql.claim, (now, "w", 10, "n")),
            (b._sql.claim_tags, (now, "w", 10, "n", ["a"])),
        ):
            plan = "\n".join(r[0] for r in await sql(dsn, "EXPLAIN " + statement, *args))
            assert "Seq Scan" not in plan, plan
            assert "jobs_eligible" in plan, plan
            assert "Tid Scan" in plan and "jobs_pkey" not in plan, plan
        refill = b._sql.apply(COMPLETE, True, False)
        refill_args = ('{"job-0"}', None, None, now, "w", None, "n", 0, None, None)
        plan = "\n".join(r[0] for r in await sql(dsn, "EXPLAIN " + refill, *refill_args))
        assert "Seq Scan" not in plan and "jobs_eligible" in plan, plan
        assert "Tid Scan" in plan, plan
    finally:
        await b.close()


async def test_an_enqueue_is_planned_without_reading_its_jobs(dsn: str, schema: str) -> None:
    """A large insert's plan does not depend on its jobs: the planner does not parse
    the arrays of text literals (to count ``unnest``'s rows) on top of the executor,
    which it did for every job of a connection's first enqueue (a custom plan)."""
    b = backend(dsn, schema)
    await b.open()
    try:
        plans = []
        for n in (1000, 3000):  # (from 1,000 jobs: the statement for large inserts)
            statement = b._insert_statement(jobs(n, tags=["a"]), "token")
            assert statement is not None
            (row,) = await sql(dsn, "EXPLAIN (FORMAT JSON) " + statement[0], *statement[1:])
            plans.append(json.dumps(json.loads(row[0])))
        assert plans[0] == plans[1], plans
    finally:
        await b.close()


@pytest.mark.parametrize("how", ["claim", "refill"])
async def test_a_due_job_updated_after_the_claims_snapshot_is_still_claimed(
    dsn: str, schema: str, how: str
) -> None:
    """A due job that another transaction updates (and commits) after a claim's snapshot
    was taken, before the claim locks it, is claimed in its newest version, not skipped.
    The claim's tag filter is made slow (the schema's ``tag_keys`` replaced by one that
    sleeps: volatile, so it runs when the statement runs, not when it is planned), and
    the update made while the claim sleeps in it, so the race happens every time; the
    same for a refill's claim."""
    b = backend(dsn, schema)
    await b.open()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    try:
        await b.insert(
            [
                Job("held", "test", tags=["t"], created_at=t0),
                Job("target", "test", tags=["t"], created_at=t0 + timedelta(seconds=1)),
            ]
        )
        (held,) = await b.claim("w", ["t"], 1, datetime.now(UTC))
        assert held.id == "held"
        # Sleeps once per transaction (its recheck of the updated row calls it again).
        await sql(
            dsn,
            f"""CREATE OR REPLACE FUNCTION "{schema}".tag_keys(text[]) RETURNS text[]
                LANGUAGE plpgsql VOLATILE AS $f$
                BEGIN
                    IF COALESCE(current_setting('jptest.slept', true), '') = '' THEN
                        PERFORM set_config('jptest.slept', 'yes', true);
                        PERFORM pg_sleep(1.5);
                    END IF;
                    RETURN $1;
                END $f$""",
        )
        now = datetime.now(UTC)
        claim: asyncio.Future[Any]
        if how == "claim":
            claim = asyncio.ensure_future(b.claim("w", ["t"], 5, now))
        else:
            refill = Refill("w", ("t",), frozenset({"held"}))
            applied = b.apply([Change("held", COMPLETE, result=b"")], now, refill)
            claim = asyncio.ensure_future(applied)
        conn = await asyncpg.connect(dsn)
        try:
            deadline = time.monotonic() + 30
            while not await conn.fetch(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
                "AND application_name = $1",
                b.application_name,
            ):  # the claim's snapshot is taken: it sleeps in its filter
                assert time.monotonic() < deadline and not claim.done()
                await asyncio.sleep(0.01)
            await conn.execute(
                f"""UPDATE "{schema}".jobs SET error_message = 'touched' WHERE id = 'target'"""
            )
        finally:
            await conn.close()
        result = await claim
        got = result if isinstance(result, list) else result.claimed
        assert [(j.id, j.status, j.error_message) for j in got] == [
            ("target", JobStatus.RUNNING, "touched")
        ]
        ((status, message, attempts),) = await sql(
            dsn,
            f"""SELECT status, error_message, attempts FROM "{schema}".jobs WHERE id = 'target'""",
        )
        assert (status, message, attempts) == ("running", "touched", 1)
    finally:
        await b.close()


@pytest.mark.parametrize("path", ["one statement", "grouped"])
async def test_a_refill_takes_none_of_the_jobs_its_call_named(
    dsn: str, schema: str, path: str
) -> None:
    """The refill's claim cannot see the call's own moves (one statement's snapshot), so
    it leaves out every job the call named on every path: one the call could not move
    keeps the status its error names, not RUNNING for the refill (found by the state
    machine: the error read back after the commit said RUNNING)."""
    b = backend(dsn, schema)
    await b.open()
    try:
        t0 = datetime(2024, 1, 1, tzinfo=UTC)
        await b.insert(
            [
                Job(name, "t", created_at=t0 + timedelta(seconds=i))
                for i, name in enumerate(["held", "named", "next"])
            ]
        )
        now = datetime.now(UTC)
        (held,) = await b.claim("w", [], 1, now)
        assert held.id == "held"
        # the same transition (one statement) or two (a transaction, then the claim)
        second = COMPLETE if path == "one statement" else STOP
        out = await b.apply(
            [Change("held", COMPLETE, result=b""), Change("named", second)],
            now,
            Refill("w", (), frozenset({"held"})),
        )
        assert [m.job_id for m in out.moved] == ["held"]
        assert [j.id for j in out.claimed] == ["next"]
        err = out.errors["named"]
        assert isinstance(err, InvalidTransitionError)
        assert "INITIAL_PENDING" in str(err)
        (named,) = await b.get_jobs(["named"])
        assert named.status is JobStatus.INITIAL_PENDING
    finally:
        await b.close()


async def test_calls_of_several_transitions_in_opposite_orders_never_deadlock(
    dsn: str, schema: str
) -> None:
    """A call whose changes carry several transitions runs them as one transaction, one
    statement per transition; two such calls naming the same jobs in opposite orders,
    on two connections at once, must not lock them in opposite orders (PostgreSQL would
    abort one with a deadlock: a StorageError for the caller)."""
    a, b = backend(dsn, schema), backend(dsn, schema)
    await a.open()
    await b.open()
    try:
        now = datetime.now(UTC)
        for round_ in range(15):
            x, y = f"x{round_}", f"y{round_}"
            tag = [f"r{round_}"]  # (the failed jobs of earlier rounds are eligible)
            await a.insert([Job(x, "t", tags=tag), Job(y, "t", tags=tag)])
            assert len(await a.claim("w", tag, 2, now)) == 2
            one = a.apply(
                [Change(x, COMPLETE, result=b""), Change(y, FAIL, error_message="e")], now
            )
            two = b.apply(
                [Change(y, COMPLETE, result=b""), Change(x, FAIL, error_message="e")], now
            )
            first, second = await asyncio.gather(one, two)  # no StorageError (deadlock)
            # each job moved once, by whichever call locked it first
            moved = sorted(m.job_id for m in [*first.moved, *second.moved])
            assert moved == [x, y]
            assert sorted([*first.errors, *second.errors]) == [x, y]
    finally:
        await a.close()
        await b.close()


async def _blocked_on_locks(dsn: str, b: PostgresBackend, count: int) -> None:
    """Wait until ``count`` sessions of ``b``'s store wait for a lock (or fail at the
    deadline)."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND application_name = $1",
                b.application_name,
            )
            if waiting >= count:
                return
            assert time.monotonic() < deadline, f"{waiting} of {count} sessions waiting"
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def _no_older_transaction(dsn: str) -> None:
    """Wait until no transaction that began before this call is running on the server
    and no session of this database holds a snapshot from before it (or fail at the
    deadline, naming them): until then the rows left dead by the caller's updates cannot
    be removed (by VACUUM, or by scans as they pass). A lazy VACUUM's snapshot holds
    nothing back: not waited for."""
    conn = await asyncpg.connect(dsn)
    try:
        mark = await conn.fetchval("SELECT pg_current_xact_id()")  # committed at once
        deadline = time.monotonic() + DEADLINE
        while True:
            older = await conn.fetchval(
                """SELECT CASE WHEN pg_snapshot_xmin(pg_current_snapshot()) <= $1::xid8
                            THEN 'a transaction older than ' || $1::xid8::text || '; ' ELSE ''
                       END || COALESCE(string_agg(format('session %s (%s): %s', pid,
                                                         application_name, left(query, 80)),
                                                  '; '), '')
                   FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid()
                     AND age(backend_xmin) >= age(xid($1::xid8))
                     AND query !~* '^\\s*vacuum\\M'""",
                mark,
            )
            if not older:
                return
            assert time.monotonic() < deadline, f"still running: {older}"
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


@pytest.mark.parametrize("refill", [False, True], ids=["plain", "refill"])
async def test_one_statement_calls_in_opposite_orders_never_deadlock(
    dsn: str, schema: str, refill: bool
) -> None:
    """A call whose changes share one transition is one statement; it must lock its jobs
    in key order whatever join the planner picks for its size (here ten running jobs of
    one worker: a plan may read them through the assignee index, in the order the rows
    were written, the reverse of the key order). A third session holds a middle job, so
    the ten-job call takes the jobs on one side of it and waits; a two-job call naming
    jobs on both sides then takes one and waits for the other. Were the two calls'
    orders not the same, releasing the middle job would make them wait for each other:
    PostgreSQL would abort one with a deadlock (a StorageError for its caller)."""
    a, b = backend(dsn, schema), backend(dsn, schema)
    await a.open()
    await b.open()
    holder = await asyncpg.connect(dsn)
    try:
        now = datetime.now(UTC)
        ids = [f"k{i:03d}" for i in range(300)]
        await a.insert([Job(i, "t") for i in reversed(ids)])  # written in reverse order
        assert len(await a.claim("w", [], len(ids), now)) == len(ids)
        await holder.execute(f'ANALYZE "{schema}".jobs')
        lock = holder.transaction()
        await lock.start()
        await holder.execute(f"SELECT 1 FROM \"{schema}\".jobs WHERE id = 'k105' FOR UPDATE")
        ten = ids[100:110]
        fill = Refill("w", (), frozenset(ids)) if refill else None
        large = asyncio.ensure_future(a.apply([Change(i, WORKER_LOST) for i in ten], now, fill))
        await _blocked_on_locks(dsn, a, 1)
        two = ["k101", "k108"]
        small = asyncio.ensure_future(b.apply([Change(i, WORKER_LOST) for i in two], now, fill))
        await _blocked_on_locks(dsn, a, 2)
        await lock.rollback()
        first, second = await asyncio.gather(large, small)  # no StorageError (deadlock)
        # each job moved once, by whichever call locked it first; the other's error
        assert sorted(m.job_id for m in [*first.moved, *second.moved]) == ten
        assert sorted([*(m.job_id for m in first.moved), *first.errors]) == ten
        assert sorted([*(m.job_id for m in second.moved), *second.errors]) == two
    finally:
        await holder.close()
        await a.close()
        await b.close()


async def test_key_order_is_byte_order_on_a_database_of_another_collation(dsn: str) -> None:
    """Store version 7 keeps ids in byte order (``COLLATE "C"``) whatever the database's
    collation, so a one-statement call, which sorts the ids it was given, must sort
    them in bytes too, as every ``ORDER BY id_key`` now does. On a database in ICU's
    ``en-US`` ("a" before "B"; in bytes "B" first), a third session holds job ``a``; a
    one-statement apply of ``B`` and ``a`` takes ``B`` and waits for ``a``; a cancel of
    both (locking ``ORDER BY id_key``) waits for ``B``. Were the apply's order the
    database's, it would wait for ``a`` holding nothing, the cancel would take ``B``,
    and releasing ``a`` would make the two wait for each other: PostgreSQL would abort
    one with a deadlock (a StorageError for its caller)."""
    parts = urlsplit(dsn)
    name = f"jp_icu_{os.getpid()}_{time.monotonic_ns()}"
    other = urlunsplit(parts._replace(path="/" + name))
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(
            f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C.UTF-8' "
            "LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
        )
    except asyncpg.PostgresError as e:  # PostgreSQL before 15, or built without ICU
        await admin.close()
        pytest.skip(f"no database with an ICU collation here: {e}")
    try:
        a, b = backend(other, "jp"), backend(other, "jp")
        await a.open()
        await b.open()
        holder = await asyncpg.connect(other)
        try:
            assert await holder.fetchval("SELECT 'a' < 'B'")  # the database's order
            now = datetime.now(UTC)
            await a.insert([Job("a", "t"), Job("B", "t")])
            assert len(await a.claim("w", [], 2, now)) == 2
            lock = holder.transaction()
            await lock.start()
            await holder.execute("SELECT 1 FROM jp.jobs WHERE id = 'a' FOR UPDATE")
            lost = [Change(i, WORKER_LOST) for i in ("a", "B")]
            apply = asyncio.ensure_future(a.apply(lost, now))
            await _blocked_on_locks(other, a, 1)
            selection = Selection(job_ids=("a", "B"))
            cancel = asyncio.ensure_future(b.apply_selected(CANCEL, selection, now))
            await _blocked_on_locks(other, a, 2)
            await lock.rollback()
            applied, cancelled = await asyncio.gather(apply, cancel)  # no StorageError
            assert sorted(m.job_id for m in applied.moved) == ["B", "a"]
            # then the cancel stopped them (waiting for a retry by then)
            assert sorted(m.job_id for m in cancelled.moved) == ["B", "a"]
        finally:
            await holder.close()
            await a.close()
            await b.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def _claim_beside_a_cancel(
    dsn: str, schema: str, claimer: PostgresBackend, other: PostgresBackend, ids: list[str]
) -> dict[str, JobStatus]:
    """A claim by ``claimer`` whose first statement moves the jobs ``ids`` (k000-k009)
    finding them in the reverse of their key order, and a cancel of all ten by
    ``other``, while a third session holds k005: the claim's first statement takes
    the jobs on one side of it and waits, the cancel (key order) the others and waits
    too; then the holder lets go. Were the two orders not the same, they would wait
    for each other: PostgreSQL would abort one with a deadlock (a StorageError). The
    cancel moves all ten: those the claim took (after its first statement, before the
    cancel locked them) to CANCELLING. Returns the statuses the cancel moved them to."""
    holder = await asyncpg.connect(dsn)
    try:
        lock = holder.transaction()
        await lock.start()
        await holder.execute(f"SELECT 1 FROM \"{schema}\".jobs WHERE id = 'k005' FOR UPDATE")
        now = datetime.now(UTC)
        claim = asyncio.ensure_future(claimer.claim("w", [], 10, now))
        await _blocked_on_locks(dsn, claimer, 1)
        selection = Selection(job_ids=tuple(ids))
        cancel = asyncio.ensure_future(other.apply_selected(CANCEL, selection, now))
        await _blocked_on_locks(dsn, claimer, 2)
        await lock.rollback()
        claimed, cancelled = await asyncio.gather(claim, cancel)  # no StorageError
        states = {m.job_id: m.status for m in cancelled.moved}
        assert sorted(states) == ids
        assert {j.id for j in claimed} == {
            i for i, s in states.items() if s is JobStatus.CANCELLING
        }
        return states
    finally:
        await holder.close()


async def test_a_promotion_and_a_cancel_of_the_same_jobs_never_deadlock(
    dsn: str, schema: str
) -> None:
    """A promotion (the claim's first statement when waiting jobs came due) must lock
    its jobs in key order, as every other batch does: it finds them by ``wait_until``,
    here the reverse of the key order (see _claim_beside_a_cancel)."""
    a, b = backend(dsn, schema), backend(dsn, schema)
    await a.open()
    await b.open()
    try:
        now = datetime.now(UTC)
        ids = [f"k{i:03d}" for i in range(10)]
        # k009 comes due first: the promotion reads them from k009 down; written in
        # that order too, so a plan reading the table's order reads them so as well
        await a.insert(
            [
                check_new_job(Job(i, "t", scheduled_at=now - timedelta(seconds=1 + n)))
                for n, i in reversed(list(enumerate(ids)))
            ]
        )
        states = await _claim_beside_a_cancel(dsn, schema, a, b, ids)
        # promoted, then cancelled: UNSCHEDULED, or CANCELLING if claimed meanwhile
        assert set(states.values()) <= {JobStatus.CANCELLING, JobStatus.UNSCHEDULED}
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    ("ignore", "size"),
    [(False, 10), (True, 10), (False, COPY_INSERT)],
    ids=["insert", "insert_new", "copy"],
)
async def test_inserts_of_the_same_ids_in_opposite_orders_survive_a_deadlock(
    dsn: str, schema: str, ignore: bool, size: int, copies: list[int]
) -> None:
    """An insert waits for a concurrent uncommitted insert of one of its ids (to learn
    whether it commits), in the order it writes its rows (input order). A third session
    holds an uncommitted insert of a middle id; an insert of ten ids in key order takes
    those below it and waits; one of the same ids in the reverse order takes those
    above it and waits too. The holder's rollback makes the two wait for each other:
    PostgreSQL aborts one as a deadlock, having changed nothing. Its caller is owed a
    DuplicateJobError (or, ignoring existing ids, the skip), not a StorageError: the
    insert runs again and finds the other's rows. So does a ``COPY`` (``size``
    ``COPY_INSERT``: the transaction of the ``COPY`` and its ``NOTIFY`` runs again)."""
    a, b = backend(dsn, schema), backend(dsn, schema)
    await a.open()
    await b.open()
    holder = await asyncpg.connect(dsn)
    try:
        ids = [f"k{i:04d}" for i in range(size)]
        middle = ids[size // 2]
        lock = holder.transaction()
        await lock.start()
        await holder.execute(
            f"""INSERT INTO "{schema}".jobs (id_key, id, job_type, job_definition, tags,
                tag_keys, status, created_at, error_message, retry_count, assignee_id)
                VALUES ('{middle}', '{middle}', 't', '', '{{}}', '{{}}', 'initial_pending',
                        now(), '', 0, '')"""
        )

        async def put(backend: PostgresBackend, order: list[str]) -> list[str] | None:
            jobs = [check_new_job(Job(i, "t")) for i in order]
            if ignore:
                return await backend.insert_new(jobs)
            try:
                await backend.insert(jobs)
            except DuplicateJobError:
                return None
            return order

        up = asyncio.ensure_future(put(a, ids))
        await _blocked_on_locks(dsn, a, 1)
        down = asyncio.ensure_future(put(b, ids[::-1]))
        await _blocked_on_locks(dsn, a, 2)
        await lock.rollback()
        first, second = await asyncio.gather(up, down)  # no StorageError
        stored = await a.get_jobs(ids)
        assert [j.id for j in stored] == ids
        assert bool(copies) == (size >= COPY_INSERT)
        if ignore:  # each id inserted once, by one of them; the other skipped it
            assert sorted([*(first or ()), *(second or ())]) == ids
        else:  # one inserted all ten, the other was refused as a duplicate
            assert (first is None) != (second is None)
    finally:
        await holder.close()
        await a.close()
        await b.close()


async def test_a_workers_jobs_are_found_by_index_whatever_the_length_of_its_id(
    dsn: str, schema: str
) -> None:
    """The assignee index holds a prefix of the id (a B-tree entry is limited in size):
    ids of 20,000 characters work, and two that share the indexed prefix stay apart."""
    b = backend(dsn, schema)
    await b.open()
    try:
        await b.insert(jobs(3000))
        long_a, long_b = "w" * 20_000 + "a", "w" * 20_000 + "b"
        now = datetime.now(UTC)
        for assignee in ("short", long_a, long_b):
            assert len(await b.claim(assignee, [], 2, now)) == 2
        t = f'"{schema}".jobs'
        await sql(dsn, f"ANALYZE {t}")
        cond, args, _ = b._sql.selection(Selection(assignee_id="short"), t, 1)
        plan = "\n".join(
            r[0] for r in await sql(dsn, f"EXPLAIN SELECT id FROM {t} WHERE {cond}", *args)
        )
        assert "jobs_active_assignee" in plan and "Seq Scan" not in plan, plan
        out = await b.apply_selected(WORKER_LOST, Selection(assignee_id=long_a), now)
        assert len(out.moved) == 2
        assert {m.status for m in out.moved} == {JobStatus.UNKNOWN_RETRY}
        states = await sql(dsn, f"SELECT assignee_id, status FROM {t} WHERE assignee_id <> ''")
        assert sorted((r[0][-1], r[1]) for r in states) == [
            ("a", "unknown_retry"),
            ("a", "unknown_retry"),
            ("b", "running"),
            ("b", "running"),
            ("t", "running"),
            ("t", "running"),
        ]
    finally:
        await b.close()


async def test_tag_indexes_hold_only_tagged_jobs_and_serve_tag_filters(
    dsn: str, schema: str
) -> None:
    b = backend(dsn, schema)
    await b.open()
    try:
        await b.insert(jobs(3000, prefix="plain"))
        await b.insert(jobs(3000, prefix="common", tags=["common"]))
        await b.insert(jobs(3, prefix="rare", tags=["rare", "common"]))
        t = f'"{schema}".jobs'
        await sql(dsn, f"ANALYZE {t}")
        defs = await index_defs(dsn, schema)
        for name in ("jobs_tags", "jobs_eligible_tags"):
            assert "tag_keys <> '{}'::text[]" in defs[name], defs[name]
        now = datetime.now(UTC)
        plan = "\n".join(
            r[0]
            for r in await sql(
                dsn, "EXPLAIN " + b._sql.claim_tags, now, "w", 10, "n", ["rare", "common"]
            )
        )
        assert "jobs_eligible_tags" in plan, plan
        plan = "\n".join(
            r[0]
            for r in await sql(
                dsn,
                f"EXPLAIN SELECT count(*) FROM {t} WHERE {b._sql.tag_match('tags', '$1')}",
                ["rare"],
            )
        )
        assert "jobs_tags" in plan and "Seq Scan" not in plan, plan
        got = await b.claim("w", ["rare", "common"], 10, now)
        assert sorted(j.id for j in got) == ["rare-0", "rare-1", "rare-2"]
    finally:
        await b.close()


async def test_a_list_page_reads_a_few_buffers_wherever_its_jobs_lie(dsn: str, schema: str) -> None:
    """A page of ``list_jobs`` walks an index holding what it asks for, newest first, and
    stops: without filters one walk per status, merged; by tag without a status
    ``jobs_idle_tagged``, which holds only jobs with tags, so the 10,000 pending jobs
    without the tag, newer than every tagged one, are not read (walking every idle
    job, as version 4 did, or one status's, reads about 270 buffers); by status its
    part of ``jobs_idle_status``; by type ``jobs_idle_type`` (with statistics of its
    expression: without them, a quarter of the jobs read and sorted, about 210
    buffers). A page of 100 reads a few dozen buffers of 13,000 jobs."""
    q = await open_queue(dsn, schema)
    b = q.backend
    assert isinstance(b, PostgresBackend)
    pool = b._pool
    assert pool is not None
    try:
        await q.enqueue_jobs(jobs(3000, "tagged", tags=["t"]))
        done = 0
        async with q.stream_jobs("w", max_assigned_jobs=500) as stream:
            while done < 3000:
                batch = await asyncio.wait_for(stream.__anext__(), DEADLINE)
                await q.complete_jobs({j.id: b"" for j in batch})
                done += len(batch)
        await q.enqueue_jobs([Job(f"plain-{i}", f"type{i % 4}") for i in range(10_000)])
        await sql(dsn, f'ANALYZE "{schema}".jobs')
        # The updates' dead rows (and their index entries) are cleaned up as they go
        # only while no other session's transaction is older: how many are left would
        # depend on what others run on the server (a page read 96-118 buffers while a
        # transaction of another session ran through the test, 13-33 otherwise). Once
        # none older runs, VACUUM: the count is then the walk's alone.
        await _no_older_transaction(dsn)
        await sql(dsn, f'VACUUM "{schema}".jobs')
        statements: list[tuple[str, tuple[Any, ...]]] = []
        fetch = pool.fetch

        class Capturing:
            def __getattr__(self, name: str) -> Any:
                return getattr(pool, name)

            async def fetch(self, statement: str, *args: Any) -> Any:
                statements.append((statement, args))
                return await fetch(statement, *args)

        b._pool = Capturing()  # type: ignore[assignment]
        asked: list[tuple[dict[str, Any], str]] = [
            ({}, "plain-9999"),
            ({"tags": ["t"]}, "tagged-2999"),
            ({"statuses": [JobStatus.COMPLETED]}, "tagged-2999"),
            ({"statuses": [JobStatus.INITIAL_PENDING]}, "plain-9999"),
            ({"job_type": "type2"}, "plain-9998"),
            ({"job_type": "type9"}, ""),
        ]
        for filters, newest in asked:
            page = await q.list_jobs(limit=100, **filters)
            assert [j.id for j in page.jobs][:1] == [newest][: len(newest)], filters
            statement, args = statements[-1]
            (row,) = await sql(dsn, "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, *args)
            plan = json.loads(row[0])[0]["Plan"]
            buffers = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
            assert buffers < 80, (filters, buffers, plan)
    finally:
        b._pool = pool
        await q.close()


@pytest.mark.parametrize("version", [1, 2])
async def test_an_older_store_is_upgraded_in_place(dsn: str, schema: str, version: int) -> None:
    """Version 1 indexed every job's (possibly empty) tag keys, versions 1 and 2 had a
    hash index of active jobs by assignee, versions 1-3 had no time columns; opening
    such a store upgrades the indexes and the version, and keeps every job, running
    ones included. (Version 3 stores written by that version's code are tested in
    tests/test_store_upgrades.py.)"""
    async with await open_queue(dsn, schema) as q:
        await q.enqueue_jobs([Job("run", "t"), Job("tagged", "t", tags=["x"]), Job("plain", "t")])
        async with q.stream_jobs("old-worker") as stream:
            (running,) = await asyncio.wait_for(stream.__anext__(), DEADLINE)
        assert running.id == "run"
    s = f'"{schema}"'
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                f"DROP INDEX {s}.jobs_active_assignee; "
                f"CREATE INDEX jobs_active_assignee ON {s}.jobs USING hash (assignee_id) "
                "WHERE status IN ('cancelling', 'running'); "
                f"UPDATE {s}.jobpool_version SET version = {version}; "
                f"DROP INDEX {s}.jobs_completed_early; "
                f"CREATE INDEX jobs_completed ON {s}.jobs (finalized_at) "
                "WHERE status = 'completed'; "
                f"DROP INDEX {s}.jobs_eligible_tags; DROP INDEX {s}.jobs_eligible; "
                f"DROP INDEX {s}.jobs_waiting; "
                f"ALTER TABLE {s}.jobs DROP COLUMN scheduled_at, DROP COLUMN priority, "
                "DROP COLUMN max_attempts, DROP COLUMN attempts, DROP COLUMN wait_until; "
                f"CREATE INDEX jobs_eligible ON {s}.jobs (COALESCE(last_retry_at, created_at), seq)"
                " WHERE status IN ('failed_retry', 'initial_pending', 'unknown_retry'); "
                f"CREATE INDEX jobs_eligible_tags ON {s}.jobs USING gin (tag_keys) "
                "WHERE status IN ('failed_retry', 'initial_pending', 'unknown_retry') "
                "AND tag_keys <> '{}'"
            )
            if version == 1:
                await conn.execute(
                    f"DROP INDEX {s}.jobs_tags; DROP INDEX {s}.jobs_eligible_tags; "
                    f"CREATE INDEX jobs_tags ON {s}.jobs USING gin (tag_keys); "
                    f"CREATE INDEX jobs_eligible_tags ON {s}.jobs USING gin (tag_keys) "
                    "WHERE status IN ('failed_retry', 'initial_pending', 'unknown_retry')"
                )
    finally:
        await conn.close()
    async with await open_queue(dsn, schema) as q:
        stats = await q.get_job_stats(tags=["x"])
        assert stats.total_jobs == 1
        async with q.stream_jobs("w", tags=["x"]) as stream:
            (job,) = await asyncio.wait_for(stream.__anext__(), DEADLINE)
        assert job.id == "tagged"
        assert (await q.get_job("plain")).status is JobStatus.INITIAL_PENDING
        # the running job is found through the new assignee index
        assert await q.mark_worker_unresponsive("old-worker") == 1
        assert (await q.get_job(running.id)).status is JobStatus.UNKNOWN_RETRY
    rows = await sql(dsn, f"SELECT version FROM {s}.jobpool_version")
    assert [r[0] for r in rows] == [SCHEMA_VERSION] == [7]
    assert await byte_order_columns(dsn, schema) == {"id_key", "status", "job_type", "assignee_id"}
    defs = await index_defs(dsn, schema)
    assert "jobs_completed" not in defs and "created_at" in defs["jobs_completed_early"]
    assert "tag_keys <> '{}'::text[]" in defs["jobs_tags"]
    assert 'btree ("left"(assignee_id, 200))' in defs["jobs_active_assignee"]


async def test_jobs_of_a_claim_whose_answer_was_lost_are_given_back(dsn: str, schema: str) -> None:
    from jobpool_async.backends.postgres import LOST_CLAIM_MESSAGE

    b = backend(dsn, schema)
    await b.open()
    try:
        await b.insert(jobs(3))
        lost = await b.claim("w", [], 2, datetime.now(UTC))
        # As if that claim had raised StorageError after committing (see claim()):
        b._orphans.append(f"{b._token}:{b._claims}")
        again = await b.claim("w", [], 3, datetime.now(UTC))
        assert b._orphans == []
        assert sorted(j.id for j in again) == ["job-0", "job-1", "job-2"]
        by_id = {j.id: j for j in again}
        for j in lost:
            assert by_id[j.id].retry_count == 1
            assert by_id[j.id].error_message == LOST_CLAIM_MESSAGE
        assert by_id["job-2"].retry_count == 0
    finally:
        await b.close()


async def test_giving_back_a_lost_claim_and_a_cancel_of_its_jobs_never_deadlock(
    dsn: str, schema: str
) -> None:
    """Giving back the jobs of a claim whose answer was lost finds them by the claim's
    nonce (through the active-assignee index: here in the order the claim wrote them,
    the reverse of the key order), so it must lock them in key order first, as every
    batch does (see _claim_beside_a_cancel)."""
    a, b = backend(dsn, schema), backend(dsn, schema)
    await a.open()
    await b.open()
    try:
        now = datetime.now(UTC)
        ids = [f"k{i:03d}" for i in range(10)]
        # k009 created first, so claimed first: one at a time, their running versions
        # are written in the reverse of the key order (what a scan by nonce reads)
        await b.insert([check_new_job(Job(i, "t")) for i in reversed(ids)])
        nonces = []
        for i in reversed(ids):
            assert [j.id for j in await b.claim("w", [], 1, now)] == [i]
            nonces.append(f"{b._token}:{b._claims}")
        b._orphans += nonces  # as if the answers of those claims had been lost
        states = await _claim_beside_a_cancel(dsn, schema, b, a, ids)  # gives back first
        # given back (FAILED_RETRY), then cancelled: STOPPED, or CANCELLING if claimed
        assert set(states.values()) <= {JobStatus.CANCELLING, JobStatus.STOPPED}
        assert b._orphans == []
    finally:
        await a.close()
        await b.close()


async def test_tag_filters_match_with_and(dsn: str, schema: str) -> None:
    async with await open_queue(dsn, schema) as q:
        await q.enqueue_jobs(
            [
                Job("ab", "t", tags=["a", "b"]),
                Job("a", "t", tags=["a"]),
                Job("abc", "t", tags=["c", "b", "a"]),
            ]
        )
        async with q.stream_jobs("w", tags=["b", "a"], max_assigned_jobs=5) as s:
            assert sorted(j.id for j in await s.__anext__()) == ["ab", "abc"]
        assert (await q.get_job_stats(["a"])).total_jobs == 3
        assert (await q.get_job_stats(["c", "a"])).total_jobs == 1


async def test_a_failed_statement_leaves_the_store_unchanged(dsn: str, schema: str) -> None:
    # A trigger makes the server reject any row whose error_message is 'explode'.
    async with await open_queue(dsn, schema) as q:
        quoted = '"' + schema.replace('"', '""') + '"'
        await sql(
            dsn,
            f"""CREATE FUNCTION {quoted}.explode() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN IF NEW.error_message = 'explode' THEN RAISE EXCEPTION 'boom'; END IF;
                RETURN NEW; END $$""",
        )
        await sql(
            dsn,
            f"""CREATE TRIGGER explode BEFORE INSERT OR UPDATE ON {quoted}.jobs
                FOR EACH ROW EXECUTE FUNCTION {quoted}.explode()""",
        )
        bad = [*jobs(2), Job("bad", "t", error_message="explode")]
        with pytest.raises(StorageError):
            await q.enqueue_jobs(bad)
        assert await q.get_jobs(["job-0", "job-1", "bad"]) == []
        await q.enqueue_jobs(jobs(2))
        async with q.stream_jobs("w", max_assigned_jobs=2) as s:
            assert len(await s.__anext__()) == 2
        with pytest.raises(StorageError):
            await q.fail_jobs({"job-0": "fine", "job-1": "explode"})
        assert [j.status for j in await q.get_jobs(["job-0", "job-1"])] == [JobStatus.RUNNING] * 2


# --- self-vacuum --------------------------------------------------------------------------


async def test_self_vacuum_follows_the_server_autovacuum_setting(dsn: str, schema: str) -> None:
    (autovacuum,) = (await sql(dsn, "SELECT current_setting('autovacuum')"))[0]
    for option, expected in ((None, autovacuum == "off"), (True, True), (False, False)):
        q = await open_queue(dsn, schema, self_vacuum=option)
        try:
            assert isinstance(q.backend, PostgresBackend)
            assert q.backend.vacuuming is expected, option
        finally:
            await q.close()


async def run_through(q: PoolQueue, n: int, slots: int) -> None:
    """Enqueue ``n`` jobs and complete them all through one stream (2n row changes)."""
    await q.enqueue_jobs(jobs(n))
    async with q.stream_jobs("w", max_assigned_jobs=slots) as stream:
        done = 0
        async for batch in stream:
            await q.complete_jobs({j.id: b"ok" for j in batch})
            done += len(batch)
            if done == n:
                break


async def test_self_vacuum_cleans_the_table_in_the_background(
    dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After enough claimed and completed rows, the backend VACUUMs its own table
    (PostgreSQL records a manual vacuum in ``last_vacuum``); no job is disturbed."""
    from jobpool_async.backends.postgres import _maintenance

    monkeypatch.setattr(_maintenance, "VACUUM_MIN_CHANGES", 200)
    q = await open_queue(dsn, schema, self_vacuum=True)
    try:
        b = q.backend
        assert isinstance(b, PostgresBackend)
        await run_through(q, 300, 50)

        async def vacuumed() -> bool:
            rows = await sql(
                dsn,
                "SELECT last_vacuum IS NOT NULL FROM pg_stat_user_tables "
                "WHERE schemaname = $1 AND relname = 'jobs'",
                schema,
            )
            return b.vacuum_runs >= 1 and bool(rows and rows[0][0])

        await wait_for(vacuumed, "a VACUUM of the jobs table")
        stats = await q.get_job_stats()
        assert stats.completed_jobs == 300 and stats.total_jobs == 300
        # its ANALYZE keeps the statistics that choose plans, and only those
        analyzed = await sql(
            dsn, "SELECT attname FROM pg_stats WHERE schemaname = $1 AND tablename = 'jobs'", schema
        )
        assert sorted(r[0] for r in analyzed) == sorted(_maintenance.ANALYZED_COLUMNS)
        if (await sql(dsn, "SELECT current_setting('server_version_num')::int"))[0][0] >= 140000:
            (types,) = await sql(
                dsn,
                "SELECT count(*) FROM pg_stats_ext_exprs WHERE schemaname = $1 "
                "AND statistics_name = 'jobs_type' AND most_common_vals IS NOT NULL",
                schema,
            )
            assert types[0] == 1  # the type prefix's, which lists by type need
    finally:
        await q.close()


async def test_the_first_analyze_does_not_leave_completions_planned_anew(
    dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the backend's first ``VACUUM (ANALYZE)`` a drain's complete-and-refill
    statement goes back to its generic plan within a few runs. The statistics raise
    its estimated cost, and PostgreSQL compared the new generic plan with the custom
    plans made before them, planning each run anew for 20 runs and more."""
    from jobpool_async.backends.postgres import _maintenance

    monkeypatch.setattr(_maintenance, "VACUUM_MIN_CHANGES", 1000)
    q = await open_queue(dsn, schema, self_vacuum=True)
    try:
        b = q.backend
        assert isinstance(b, PostgresBackend)
        await q.enqueue_jobs(jobs(6000))

        async def analyzed() -> bool:
            return b.vacuum_runs >= 1

        async with q.stream_jobs("w", max_assigned_jobs=10) as stream:
            done = 0
            async for batch in stream:
                await q.complete_jobs({j.id: b"ok" for j in batch})
                done += len(batch)
                if done == 500:  # 1,000 rows changed: the VACUUM (ANALYZE) runs
                    await wait_for(analyzed, "the backend's VACUUM (ANALYZE)")
                    b._vacuum.enabled = False  # (one: the statistics appear once)
                if done == 6000:
                    break
        # on the drain's connection: the statement of the runs before the ANALYZE
        # went on planning each run anew after it (31-41 custom plans in all); runs
        # after it use a statement of their own (five custom plans, as every one)
        rows = await b._fetch(
            "SELECT custom_plans, generic_plans FROM pg_prepared_statements "
            "WHERE statement LIKE '%WITH c AS%' AND statement NOT LIKE '%pg_prepared%' "
            "ORDER BY statement LIKE '/* plans 1 */%'"
        )
        assert len(rows) == 2 and rows[1][1] > 200, rows
        assert rows[0][0] <= 8, rows
        assert (await q.get_job_stats()).completed_jobs == 6000
    finally:
        await q.close()


async def test_self_vacuum_pauses_as_autovacuum_does(
    dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend's VACUUM runs with a cost delay (autovacuum's throttling), so on a
    big table it leaves the server to the claims: while it runs, PostgreSQL shows it
    sleeping in ``VacuumDelay``. (A long delay here makes the pause easy to catch.)"""
    from jobpool_async.backends.postgres import _maintenance

    monkeypatch.setattr(_maintenance, "VACUUM_MIN_CHANGES", 4000)
    monkeypatch.setattr(_maintenance, "VACUUM_COST_DELAY_MS", 50)
    q = await open_queue(dsn, schema, self_vacuum=True)
    try:
        b = q.backend
        assert isinstance(b, PostgresBackend)
        await run_through(q, 2000, 200)
        seen: set[str] = set()

        async def paused() -> bool:
            rows = await sql(
                dsn,
                "SELECT wait_event FROM pg_stat_activity WHERE application_name = $1 "
                "AND query LIKE 'VACUUM%' AND state = 'active'",
                b.application_name,
            )
            seen.update(str(r[0]) for r in rows)
            return "VacuumDelay" in seen

        async def finished() -> bool:
            return b.vacuum_runs >= 1

        await wait_for(paused, "the VACUUM to pause in VacuumDelay")
        await wait_for(finished, "the VACUUM to finish", 60)
        stats = await q.get_job_stats()
        assert stats.completed_jobs == 2000
    finally:
        await q.close()


async def test_a_job_scheduled_while_a_promotion_runs_is_not_forgotten(
    dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A promotion sets the backend's next due time from what its statement read. A
    scheduled job inserted meanwhile, committed after that statement's snapshot, must
    still be known as due: it was forgotten until the next probe, a second later (the
    mixed workload, enqueueing while it drains, ran at 0.45 of the plain one)."""
    b = backend(dsn, schema)
    await b.open()
    try:
        past = datetime.now(UTC) - timedelta(seconds=1)
        await b.insert([check_new_job(Job("early", "t", scheduled_at=past))])
        fetch = b._fetch
        inserted: list[str] = []

        async def fetch_then_insert(statement: str, *args: Any, **kwargs: Any) -> Any:
            rows = await fetch(statement, *args, **kwargs)
            if "SET wait_until = NULL" in statement and not inserted:
                inserted.append("late")  # after the promotion's snapshot, before it ends
                await b.insert([check_new_job(Job("late", "t", scheduled_at=past))])
            return rows

        monkeypatch.setattr(b, "_fetch", fetch_then_insert)
        first = await b.claim("w", [], 10, datetime.now(UTC))
        assert [j.id for j in first] == ["early"] and inserted == ["late"]
        again = await b.claim("w", [], 10, datetime.now(UTC))
        assert [j.id for j in again] == ["late"], "the job scheduled meanwhile was forgotten"
    finally:
        await b.close()


# Ids, types, texts and times that the statements' text-literal parameters must quote
# or mark (``_statements``'s PARAMETERS): quotes, backslashes, braces, commas, spaces,
# "NULL", non-ASCII; empty and missing results; the extreme times.
AWKWARD = ['a"b', "c\\d", "{e,f}", " g ", "NULL", "", 'ü\\"', "h", '\\"', "x" * 300]


async def test_awkward_values_go_through_the_text_literal_parameters(dsn: str, schema: str) -> None:
    b = backend(dsn, schema)
    await b.open()
    try:
        times = [
            datetime.min.replace(tzinfo=UTC),
            datetime.max.replace(tzinfo=UTC),
            datetime(1969, 12, 31, 23, 59, 59, 500001, tzinfo=UTC),
            datetime(2038, 1, 19, 3, 14, 8, 999999, tzinfo=UTC),
        ]
        jobs = [
            Job(
                id=f"id{text}" if text else "",
                job_type=f"type{text}",
                job_definition=text.encode() + b"\x00\xff",
                created_at=times[i % len(times)],
                error_message=text,
            )
            for i, text in enumerate(AWKWARD)
        ]
        jobs[0].job_definition = b""
        for job in jobs:  # one list each: one without a quote is not escaped as a whole
            await b.insert([job])
        stored = await b.get_jobs([j.id for j in jobs])
        assert [
            (j.id, j.job_type, j.job_definition, j.created_at, j.error_message) for j in stored
        ] == [(j.id, j.job_type, j.job_definition, j.created_at, j.error_message) for j in jobs]
        # the extremes stored as asyncpg stores them (its infinity, -infinity)
        extremes = await sql(
            dsn,
            f'SELECT created_at::text FROM "{schema}".jobs WHERE NOT isfinite(created_at) '
            "ORDER BY created_at",
        )
        assert [r[0] for r in extremes] == ["-infinity"] * 3 + ["infinity"] * 3
        now = datetime.now(UTC)
        claimed = await b.claim("w", [], len(jobs), now)
        assert sorted(j.id for j in claimed) == sorted(j.id for j in jobs)
        results = [None, b"", b'\x00"\\{},', *(t.encode() for t in AWKWARD[3:])]
        changes = [
            Change(j.id, COMPLETE, result=r) for j, r in zip(jobs[:5], results, strict=False)
        ]
        changes += [
            Change(j.id, FAIL, error_message=m)
            for j, m in zip(jobs[5:], [None, 'q"\\', "", None, "NULL"], strict=True)
        ]
        for group in (changes[:3], changes[3:5], changes[5:7], changes[7:]):
            out = await b.apply(group, now)
            assert sorted(m.job_id for m in out.moved) == sorted(c.job_id for c in group)
        after = {j.id: j for j in await b.get_jobs([j.id for j in jobs])}
        for change, job in zip(changes, jobs, strict=True):
            got = after[job.id]
            if change.transition is COMPLETE:
                assert got.status is JobStatus.COMPLETED and got.result == change.result
            else:
                message = change.error_message
                assert got.error_message == (job.error_message if message is None else message)
    finally:
        await b.close()


async def test_a_claimed_job_reads_as_a_stored_one(dsn: str, schema: str) -> None:
    """A claim builds its jobs field by field from the row (not ``read_job``): each,
    by a claim and by a refill, equals the same job read back whole, every field (a
    first run's ``started_at``, which the claim does not return, and an earlier
    run's, which it does)."""
    b = backend(dsn, schema)
    await b.open()
    try:
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        first = Job("first", "type-a", b"one", tags=["t1", "t2"], created_at=t0)
        again = Job(
            "again",
            "type-b",
            b"two",
            created_at=t0 + timedelta(seconds=1),
            started_at=t0 + timedelta(seconds=2),
            error_message="failed once",
            result=b"partial",
            retry_count=1,
            last_retry_at=t0 + timedelta(seconds=3),
            priority=0,
            max_attempts=5,
        )
        third = Job("third", "type-c", b"three", created_at=t0 + timedelta(seconds=4))
        await b.insert([first, again])
        await b.insert([third])
        now = datetime.now(UTC)
        claimed = await b.claim("w", [], 2, now)
        out = await b.apply(
            [Change(claimed[0].id, COMPLETE, result=b"r")],
            now,
            Refill("w", (), frozenset(j.id for j in claimed)),
        )
        claimed += out.claimed
        assert [j.id for j in claimed] == ["first", "again", "third"]
        stored = {j.id: j for j in await b.get_jobs(["first", "again", "third"])}
        stored["first"].status = JobStatus.RUNNING  # (completed by the apply since)
        stored["first"].finalized_at = stored["first"].result = None
        for job in claimed:
            assert job == stored[job.id]
            assert job.started_at == (t0 + timedelta(seconds=2) if job.id == "again" else now)
            assert job.assigned_at == now and job.assignee_id == "w"
    finally:
        await b.close()
