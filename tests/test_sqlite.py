"""SQLite backend: multi-process use, crash recovery, exact round trips, foreign files,
indexes and failure atomicity. (The shared behaviour is in ``tests/conformance``.)"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest

from jobpool_async import (
    DuplicateJobError,
    Job,
    JobStatus,
    PoolQueue,
    StorageError,
    open_backend,
)
from jobpool_async.backends import sqlite as sq
from jobpool_async.backends.base import check_new_job
from jobpool_async.backends.sqlite import SQLiteBackend
from jobpool_async.testing import FakeClock

S = JobStatus
T = TypeVar("T")
WORKER = str(Path(__file__).with_name("sqlite_worker.py"))
DEADLINE = 20.0
POLL = 0.05


# --- helpers --------------------------------------------------------------------------------


async def run_worker(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        WORKER,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process) -> str:
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), DEADLINE)
    if not raw:
        assert proc.stderr is not None
        err = await proc.stderr.read()
        raise AssertionError(f"worker ended early: {err.decode()}")
    return raw.decode().rstrip("\n")


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[PoolQueue]:
    q = PoolQueue(SQLiteBackend(tmp_path / "jobs.db"), poll_interval=POLL)
    await q.open()
    try:
        yield q
    finally:
        await q.close()


def jobs(n: int, prefix: str = "job", **kwargs: Any) -> list[Job]:
    return [Job(id=f"{prefix}-{i}", job_type="t", **kwargs) for i in range(n)]


async def sql(backend: SQLiteBackend, statement: str, params: Sequence[Any] = ()) -> list[Any]:
    return await backend._run(sq._fetch_all, statement, tuple(params))


# --- several processes --------------------------------------------------------------------


def count_calls(backend: object, method: str) -> list[int]:
    """Count ``backend.method`` calls (in a one-item list) from now on."""
    calls = [0]
    inner = getattr(backend, method)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return await inner(*args, **kwargs)

    setattr(backend, method, counted)
    return calls


async def polled(calls: list[int], at_least: int) -> None:
    """Wait, with a deadline, until ``calls`` counted ``at_least`` calls."""
    async with asyncio.timeout(DEADLINE):
        while calls[0] < at_least:  # noqa: ASYNC110 - polling with a deadline
            await asyncio.sleep(POLL / 5)


async def test_several_processes_stream_one_file_without_duplicates(
    queue: PoolQueue, tmp_path: Path
) -> None:
    path = str(tmp_path / "jobs.db")
    total = 1200
    workers = [
        await run_worker("stream", path, "w0", str(total), "--slots", "7"),
        await run_worker("stream", path, "w1", str(total), "--slots", "3"),
        await run_worker("stream", path, "w2", str(total), "--tags", "odd", "--slots", "5"),
    ]
    for w in workers:
        assert await line(w) == "ready"
    # Enqueued in batches while the workers run: they see them only by polling.
    for k in range(0, total, 100):
        await queue.enqueue_jobs(
            [
                Job(id=f"job-{i}", job_type="t", tags=["odd" if i % 2 else "even"])
                for i in range(k, k + 100)
            ]
        )
        async with asyncio.timeout(DEADLINE):  # the next batch once they are taking these
            while (await queue.get_job_stats()).pending_jobs > 50:  # noqa: ASYNC110
                await asyncio.sleep(POLL / 5)
    delivered = {
        w: json.loads(await finish(p)) for w, p in zip(("w0", "w1", "w2"), workers, strict=True)
    }
    every = [i for ids in delivered.values() for i in ids]
    assert len(every) == len(set(every)) == total  # each job delivered exactly once
    assert all(int(i.split("-")[1]) % 2 for i in delivered["w2"])  # tag filter held
    done = await queue.get_jobs([f"job-{i}" for i in range(total)])
    assert len(done) == total
    for job in done:
        assert job.status is S.COMPLETED and job.retry_count == 0
        assert job.result == job.assignee_id.encode()  # completed by the one that got it
        assert job.id in delivered[job.assignee_id]


@pytest.mark.parametrize("moment", ["holding", "writing"])
async def test_worker_killed_mid_work_then_reset(tmp_path: Path, moment: str) -> None:
    """SIGKILL while the worker holds 5 jobs, or while it is busy claiming and
    completing: committed completions survive, nothing is half-written, and after
    ``reset_running_jobs`` every unfinished job is eligible again."""
    path = tmp_path / "jobs.db"
    total = 60
    async with PoolQueue(SQLiteBackend(path)) as q:
        await q.enqueue_jobs(jobs(total, tags=["t"]))
    completed: list[str] = []
    held: list[str] = []
    proc = await run_worker("hold", str(path), "doomed", "8" if moment == "holding" else "1000")
    while True:
        text = await line(proc)
        if text.startswith("done "):
            completed.append(text[5:])
            if moment == "writing" and len(completed) == 20:
                break  # it is in the middle of its next claim or completion
        else:
            assert text.startswith("holding ")
            held = json.loads(text[8:])
            break
    proc.send_signal(signal.SIGKILL)
    await asyncio.wait_for(proc.wait(), DEADLINE)
    assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    ids = [f"job-{i}" for i in range(total)]
    async with PoolQueue(SQLiteBackend(path), poll_interval=POLL) as q:
        before = {j.id: j for j in await q.get_jobs(ids)}
        running = {i for i, j in before.items() if j.status is S.RUNNING}
        if moment == "holding":
            assert len(completed) == 8 and running == set(held) and len(held) == 5
        else:
            assert len(running) <= 1  # its stream holds one job at a time
        for job_id, job in before.items():  # each job is whole: done with its result, or not
            if job.status is S.COMPLETED:
                assert job.result == f"result of {job_id}".encode()
                assert job.finalized_at is not None and job.assignee_id == "doomed"
            else:
                assert job.status in (S.RUNNING, S.INITIAL_PENDING) and job.result is None
        assert set(completed) <= {i for i, j in before.items() if j.status is S.COMPLETED}
        assert await q.reset_running_jobs() == len(running)
        for job_id in running:
            assert (await q.get_job(job_id)).status is S.UNKNOWN_RETRY
        # every unfinished job is eligible again: a stream (by tag, too) takes all of them
        unfinished = {i for i, j in before.items() if j.status is not S.COMPLETED}
        taken: set[str] = set()
        async with q.stream_jobs("rescuer", tags=["t"], max_assigned_jobs=100) as s:
            while taken != unfinished:
                batch = await asyncio.wait_for(s.__anext__(), DEADLINE)
                taken.update(j.id for j in batch)
                await q.complete_jobs({j.id: b"rescued" for j in batch})
        stats = await q.get_job_stats()
        assert stats.completed_jobs == total and stats.running_jobs == 0


async def test_stream_sees_jobs_enqueued_by_another_process(
    queue: PoolQueue, tmp_path: Path
) -> None:
    looks = count_calls(queue.backend, "claim")
    async with queue.stream_jobs("here", tags=["x"]) as s:
        pending = asyncio.ensure_future(s.__anext__())
        await polled(looks, 3)  # it has looked at the file again after a poll interval
        assert not pending.done()
        await finish(
            await run_worker("enqueue", str(tmp_path / "jobs.db"), "from-afar", "--tags", "x")
        )
        batch = await asyncio.wait_for(pending, DEADLINE)  # only polling can find it
    assert [j.id for j in batch] == ["from-afar"]
    assert batch[0].status is S.RUNNING and batch[0].assignee_id == "here"


async def test_slot_freed_by_another_process_is_freed_here(
    queue: PoolQueue, tmp_path: Path
) -> None:
    await queue.enqueue_jobs(jobs(2))
    async with queue.stream_jobs("here", max_assigned_jobs=1) as s:
        (first,) = await asyncio.wait_for(s.__anext__(), DEADLINE)
        looks = count_calls(queue.backend, "job_states")
        pending = asyncio.ensure_future(s.__anext__())
        await polled(looks, 2)  # it has re-read its held job after poll intervals
        assert not pending.done()  # the one slot is taken
        await finish(await run_worker("complete", str(tmp_path / "jobs.db"), first.id, "far"))
        (second,) = await asyncio.wait_for(pending, DEADLINE)
    assert second.id != first.id
    assert (await queue.get_job(first.id)).result == b"far"


async def test_fresh_file_opened_by_several_processes_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "fresh.db")
    procs = [await run_worker("enqueue", path, f"job-{i}") for i in range(4)]
    for p in procs:
        assert (await finish(p)).strip() == "ok"
    async with PoolQueue(SQLiteBackend(path)) as q:
        assert (await q.get_job_stats()).pending_jobs == 4


# --- round trips ------------------------------------------------------------------------


async def test_reopen_keeps_every_field_exactly(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    plus5 = timezone(timedelta(hours=5, minutes=30))
    created = [
        datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2031, 1, 1, 0, 0, 0, 1, tzinfo=plus5),  # stored as the same instant in UTC
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 123457, tzinfo=UTC),
    ]
    odd_tags = ["a/b", "it's", 'say "hi"', "ünï©ødé 🎉", "x" * 5000, "a,b", "[]", "%_"]
    async with PoolQueue(SQLiteBackend(path)) as q:
        for i, when in enumerate(created):
            await q.enqueue_job(
                Job(
                    id=f"job-{i} \u2603 '\"",
                    job_type=f"type-{i}",
                    job_definition=bytes(range(256)) * i + b"\x00",
                    tags=odd_tags[i : i + 3],
                    created_at=when,
                )
            )
        ids = [f"job-{i} \u2603 '\"" for i in range(len(created))]
        async with q.stream_jobs("w\x01", max_assigned_jobs=3) as s:
            batch = await asyncio.wait_for(s.__anext__(), DEADLINE)
        # the three oldest: year 1, 1969 and 2024
        assert {j.id for j in batch} == {ids[2], ids[4], ids[0]}
        await q.complete_job(ids[2], b"")
        await q.fail_job(ids[4], "first failure \u2603")
        await q.complete_job(ids[0], b"\x00\xff" * 100)
        await q.cancel_jobs(job_ids=[ids[3]])
        before = await q.get_jobs(ids)
    async with PoolQueue(SQLiteBackend(path)) as q:
        after = await q.get_jobs(ids)
    assert after == before
    for a, b in zip(after, before, strict=True):
        for name in ("created_at", "started_at", "finalized_at", "last_retry_at", "assigned_at"):
            value = getattr(a, name)
            if value is not None:
                assert value.tzinfo is UTC and value.utcoffset() == timedelta(0)
                assert (
                    value == getattr(b, name) and value.microsecond == getattr(b, name).microsecond
                )
    by_id = {j.id: j for j in after}
    assert by_id[ids[1]].created_at == created[1]
    assert by_id[ids[0]].created_at.microsecond == 999999
    # b"" stays b"", a result never set stays None
    assert by_id[ids[2]].result == b"" and by_id[ids[0]].result == b"\x00\xff" * 100
    assert by_id[ids[4]].status is S.FAILED_RETRY and by_id[ids[4]].result is None
    assert by_id[ids[4]].last_retry_at is not None and by_id[ids[4]].retry_count == 1
    assert by_id[ids[3]].status is S.UNSCHEDULED and by_id[ids[3]].finalized_at is not None
    assert by_id[ids[1]].status is S.INITIAL_PENDING and by_id[ids[1]].started_at is None


async def test_selection_order_uses_microseconds_and_enqueue_order(queue: PoolQueue) -> None:
    base = datetime(2030, 5, 5, tzinfo=UTC)
    order = [
        Job(id="c", job_type="t", created_at=base + timedelta(microseconds=2)),
        Job(id="a", job_type="t", created_at=base + timedelta(microseconds=1)),
        Job(id="tie-1", job_type="t", created_at=base + timedelta(microseconds=3)),
        Job(id="tie-0", job_type="t", created_at=base + timedelta(microseconds=3)),
    ]
    await queue.enqueue_jobs(order)
    seen = []
    async with queue.stream_jobs("w", max_assigned_jobs=1) as s:
        for _ in order:
            (job,) = await asyncio.wait_for(s.__anext__(), DEADLINE)
            seen.append(job.id)
            await queue.complete_job(job.id, None)
    assert seen == ["a", "c", "tie-1", "tie-0"]


# --- foreign files ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "other-app", "newer-schema", "text"])
async def test_foreign_file_is_refused_and_never_modified(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "not-ours.db"
    if kind == "random":
        path.write_bytes(random.Random(7).randbytes(8192))
    elif kind == "text":
        path.write_text("hello, I am a text file\n" * 100)
    else:
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('keep me')")
        if kind == "newer-schema":
            conn.execute(f"PRAGMA application_id = {sq.APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {sq.SCHEMA_VERSION + 1}")
        conn.commit()
        conn.close()
    before = path.read_bytes()
    backend = SQLiteBackend(path)
    with pytest.raises(StorageError) as info:
        await backend.open()
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    await backend.close()
    with pytest.raises(StorageError):  # and a queue over it fails the same way
        async with PoolQueue(SQLiteBackend(path)):
            pass
    assert path.read_bytes() == before


async def test_missing_directory_is_a_storage_error(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "no" / "such" / "dir" / "jobs.db")
    with pytest.raises(StorageError, match="no/such/dir"):
        await backend.open()


@pytest.mark.parametrize("parent", ["missing/dir", "a-file"])
async def test_open_backend_says_the_directory_is_missing(tmp_path: Path, parent: str) -> None:
    """Not SQLite's "unable to open database file": the directory, and nothing created."""
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StorageError) as info:
        async with PoolQueue(open_backend(f"sqlite:///{tmp_path}/{parent}/x.db")):
            pass
    why = "is not a directory" if parent == "a-file" else "does not exist"
    assert f"the directory {str(tmp_path / parent)!r} {why}" in str(info.value)
    assert os.listdir(tmp_path) == ["a-file"]


async def test_store_reopens_and_schema_is_marked(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    for _ in range(2):
        async with PoolQueue(SQLiteBackend(path)) as q:
            await q.enqueue_jobs(jobs(1, prefix=f"p{_}"))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == sq.APPLICATION_ID
    assert conn.execute("PRAGMA user_version").fetchone()[0] == sq.SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2
    conn.close()


# --- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"synchronous": "OFF"}, ValueError),
        ({"synchronous": 2}, ValueError),
        ({"busy_timeout": -1}, ValueError),
        ({"busy_timeout": True}, TypeError),  # a bool is not a number of seconds
        ({"busy_timeout": float("nan")}, ValueError),
    ],
)
def test_bad_options(tmp_path: Path, kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        SQLiteBackend(tmp_path / "x.db", **kwargs)


@pytest.mark.parametrize("path", ["", ":memory:", "file:x.db?mode=memory"])
def test_bad_paths(path: str) -> None:
    with pytest.raises(ValueError):
        SQLiteBackend(path)


@pytest.mark.parametrize(("mode", "code"), [("NORMAL", 1), ("FULL", 2), ("full", 2)])
async def test_synchronous_option_is_applied(tmp_path: Path, mode: Any, code: int) -> None:
    backend = open_backend(f"sqlite:///{tmp_path}/jobs.db", synchronous=mode)
    assert isinstance(backend, SQLiteBackend)
    assert backend.path == tmp_path / "jobs.db"
    await backend.open()
    try:
        assert await sql(backend, "PRAGMA synchronous") == [(code,)]
        assert await sql(backend, "PRAGMA journal_mode") == [("wal",)]
    finally:
        await backend.close()


async def test_default_poll_interval() -> None:
    assert SQLiteBackend.default_poll_interval == 1.0
    assert PoolQueue(SQLiteBackend("x.db")).poll_interval == 1.0


# --- failures leave the store unchanged ---------------------------------------------------


async def test_locked_store_is_a_storage_error_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with PoolQueue(SQLiteBackend(path)) as q:
        await q.enqueue_jobs(jobs(3))
    q = PoolQueue(SQLiteBackend(path, busy_timeout=0.05))
    await q.open()
    try:
        (job,) = await q.get_jobs(["job-0"])
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            with pytest.raises(StorageError, match="locked"):
                await q.enqueue_jobs(jobs(2, prefix="new"))
            with pytest.raises(StorageError, match="locked"):
                async with q.stream_jobs("w") as s:
                    await s.__anext__()
            with pytest.raises(StorageError, match="locked"):
                await q.cancel_jobs(job_ids=["job-1"])
        finally:
            blocker.rollback()
            blocker.close()
        assert (await q.get_job_stats()).pending_jobs == 3
        assert await q.get_jobs(["new-0", "new-1"]) == []
        assert await q.get_jobs(["job-0"]) == [job]
        await q.enqueue_jobs(jobs(2, prefix="new"))  # works again once the lock is gone
    finally:
        await q.close()


async def test_duplicate_in_a_late_chunk_inserts_nothing(queue: PoolQueue) -> None:
    await queue.enqueue_job(Job(id="taken", job_type="t"))
    batch = jobs(700, tags=["bulk"])  # several multi-row INSERT statements
    batch[650] = Job(id="taken", job_type="t", tags=["bulk"])
    with pytest.raises(DuplicateJobError) as info:
        await queue.enqueue_jobs(batch)
    assert info.value.job_id == "taken"
    stats = await queue.get_job_stats()
    assert stats.total_jobs == 1
    assert (await queue.get_job_stats(["bulk"])).total_jobs == 0
    backend = queue.backend
    assert isinstance(backend, SQLiteBackend)
    assert await sql(backend, "SELECT count(*) FROM job_tags") == [(0,)]


async def test_duplicate_in_a_late_chunk_of_plain_jobs_inserts_nothing(queue: PoolQueue) -> None:
    """Jobs of one type without tags go in with three parameters a row
    (``_insert_uniform``); a duplicate in its last statement still leaves nothing."""
    await queue.enqueue_job(Job(id="taken", job_type="t"))
    batch = jobs(700)
    batch[-1] = Job(id="taken", job_type=batch[0].job_type)
    with pytest.raises(DuplicateJobError) as info:
        await queue.enqueue_jobs(batch)
    assert info.value.job_id == "taken"
    assert (await queue.get_job_stats()).total_jobs == 1
    await queue.enqueue_jobs(batch[:-1])  # the same jobs go in once the duplicate is out
    assert (await queue.get_job_stats()).total_jobs == 700


def test_plain_and_mixed_batches_store_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_insert_uniform`` (one type, no tags, message or assignee) writes the rows the
    general path writes; a batch it does not take (two types, a message, an assignee)
    goes the general way."""
    created = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)

    def batch(types: Sequence[str], **extra: Any) -> list[Job]:
        return [
            check_new_job(
                Job(
                    id=f"j{i}",
                    job_type=types[i % len(types)],
                    job_definition=bytes([i % 256, 0, 255]) * (i % 5),
                    created_at=created + timedelta(microseconds=i),
                    **extra,
                )
            )
            for i in range(300)  # statements of 256, 16, 16, 4, 4, 4
        ]

    def stored(jobs: list[Job], uniform: bool) -> list[Any]:
        path = tmp_path / f"s{len(list(tmp_path.iterdir()))}.db"
        conn = sqlite3.connect(path, isolation_level=None)
        sq._open_store(conn, str(path), "NORMAL", 5000)
        calls: list[bool] = []
        real = sq._insert_uniform

        def spy(*args: Any) -> bool:
            calls.append(real(*args))
            return calls[-1]

        with monkeypatch.context() as patch:
            patch.setattr(sq, "_insert_uniform", spy)
            sq._transaction(conn, sq._insert, jobs)
        assert calls == [uniform]
        rows = conn.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        conn.close()
        return rows

    plain = stored(batch(["t"]), True)
    assert [row[:4] for row in plain[:2]] == [
        (1, "j0", "t", b""),
        (2, "j1", "t", bytes([1, 0, 255])),
    ]
    assert plain[299][6] == sq._us(created) + 299
    # the general path's rows for the same jobs (two types: not uniform), then the type
    # of every other row set back
    mixed = stored(batch(["t", "u"]), False)
    assert [(*row[:2], "t", *row[3:]) for row in mixed] == plain
    assert stored(batch(["t"], error_message="m"), False)[0][9] == "m"
    assert stored(batch(["t"], assignee_id="a"), False)[0][13] == "a"


def test_an_enqueue_keeps_no_statement_journal(tmp_path: Path) -> None:
    """Inserts are ``OR ROLLBACK``: SQLite keeps no statement journal for them. A plain
    multi-row ``INSERT`` in a transaction did, spilled past 64 KiB to a temporary file
    (unlinked at once, open until the transaction ends: seen here in /proc)."""
    fds = Path("/proc/self/fd")
    assert fds.is_dir(), "this test reads the open files of the process in /proc"
    path = tmp_path / "s.db"
    conn = sqlite3.connect(path, isolation_level=None)
    sq._open_store(conn, str(path), "NORMAL", 5000)

    def temp_files() -> list[str]:
        names = []
        for fd in fds.iterdir():
            try:
                names.append(os.readlink(fd))
            except OSError:  # closed meanwhile
                continue
        return [n for n in names if "etilqs_" in n]

    for types in (["t"], ["t", "u"]):  # _insert_uniform's statements, then the general
        batch = [
            check_new_job(
                Job(
                    id=f"{len(types)}-{i}", job_type=types[i % len(types)], job_definition=b"x" * 99
                )
            )
            for i in range(2000)
        ]
        conn.execute("BEGIN IMMEDIATE")
        sq._insert(conn, batch)
        assert temp_files() == []
        conn.execute("COMMIT")
    assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (4000,)
    conn.close()


async def test_calls_after_close_are_storage_errors(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "jobs.db")
    await backend.open()
    await backend.close()
    await backend.close()  # idempotent
    with pytest.raises(StorageError):
        await backend.get_jobs(["x"])


# --- indexes ------------------------------------------------------------------------------


def plan(conn: sqlite3.Connection, statement: str, nparams: int) -> str:
    rows = conn.execute("EXPLAIN QUERY PLAN " + statement, [1] * nparams).fetchall()
    return "\n".join(str(r[3]) for r in rows)


async def test_claim_query_plans_read_only_the_eligible_indexes(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with PoolQueue(SQLiteBackend(path)):
        pass
    conn = sqlite3.connect(path)
    untagged = plan(conn, sq.CLAIM_SQL, 3)
    assert "SCAN jobs USING INDEX jobs_eligible" in untagged
    assert "TEMP B-TREE" not in untagged  # already in selection order
    for several in (False, True):
        tagged = plan(conn, sq.claim_tags_sql(several), 5 if several else 4)
        assert "USING COVERING INDEX job_tags_eligible (tag=?)" in tagged
        assert "TEMP B-TREE" not in tagged
        assert "SCAN jobs" not in tagged and "SCAN job_tags" not in tagged
    # Jobs scheduled for later are found (and promoted) through their own index only.
    next_due = plan(conn, sq._NEXT_DUE, 0)
    assert "USING INDEX jobs_waiting" in next_due and "TEMP B-TREE" not in next_due
    assert "USING INDEX jobs_waiting (wait_until>? AND wait_until<?)" in plan(conn, sq._PROMOTE, 1)
    conn.close()


def counted(conn: sqlite3.Connection, body: Callable[[], T]) -> tuple[T, int]:
    """What ``body`` returns, and the SQLite VM instructions it executed on ``conn``
    (progress handler every step)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 1)
    try:
        out = body()
    finally:
        conn.set_progress_handler(None, 0)
    return out, steps


def vm_steps(path: Path, tags: tuple[str, ...], limit: int = 10) -> int:
    """SQLite VM instructions executed by one claim."""
    conn = sqlite3.connect(path, isolation_level=None)
    rows, steps = counted(conn, lambda: sq._claim(conn, "probe", tags, limit, 0, True))
    assert len(rows) == limit
    conn.execute(
        "UPDATE jobs SET status = 'initial_pending', list_state = 1 WHERE assignee_id = 'probe'"
    )
    conn.close()
    return steps


async def test_claim_work_does_not_grow_with_finished_jobs(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with PoolQueue(SQLiteBackend(path)) as q:
        # eligible jobs enqueued last, so finished ones come first in enqueue order
        late = datetime(2100, 1, 1, tzinfo=UTC)
        await q.enqueue_jobs(jobs(20, prefix="ready", tags=["a", "b"], created_at=late))
        empty = (vm_steps(path, ()), vm_steps(path, ("a",)), vm_steps(path, ("b", "a")))
        await q.enqueue_jobs(jobs(6000, prefix="old", tags=["a", "b"]))
        async with q.stream_jobs("w", max_assigned_jobs=1000) as s:
            for _ in range(6):
                batch = await asyncio.wait_for(s.__anext__(), DEADLINE)
                assert all(j.id.startswith("old") for j in batch)
                await q.complete_jobs({j.id: None for j in batch})
        assert (await q.get_job_stats()).completed_jobs == 6000
        full = (vm_steps(path, ()), vm_steps(path, ("a",)), vm_steps(path, ("b", "a")))
    for before, after in zip(empty, full, strict=True):
        # a scan of the finished jobs would cost tens of thousands of steps
        assert after <= before * 1.2 + 50, (empty, full)


def purge_steps(path: Path, cutoff: datetime) -> tuple[int, int]:
    """How many jobs a purge of the completed jobs finalized by ``cutoff`` deletes, and
    the SQLite VM instructions it executes (rolled back: the store is left as it was)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    deleted, steps = counted(conn, lambda: sq._delete_completed_before(conn, sq._us(cutoff)))
    conn.execute("ROLLBACK")
    conn.close()
    return deleted, steps


async def complete_all(q: PoolQueue, n: int) -> None:
    async with q.stream_jobs("w", max_assigned_jobs=n) as s:
        batch = await asyncio.wait_for(s.__anext__(), DEADLINE)
        assert len(batch) == n
        await q.complete_jobs({j.id: b"r" for j in batch})


async def test_a_purge_reads_the_completed_jobs_it_deletes_not_every_completed_one(
    tmp_path: Path,
) -> None:
    """Store version 7 has no index of every completed job by ``finalized_at``: a purge
    walks each priority's COMPLETED run of ``jobs_list_prio`` up to the cutoff by
    ``created_at`` (finalized by the cutoff: created by then), and reads
    ``jobs_finalized_early`` for the jobs finalized before their (caller-given) creation
    time. It deletes exactly the completed jobs finalized by the cutoff, whatever their
    priority or creation time, and its work does not grow with the completed jobs
    created after the cutoff."""
    path = tmp_path / "jobs.db"
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    clock = FakeClock(t0)
    day = timedelta(days=1)
    async with PoolQueue(SQLiteBackend(path), clock=clock) as q:
        early = [
            *jobs(3, prefix="old", created_at=t0 - day),
            Job(id="prio", job_type="t", priority=2, created_at=t0 - day),
            Job(id="neg", job_type="t", priority=-1, created_at=t0 - day),
            Job(id="future", job_type="t", created_at=t0 + 30 * day),  # finalized before
        ]
        await q.enqueue_jobs(early)
        await complete_all(q, len(early))
        await q.enqueue_jobs([Job(id="pending", job_type="t", created_at=t0 - day)])
        clock.advance(3600)
        cutoff = clock.now()
        clock.advance(3600)
        # created by the cutoff but finalized after it: kept
        await q.enqueue_jobs([Job(id="late", job_type="t", priority=2, created_at=t0)])
        async with q.stream_jobs("w", max_assigned_jobs=2) as s:
            batch = await asyncio.wait_for(s.__anext__(), DEADLINE)
            assert sorted(j.id for j in batch) == ["late", "pending"]
            await q.complete_jobs({"late": None})
        await q.enqueue_jobs(jobs(50, prefix="new", created_at=cutoff + timedelta(seconds=1)))
        await complete_all(q, 50)
        few = purge_steps(path, cutoff)
        await q.enqueue_jobs(jobs(2000, prefix="more", created_at=cutoff + timedelta(seconds=1)))
        await complete_all(q, 2000)
        many = purge_steps(path, cutoff)
        assert few[0] == many[0] == len(early)
        assert many[1] <= few[1] * 1.2 + 50, (few, many)  # a scan would take 10,000s
        assert await q.backend.delete_completed_before(cutoff) == len(early)
        assert await q.get_jobs([j.id for j in early]) == []
        left = await q.get_jobs(["late", "pending", "new-0", "more-0"])
        assert [j.status for j in left] == [S.COMPLETED, S.RUNNING, S.COMPLETED, S.COMPLETED]
        assert await q.backend.delete_completed_before(clock.now()) == 1 + 50 + 2000


def mixed_shapes(n: int, prefix: str, start: datetime) -> list[Job]:
    """Jobs of every row shape an insert has: plain, a priority, a schedule (past or
    future), an attempt limit, and their mixes, tagged or not, in a rotating order."""
    out = []
    for i in range(n):
        kind = i % 6
        out.append(
            Job(
                id=f"{prefix}-{i}",
                job_type="t",
                job_definition=bytes([i % 256]),
                tags=["x", f"t{i % 3}"] if i % 4 == 0 else [],
                priority=0 if kind == 0 else (i % 7) - 3,
                scheduled_at=start + timedelta(seconds=i - n // 2) if kind in (2, 4) else None,
                max_attempts=1 + i % 5 if kind in (3, 4) else None,
            )
        )
    return out


async def test_jobs_of_every_row_shape_round_trip_in_one_batch(queue: PoolQueue) -> None:
    """A batch mixing plain jobs with priorities, schedules and attempt limits is
    inserted shape by shape (no NULL is bound); every field comes back exactly, a
    scheduled job waits until its ``scheduled_at`` (its tags are not eligible), the
    others are eligible at once."""
    start = datetime.now(UTC)
    batch = mixed_shapes(600, "m", start)  # several chunks of each shape
    await queue.enqueue_jobs(batch)
    assert await queue.get_jobs([j.id for j in batch]) == batch
    backend = queue.backend
    assert isinstance(backend, SQLiteBackend)
    stored = {
        row[0]: row[1:]
        for row in await sql(backend, "SELECT id, wait_until, priority, seq FROM jobs")
    }
    tagged = dict(await sql(backend, "SELECT seq || ' ' || tag, sort_key FROM job_tags"))
    for job in batch:
        wait, priority, seq = stored[job.id]
        assert wait == (None if job.scheduled_at is None else sq._us(job.scheduled_at))
        assert (
            priority == job.priority
            and seq >> sq._ORDER_BITS == sq._cluster(job.priority) >> sq._ORDER_BITS
        )
        for tag in job.tags:
            due = None if job.scheduled_at is not None else sq._us(job.created_at)
            assert tagged[f"{seq} {tag}"] == due
    # a duplicate in the last shape's rows: nothing of the batch stays
    again = mixed_shapes(300, "n", start)
    again[-1] = Job(id="m-5", job_type="t", priority=2, scheduled_at=start, max_attempts=2)
    with pytest.raises(DuplicateJobError):
        await queue.enqueue_jobs(again)
    assert (await queue.get_job_stats()).total_jobs == len(batch)


async def test_a_claimed_job_carries_every_stored_field(tmp_path: Path) -> None:
    """A claim returns a first run's fields as one NULL and any other job's as a JSON
    array (the result as hex): either way the claimed job is the stored one, field for
    field (results with any bytes, messages with quotes and control characters,
    retries, attempt limits, schedules, priorities, tags)."""
    start = datetime.now(UTC) - timedelta(seconds=10)
    at = [start + timedelta(microseconds=k) for k in range(1, 6)]
    odd = 'it\'s "quoted" \\ \n\t\x01 \u2603 \U0001f389 ]},'
    jobs = [
        Job(id="plain", job_type="t", job_definition=b"{}", created_at=at[0]),
        Job(id="tagged", job_type="t", tags=["a", "b"], priority=-3, created_at=at[0]),
        Job(id="scheduled", job_type="t", scheduled_at=at[1], priority=2, created_at=at[0]),
        Job(id="limited", job_type="t", max_attempts=4, created_at=at[0]),
        # one field each apart from a plain job's first run
        Job(id="tag-only", job_type="t", tags=["c"], created_at=at[0]),
        Job(id="prio-only", job_type="t", priority=1, created_at=at[0]),
        Job(id="sched-only", job_type="t", scheduled_at=at[1], created_at=at[0]),
        Job(
            id="imported",
            job_type="t",
            job_definition=bytes(range(256)),
            created_at=at[0],
            started_at=at[1],
            finalized_at=at[2],
            error_message=odd,
            result=b"\x00\xff" * 50,
            retry_count=3,
            last_retry_at=at[3],
            assignee_id="old",
            assigned_at=at[4],
            max_attempts=9,
        ),
        Job(id="empty-result", job_type="t", created_at=at[0], result=b""),
        Job(id="noted", job_type="t", created_at=at[0], error_message="note"),
        Job(id="finalized", job_type="t", created_at=at[0], finalized_at=at[2]),
        Job(id="retried", job_type="t", created_at=at[0], last_retry_at=at[3]),
        Job(id="counted", job_type="t", created_at=at[0], retry_count=2),
        Job(id="started", job_type="t", created_at=at[0], started_at=at[1]),
        Job(id="attempted", job_type="t", created_at=at[0]),
        Job(id="failed", job_type="t", created_at=at[0], max_attempts=5),
    ]
    backend = SQLiteBackend(tmp_path / "jobs.db")
    await backend.open()
    try:
        await backend.insert(jobs)
        now = datetime.now(UTC)
        first = await backend.claim("w", (), 1, now)
        assert [j.id for j in first] == ["scheduled"]  # priority 2 first
        # "failed": claimed once more after failing with a message (a second run)
        await sql(
            backend,
            "UPDATE jobs SET status = 'failed_retry', list_state = 2, error_message = ?, "
            "retry_count = 1, "
            "last_retry_at = ?, attempts = 1, started_at = ?, result = ? WHERE id = 'failed'",
            (odd, sq._us(at[3]), sq._us(at[1]), b"\x00partial"),
        )
        await sql(backend, "UPDATE jobs SET attempts = 3 WHERE id = 'attempted'")
        later = now + timedelta(seconds=1)
        claimed = first + await backend.claim("w", (), 20, later)
        assert sorted(j.id for j in claimed) == sorted(j.id for j in jobs)
        stored = {j.id: j for j in await backend.get_jobs([j.id for j in jobs])}
        for job in claimed:
            assert job == stored[job.id], job.id
        by_id = {j.id: j for j in claimed}
        plain = by_id["plain"]
        assert (plain.started_at, plain.attempts, plain.error_message) == (later, 1, "")
        assert by_id["imported"].result == b"\x00\xff" * 50
        assert by_id["imported"].error_message == odd
        assert by_id["imported"].started_at == at[1] and by_id["imported"].attempts == 1
        assert by_id["empty-result"].result == b"" and by_id["noted"].error_message == "note"
        assert by_id["finalized"].finalized_at == at[2]
        assert by_id["retried"].last_retry_at == at[3] and by_id["counted"].retry_count == 2
        assert by_id["started"].started_at == at[1] and by_id["attempted"].attempts == 4
        failed = by_id["failed"]
        assert (failed.attempts, failed.retry_count, failed.result) == (2, 1, b"\x00partial")
        assert failed.error_message == odd and failed.started_at == at[1]
        assert by_id["limited"].max_attempts == 4 and by_id["tagged"].tags == ["a", "b"]
    finally:
        await backend.close()


async def test_rows_of_one_priority_are_stored_together_in_enqueue_order(
    queue: PoolQueue,
) -> None:
    """``seq`` clusters rows by priority (a claim in priority order then changes one or
    two table pages, not one per job), keeps enqueue order within a priority, and
    selections by tags still list jobs in enqueue order across priorities."""
    rnd = random.Random(5)
    enqueued: list[Job] = []
    for batch in range(4):
        more = [
            Job(id=f"b{batch}-{i}", job_type="t", tags=["x"], priority=rnd.choice([-2, 0, 3, 9]))
            for i in range(50)
        ]
        await queue.enqueue_jobs(more)
        enqueued += more
    backend = queue.backend
    assert isinstance(backend, SQLiteBackend)
    rows = await sql(backend, "SELECT id, priority FROM jobs ORDER BY seq")
    runs = [p for k, (_, p) in enumerate(rows) if k == 0 or rows[k - 1][1] != p]
    assert sorted(runs) == sorted({j.priority for j in enqueued}), "one run per priority"
    for priority in {j.priority for j in enqueued}:
        stored = [i for i, p in rows if p == priority]
        assert stored == [j.id for j in enqueued if j.priority == priority]
    cancelled = await queue.cancel_jobs(tags=["x"])
    assert cancelled.cancelled == [j.id for j in enqueued]


async def test_tag_index_stays_in_step_with_job_status(queue: PoolQueue) -> None:
    """``job_tags.sort_key`` is kept by triggers: non-NULL exactly for eligible jobs."""
    rnd = random.Random(3)
    tags = ["a", "b", "c"]
    await queue.enqueue_jobs(
        [
            Job(id=f"j{i}", job_type="t", tags=rnd.sample(tags, rnd.randint(0, 3)))
            for i in range(120)
        ]
    )
    async with queue.stream_jobs("w", max_assigned_jobs=40) as s:
        batch = await asyncio.wait_for(s.__anext__(), DEADLINE)
    for i, job in enumerate(batch):
        if i % 4 == 0:
            await queue.fail_job(job.id, "boom")
        elif i % 4 == 1:
            await queue.complete_job(job.id, b"ok")
    await queue.mark_worker_unresponsive("w")
    await queue.cancel_jobs(tags=["c"])
    await queue.fail_jobs({j.id: "again" for j in batch[2::4] if j.tags and "c" not in j.tags})
    await queue.delete_jobs(tags=["a", "c"])
    backend = queue.backend
    assert isinstance(backend, SQLiteBackend)
    bad = await sql(
        backend,
        "SELECT t.seq, t.tag, t.sort_key, j.status FROM job_tags t JOIN jobs j USING (seq) "
        f"WHERE (t.sort_key IS NOT NULL) <> {sq._ELIG.replace('status', 'j.status')} "
        "OR (t.sort_key IS NOT NULL AND t.sort_key <> COALESCE(j.last_retry_at, j.created_at))",
    )
    assert bad == []
    orphans = await sql(
        backend, "SELECT count(*) FROM job_tags WHERE seq NOT IN (SELECT seq FROM jobs)"
    )
    assert orphans == [(0,)]
    tagged = await sql(backend, "SELECT count(*) FROM jobs WHERE tags <> '[]'")
    assert tagged[0][0] > 0


async def test_text_sqlite_cannot_store_is_a_value_error_and_nothing_is_written(
    queue: PoolQueue,
) -> None:
    """A lone surrogate is not UTF-8: SQLite cannot store it (documented limitation)."""
    batch = [*jobs(3), Job(id="ok-id", job_type="t", tags=["bad \ud800 tag"])]
    with pytest.raises(ValueError, match="not valid Unicode"):
        await queue.enqueue_jobs(batch)
    assert (await queue.get_job_stats()).total_jobs == 0


async def test_idle_poll_takes_no_write_lock(tmp_path: Path) -> None:
    """With nothing eligible, a claim only reads: another process's long write does
    not make idle streams fail."""
    path = tmp_path / "jobs.db"
    backend = SQLiteBackend(path, busy_timeout=0.05)
    await backend.open()
    try:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            for tags in ((), ("a",), ("a", "b")):
                assert await backend.claim("idle", tags, 5, datetime.now(UTC)) == []
        finally:
            blocker.rollback()
            blocker.close()
    finally:
        await backend.close()


def test_a_claim_promotes_and_claims_in_one_commit(tmp_path: Path) -> None:
    """A claim that finds waiting jobs come due promotes and claims them in one write
    transaction (one commit); with nothing come due it only reads before its claim."""
    path = tmp_path / "jobs.db"
    conn = sqlite3.connect(path, isolation_level=None)
    sq._open_store(conn, str(path), "NORMAL", 5000)
    now = datetime.now(UTC)
    later = now + timedelta(seconds=5)
    waiting = [
        check_new_job(Job(id=f"w{i}", job_type="t", scheduled_at=at))
        for i, at in enumerate([now, now, later])
    ]
    sq._transaction(conn, sq._insert, waiting)
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    rows, next_due = sq._claim_promoting(conn, "a", (), 5, sq._us(now), True, True)
    conn.set_trace_callback(None)
    assert sorted(row[0] for row in rows) == ["w0", "w1"]
    assert next_due == sq._us(later)
    # (the trace repeats a statement for each row its trigger's program runs for)
    writes = [i for i, s in enumerate(seen) if s.startswith("UPDATE")]
    assert len({seen[i] for i in writes}) == 2  # the promotion, then the claim
    begin, commit = seen.index("BEGIN IMMEDIATE"), seen.index("COMMIT")
    assert begin < writes[0] and writes[-1] < commit
    assert seen.count("BEGIN IMMEDIATE") == 1 and seen.count("COMMIT") == 1
    # nothing came due: no transaction, no promotion, the claim finds nothing
    seen.clear()
    conn.set_trace_callback(seen.append)
    rows, next_due = sq._claim_promoting(conn, "a", (), 5, sq._us(now) + 1, True, True)
    conn.set_trace_callback(None)
    assert rows == [] and next_due == sq._us(later)
    assert not [s for s in seen if s.startswith(("BEGIN", "UPDATE"))]
    conn.close()


# --- listing by status (store version 5: jobs_list_prio) ------------------------------------


async def test_listing_by_status_merges_the_priorities_newest_first(queue: PoolQueue) -> None:
    """``jobs_list_prio`` keeps an idle status's jobs by priority; a listing by statuses
    merges the priorities' runs: every page, of any size, from any cursor, with or
    without a type, is exactly a scan's, newest first (ties on ``created_at`` by id)."""
    rnd = random.Random(11)
    t0 = datetime(2025, 3, 1, tzinfo=UTC)
    enqueued = [
        Job(
            id=f"j{rnd.randrange(10_000):04d}-{i}",
            job_type=rnd.choice(["a", "b"]),
            priority=rnd.choice([-40, -1, 0, 2, 3, 17, 300]),
            created_at=t0 + timedelta(seconds=rnd.randrange(60)),  # many ties
        )
        for i in range(400)
    ]
    await queue.enqueue_jobs(enqueued)
    async with queue.stream_jobs("w", max_assigned_jobs=250) as stream:
        batch = await asyncio.wait_for(stream.__anext__(), DEADLINE)
        assert len(batch) == 250
        await queue.complete_jobs({j.id: b"" for j in batch[:100]})
        await queue.fail_jobs({j.id: "no" for j in batch[100:150]})
        await queue.discard_jobs({j.id: "gone" for j in batch[150:180]})
        stored = await queue.get_jobs([j.id for j in enqueued])  # 70 RUNNING still
        asked: list[list[JobStatus]] = [
            [S.INITIAL_PENDING],
            [S.COMPLETED],
            [S.FAILED_RETRY, S.DISCARDED],
            [S.RUNNING, S.INITIAL_PENDING, S.COMPLETED],
            [S.STOPPED],
        ]
        for statuses in asked:
            for job_type in (None, "b"):
                want = sorted(
                    (
                        (j.created_at, j.id)
                        for j in stored
                        if j.status in statuses and job_type in (None, j.job_type)
                    ),
                    reverse=True,
                )
                for size in (1, 7, 60):
                    got: list[tuple[datetime, str]] = []
                    after = None
                    while True:
                        page = await queue.list_jobs(
                            statuses=statuses, job_type=job_type, limit=size, after=after
                        )
                        assert len(page.jobs) <= size
                        got += [(j.created_at, j.id) for j in page.jobs]
                        if (after := page.next_after) is None:
                            break
                    assert got == want, (statuses, job_type, size)
        oldest = await queue.backend.oldest_created(frozenset({S.INITIAL_PENDING, S.RUNNING}))
        assert oldest == min(
            j.created_at for j in stored if j.status in (S.INITIAL_PENDING, S.RUNNING)
        )


async def page_steps(backend: SQLiteBackend, statuses: list[JobStatus]) -> int:
    """SQLite VM instructions executed by one listing page of 20 by ``statuses``."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    def on(conn: sqlite3.Connection) -> None:
        conn.set_progress_handler(count, 1)

    def off(conn: sqlite3.Connection) -> None:
        conn.set_progress_handler(None, 0)

    await backend._run(on)
    try:
        from jobpool_async.backends.base import ListQuery

        rows = await backend.list_jobs(ListQuery(limit=20, statuses=frozenset(statuses)))
    finally:
        await backend._run(off)
    assert len(rows) == 20
    return steps


async def test_a_status_listing_page_costs_the_same_however_many_jobs(
    queue: PoolQueue,
) -> None:
    """A page by status reads one run per priority present, from its newest end: ten
    times the jobs (of the same priorities) cost no more VM steps."""
    backend = queue.backend
    assert isinstance(backend, SQLiteBackend)
    priorities = [-5, 0, 0, 0, 9]

    async def grow(n: int, prefix: str) -> None:
        more = [Job(id=f"{prefix}-{i}", job_type="t", priority=priorities[i % 5]) for i in range(n)]
        await queue.enqueue_jobs(more)
        batch = await backend.claim(prefix, (), n // 2, datetime.now(UTC))
        assert len(batch) == n // 2
        await queue.complete_jobs({j.id: b"" for j in batch})

    await grow(200, "small")
    asked = ([S.INITIAL_PENDING], [S.COMPLETED], [S.COMPLETED, S.INITIAL_PENDING])
    small = [await page_steps(backend, statuses) for statuses in asked]
    await grow(2000, "large")
    large = [await page_steps(backend, statuses) for statuses in asked]
    for before, after in zip(small, large, strict=True):
        assert after <= before * 1.2 + 50, (small, large)  # a scan: thousands more


async def test_listing_plans_walk_jobs_list_prio(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with PoolQueue(SQLiteBackend(path)):
        pass
    conn = sqlite3.connect(path)
    try:
        for status in (S.INITIAL_PENDING, S.COMPLETED, S.UNKNOWN_RETRY):
            args = {"p": 0, "y": "t", "c": 0, "i": "x", "n": 5}
            part = sq._status_part(status, ("j.job_type = :y", sq._AFTER)) + " LIMIT :n"
            rows = [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {part}", args)]
            assert rows == [
                "SEARCH j USING INDEX jobs_list_prio (list_state=? AND priority=? AND created_at<?)"
            ]
            for sql in (sq._priorities_sql(status), f"SELECT {sq._oldest_sql(status)[7:]}"):
                text = " ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
                assert "SCAN jobs" not in text and "TEMP B-TREE" not in text, text
                assert "COVERING INDEX jobs_list_prio (list_state=? AND priority<?)" in text
    finally:
        conn.close()


# --- jobs.list_state (store version 6) -----------------------------------------------------


def _codes_of(path: Path) -> set[JobStatus]:
    """The statuses stored, each job's ``list_state`` checked to be its status's code."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT id, status, list_state FROM jobs").fetchall()
    finally:
        conn.close()
    for job_id, status, code in rows:
        assert code == sq._STATE_CODES.get(S(status)), (job_id, status, code)
    return {S(status) for _, status, _ in rows}


async def test_every_move_keeps_list_state_in_step(tmp_path: Path) -> None:
    """``list_state`` (the key of ``jobs_list_prio`` and ``jobs_completed``) is the code
    of the job's status after every kind of move: claims, completions, failures with
    and without attempts left, stops, cancellations, requeues, a worker declared gone,
    a reset, a rescue of an expired lease."""
    path = tmp_path / "jobs.db"
    seen: set[JobStatus] = set()
    clock = FakeClock(datetime(2030, 1, 1, tzinfo=UTC))
    async with PoolQueue(SQLiteBackend(path), clock=clock, lease=timedelta(seconds=30)) as q:
        await q.enqueue_jobs(
            [
                Job(id=f"j{i:02d}", job_type="t", tags=["a"] if i % 2 else [], max_attempts=2)
                for i in range(24)
            ]
        )
        seen |= _codes_of(path)
        async with q.stream_jobs("w", max_assigned_jobs=24) as stream:
            ids = sorted(j.id for j in await stream.__anext__())
        seen |= _codes_of(path)
        await q.complete_jobs({i: b"r" for i in ids[0:3]})
        await q.fail_jobs({i: "boom" for i in ids[3:8]})
        await q.discard_jobs({i: "x" for i in ids[8:10]})
        await q.stop_jobs({i: "s" for i in ids[10:12]})
        await q.mark_jobs_unknown_stopped({i: "l" for i in ids[13:15]})
        await q.cancel_jobs(job_ids=ids[15:19])
        seen |= _codes_of(path)
        await q.acknowledge_cancellation({ids[15]: True, ids[16]: False})
        await q.requeue_jobs(job_ids=[ids[8], ids[10]])
        await q.mark_worker_unresponsive("w")
        seen |= _codes_of(path)
        async with q.stream_jobs("v", max_assigned_jobs=24) as stream:
            again = [j.id for j in await stream.__anext__()]
        seen |= _codes_of(path)
        await q.fail_jobs({i: "again" for i in again[:4]})  # the second attempt: discarded
        await q.enqueue_jobs(
            [Job(id="later", job_type="t", scheduled_at=clock.now() + timedelta(days=1))]
        )
        await q.cancel_jobs(job_ids=["later"])
        seen |= _codes_of(path)
        await q.reset_running_jobs()
        seen |= _codes_of(path)
        async with q.stream_jobs("x", max_assigned_jobs=2) as stream:
            await stream.__anext__()
        clock.advance(timedelta(minutes=5))
        assert await q.rescue_expired() > 0
        seen |= _codes_of(path)
    assert seen == set(S), seen
