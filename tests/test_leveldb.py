"""LevelDB-specific tests: persistence, crash recovery, key encoding, index consistency.

The shared behaviour is covered by ``tests/conformance`` (run with ``-k leveldb``).
``check_store`` below re-derives every index and counter from the job records,
independently of the backend's own index code, and compares them with the keys
actually stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import plyvel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobpool_async import (
    BatchError,
    CancelResult,
    Job,
    JobPoolError,
    JobsNotFinalError,
    JobStatus,
    MemoryBackend,
    PoolQueue,
    StorageError,
)
from jobpool_async.backends import _leveldb_codec as codec
from jobpool_async.backends import leveldb as leveldb_module
from jobpool_async.backends import open_backend
from jobpool_async.backends.leveldb import LevelDBBackend

S = JobStatus
CHILD = Path(__file__).with_name("leveldb_child.py")
DEADLINE = 30.0
ELIGIBLE = {S.INITIAL_PENDING, S.FAILED_RETRY, S.UNKNOWN_RETRY}
ACTIVE = {S.RUNNING, S.CANCELLING}
HOSTILE = [
    "a",
    "ab",
    "a\x01",
    "a\x01b",
    "\x01",
    "\x01x",
    "a/b",
    "a:b",
    "a\\b",
    "'\"",
    " ",
    "é",
    "\U0001f600",
    "\ud7ff",  # (a lone surrogate is rejected upstream as not valid Unicode)
    "\uffff",
    "\x7f\x80",
    "a" * 5000,
    "a" * 5000 + "b",
]


# --- an independent checker of the on-disk layout ---------------------------------------


def _enc(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass").replace(b"\x00", b"\x00\xff")
    return raw + b"\x00\x01"


def _micros(dt: datetime) -> int:
    return (dt - datetime(1, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def check_store(path: Path) -> dict[str, Job]:
    """Open the (closed) store with plyvel and verify every index against the records.

    Returns the jobs. Fails on any missing, extra or wrong index key or counter.
    """
    db = plyvel.DB(str(path))
    try:
        data = dict(db.iterator())
    finally:
        db.close()
    meta = json.loads(data.pop(b"M"))
    assert meta == {"application": "jobpool_async", "format": 6}
    next_seq, promoted, *global_counts = struct.unpack(">QQ11q", data.pop(b"N"))
    # Format 6: an ``A`` key may hold its job's claim (the claim's time, u64 micros),
    # and the job's record the job as it was before (see the module docs).
    claims: dict[bytes, tuple[str, int]] = {}
    for key, value in data.items():
        if key[:1] == b"A" and value:
            assignee, end = codec.split_enc(key, 1)
            assert len(value) == 8, key
            claims[key[end + 8 :]] = (assignee, struct.unpack(">Q", value)[0])
    jobs: dict[str, Job] = {}
    expected: set[bytes] = set()
    tag_counts: dict[str, list[int]] = {}
    counts = [0] * 11
    seqs: set[int] = set()
    for key in [k for k in data if k[:1] == b"J"]:
        raw = data.pop(key)
        job, seq = codec.decode_job(raw)
        if raw[0] == codec.RECORD_VERSION:  # (a claim or completion patches records)
            assert raw == codec.encode_job(job, seq), job
        idb = job.id.encode("utf-8", "surrogatepass")
        assert key == b"J" + idb
        if idb in claims:  # ASSIGN, as the claim applied it
            assert job.status in ELIGIBLE, job
            assignee, at_us = claims.pop(idb)
            at = datetime(1, 1, 1, tzinfo=UTC) + timedelta(microseconds=at_us)
            job.status, job.assignee_id, job.assigned_at = S.RUNNING, assignee, at
            job.attempts += 1
            job.started_at = job.started_at or at
        assert seq not in seqs and seq < next_seq
        seqs.add(seq)
        jobs[job.id] = job
        code = codec.STATUS_CODES.index(job.status)
        counts[code] += 1
        counts[10] += job.retry_count
        created = struct.pack(">Q", _micros(job.created_at))
        if job.status not in ACTIVE:  # (listed from their A keys)
            expected.add(b"S" + bytes([code]) + created + idb)
        expected.add(b"Y" + _enc(job.job_type) + created + idb)
        for tag in job.tags:
            expected.add(b"T" + _enc(tag) + idb)
            expected.add(b"C" + _enc(tag) + created + idb)
            per_tag = tag_counts.setdefault(tag, [0] * 11)
            per_tag[code] += 1
            per_tag[10] += job.retry_count
        waiting = job.scheduled_at is not None and _micros(job.scheduled_at) > promoted
        if job.status in ELIGIBLE and waiting:
            assert job.scheduled_at is not None
            expected.add(b"W" + struct.pack(">QQ", _micros(job.scheduled_at), seq) + idb)
        elif job.status in ELIGIBLE:
            sort_key = job.scheduled_at or job.last_retry_at or job.created_at
            prio = struct.pack(">H", 32767 - job.priority)
            order = prio + struct.pack(">QQ", _micros(sort_key), seq) + idb
            expected.add(b"E" + order)
            expected.update(b"F" + _enc(tag) + order for tag in job.tags)
        elif job.status in ACTIVE:
            expected.add(b"A" + _enc(job.assignee_id) + created + idb)
        elif job.status is S.COMPLETED:
            assert job.finalized_at is not None
            expected.add(b"D" + struct.pack(">QQ", _micros(job.finalized_at), seq) + idb)
        if job.status.is_final:
            assert job.finalized_at is not None
    assert global_counts == counts
    stored_tag_counts = {
        k[1:]: list(struct.unpack(">11q", data.pop(k))) for k in [k for k in data if k[:1] == b"K"]
    }
    assert stored_tag_counts == {_enc(t): c for t, c in tag_counts.items()}
    for key in [k for k in data if k[:1] == b"G"]:  # leases: enc(assignee) holder, 3 u64
        _, end = codec.split_enc(key, 1)
        assert key[end:] and len(data.pop(key)) == 24
    assert not claims, f"claims without a record: {sorted(claims)[:5]}"
    index = {k: v for k, v in data.items() if k[:1] in b"EFTADLSYCW"}
    assert {v for k, v in index.items() if k[:1] != b"A"} <= {b""}
    missing, extra = expected - set(index), set(index) - expected
    assert not missing and not extra, (sorted(missing)[:5], sorted(extra)[:5])
    assert len(index) == len(data), f"unknown keys: {sorted(set(data) - set(index))[:5]}"
    return jobs


# --- fixtures and helpers -----------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "jobs.ldb"


@pytest.fixture
async def queue(store: Path) -> AsyncIterator[PoolQueue]:
    q = PoolQueue(LevelDBBackend(store))
    await q.open()
    try:
        yield q
    finally:
        await q.close()


async def take(
    queue: PoolQueue, assignee: str, limit: int, tags: list[str] | None = None
) -> list[Job]:
    async with queue.stream_jobs(assignee, tags=tags, max_assigned_jobs=limit) as stream:
        return await asyncio.wait_for(stream.__anext__(), DEADLINE)


class CountingDB:
    """Wraps a plyvel DB to count keys read (``get`` calls and iterator steps)."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.reads = 0
        #: ``WriteBatch`` objects made (each operation writes the ones it makes).
        self.writes = 0
        self.fail_writes = False

    def get(self, key: bytes, default: Any = None) -> Any:
        self.reads += 1
        return self._db.get(key, default)

    def iterator(self, **kwargs: Any) -> CountingIterator:
        return CountingIterator(self, self._db.iterator(**kwargs))

    def write_batch(self, **kwargs: Any) -> Any:
        self.writes += 1
        batch = self._db.write_batch(**kwargs)
        if self.fail_writes:
            return FailingBatch(batch)
        return batch

    def close(self) -> None:
        self._db.close()


class CountingIterator:
    def __init__(self, owner: CountingDB, it: Any) -> None:
        self._owner, self._it = owner, it

    def __enter__(self) -> CountingIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self._it.close()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        value = next(self._it)
        self._owner.reads += 1
        return value


class FailingBatch:
    """A write batch whose ``write`` fails like a full disk would."""

    def __init__(self, batch: Any) -> None:
        self._batch = batch

    def put(self, key: bytes, value: bytes) -> None:
        self._batch.put(key, value)

    def delete(self, key: bytes) -> None:
        self._batch.delete(key)

    def write(self) -> None:
        raise plyvel.IOError(b"IO error: simulated: No space left on device")


def counting(queue: PoolQueue) -> CountingDB:
    backend = queue.backend
    assert isinstance(backend, LevelDBBackend)
    proxy = CountingDB(backend._db)
    backend._db = proxy
    return proxy


# --- optional dependency ------------------------------------------------------------


def test_missing_plyvel_gives_an_import_error_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "plyvel", None)
    with pytest.raises(ImportError, match=r"pip install 'jobpool_async\[leveldb\]'"):
        LevelDBBackend(tmp_path / "x")
    with pytest.raises(ImportError, match=r"jobpool_async\[leveldb\]"):
        open_backend(f"leveldb:///{tmp_path / 'x'}")
    assert not (tmp_path / "x").exists()


def test_the_library_works_without_plyvel(tmp_path: Path) -> None:
    code = f"""
import asyncio, sys
sys.modules["plyvel"] = None
import jobpool_async
from jobpool_async import Job, MemoryBackend, PoolQueue
from jobpool_async.backends import leveldb as leveldb_module
from jobpool_async.backends.leveldb import LevelDBBackend

async def main():
    async with PoolQueue(MemoryBackend()) as q:
        await q.enqueue_job(Job(id="a", job_type="t"))
        async with q.stream_jobs("w") as s:
            batch = await s.__anext__()
        await q.complete_job(batch[0].id, b"ok")
        assert (await q.get_job("a")).status == "completed"
asyncio.run(main())
try:
    LevelDBBackend({str(tmp_path / "x")!r})
except ImportError as exc:
    print("import error:", exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "import error:" in out.stdout
    assert "pip install 'jobpool_async[leveldb]'" in out.stdout


# --- construction, opening, locking -------------------------------------------------


def test_bad_constructor_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        LevelDBBackend(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LevelDBBackend("")
    with pytest.raises(TypeError):
        LevelDBBackend(tmp_path / "x", sync="yes")  # type: ignore[arg-type]


async def test_open_backend_url_and_sync_option(tmp_path: Path) -> None:
    backend = open_backend(f"leveldb:///{tmp_path / 'a.ldb'}", sync=True)
    assert isinstance(backend, LevelDBBackend)
    assert backend.sync is True and backend.path == tmp_path / "a.ldb"
    async with PoolQueue(backend) as q:
        assert q.poll_interval is None
        await q.enqueue_job(Job(id="x", job_type="t"))
    async with PoolQueue(LevelDBBackend(tmp_path / "a.ldb")) as q:
        assert (await q.get_job("x")).status is S.INITIAL_PENDING


async def test_second_opener_in_the_same_process_gets_storage_error(store: Path) -> None:
    first = LevelDBBackend(store)
    await first.open()
    try:
        second = LevelDBBackend(store)
        with pytest.raises(StorageError, match="in use"):
            await second.open()
        await second.close()
    finally:
        await first.close()
    third = LevelDBBackend(store)  # the lock is released on close
    await third.open()
    await third.close()


@contextlib.asynccontextmanager
async def held_by_child(store: Path) -> AsyncIterator[None]:
    """The store open in a child process for the duration of the block."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        "hold",
        str(store),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        line = await asyncio.wait_for(holder.stdout.readline(), DEADLINE)
        assert line == b"open\n"
        yield
    finally:
        holder.stdin.close()
        await asyncio.wait_for(holder.wait(), DEADLINE)


async def test_second_opener_in_another_process_gets_storage_error(store: Path) -> None:
    async with held_by_child(store):
        backend = LevelDBBackend(store)
        with pytest.raises(StorageError, match="in use"):
            await backend.open()
    # and the other way round: this process holds it, a child is refused
    async with PoolQueue(LevelDBBackend(store)) as q:
        await q.open()
        child = await asyncio.create_subprocess_exec(
            sys.executable, str(CHILD), "try", str(store), stdout=asyncio.subprocess.PIPE
        )
        stdout, _ = await asyncio.wait_for(child.communicate(), DEADLINE)
    assert stdout.decode().startswith("error StorageError:"), stdout
    assert "in use" in stdout.decode()


async def test_a_plain_file_is_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"hello")
    with pytest.raises(StorageError, match="not a"):
        await LevelDBBackend(path).open()
    assert path.read_bytes() == b"hello"


async def test_a_non_empty_directory_is_not_a_store_and_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "dir"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="not a LevelDB store"):
        await LevelDBBackend(path).open()
    assert sorted(p.name for p in path.iterdir()) == ["notes.txt"]


async def test_an_empty_directory_becomes_a_store(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.mkdir()
    async with PoolQueue(LevelDBBackend(path)) as q:
        await q.enqueue_job(Job(id="a", job_type="t"))
    assert set(check_store(path)) == {"a"}


async def test_a_foreign_leveldb_database_is_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "foreign"
    db = plyvel.DB(str(path), create_if_missing=True)
    db.put(b"user-key", b"user-value")
    db.close()
    with pytest.raises(StorageError, match="not a jobpool_async store"):
        await LevelDBBackend(path).open()
    db = plyvel.DB(str(path))
    assert dict(db.iterator()) == {b"user-key": b"user-value"}
    db.put(b"M", json.dumps({"application": "someone-else", "format": 1}).encode())
    db.close()
    with pytest.raises(StorageError, match="not a jobpool_async store"):
        await LevelDBBackend(path).open()


async def test_a_store_from_a_newer_format_is_refused(store: Path) -> None:
    async with PoolQueue(LevelDBBackend(store)) as q:
        await q.enqueue_job(Job(id="a", job_type="t"))
    db = plyvel.DB(str(store))
    db.put(b"M", json.dumps({"application": "jobpool_async", "format": 99}).encode())
    db.close()
    with pytest.raises(StorageError, match="newer"):
        await LevelDBBackend(store).open()


async def test_a_corrupt_record_is_a_storage_error(store: Path) -> None:
    async with PoolQueue(LevelDBBackend(store)) as q:
        await q.enqueue_jobs([Job(id="a", job_type="t"), Job(id="b", job_type="t")])
    db = plyvel.DB(str(store))
    db.put(b"Ja", b"\x01garbage")
    db.put(b"Jb", b"\x07" + b"\x00" * 80)  # an unknown record version
    db.close()
    async with PoolQueue(LevelDBBackend(store)) as q:
        with pytest.raises(StorageError, match="corrupt"):
            await q.get_job("a")
        with pytest.raises(StorageError, match="format 7"):
            await q.get_job("b")


async def test_calls_after_close_are_storage_errors(store: Path) -> None:
    backend = LevelDBBackend(store)
    await backend.open()
    await backend.close()
    await backend.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        await backend.get_jobs(["a"])


async def test_an_operation_whose_caller_is_cancelled_still_runs_to_its_end(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = LevelDBBackend(store)
    await backend.open()
    try:
        jobs = [Job(id=f"j{i}", job_type="t") for i in range(2000)]
        task = asyncio.ensure_future(backend.insert(jobs))
        await asyncio.sleep(0)  # submitted: the task now awaits the worker thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Queued behind it in the one worker thread, the next call sees all of it.
        assert await backend.count_by_status([]) == ({S.INITIAL_PENDING: 2000}, 0)
        # A failure nobody waits for any more is not reported as never retrieved.
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            failing = asyncio.ensure_future(backend.insert(jobs[:1]))  # a duplicate id
            await asyncio.sleep(0)
            failing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await failing
            assert await backend.count_by_status([]) == ({S.INITIAL_PENDING: 2000}, 0)
            del failing
            gc.collect()
        assert not caplog.records
    finally:
        await backend.close()


async def test_a_failure_set_before_its_caller_is_cancelled_is_not_reported(
    store: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The outcome reaches the call's future, then its caller is cancelled before it
    # wakes: the error is not reported as never retrieved (the wake-up took it).
    backend = LevelDBBackend(store)
    await backend.open()
    try:
        await backend.insert([Job(id="a", job_type="t")])
        assert backend._thread is not None
        callers: list[asyncio.Task[None]] = []
        real_submit = backend._thread.submit

        def submit(fn: Any, *args: Any) -> asyncio.Future[Any]:
            future = real_submit(fn, *args)
            # Runs once the outcome is set, before the caller's wake-up (added after).
            future.add_done_callback(lambda _: callers[0].cancel())
            return future

        monkeypatch.setattr(backend._thread, "submit", submit)
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            callers.append(asyncio.ensure_future(backend.insert([Job(id="a", job_type="t")])))
            with pytest.raises(asyncio.CancelledError):  # not the DuplicateJobError set
                await callers[0]
            callers.clear()
            await asyncio.sleep(0)
            gc.collect()
        assert not caplog.records
    finally:
        await backend.close()


# --- persistence --------------------------------------------------------------------


async def test_reopen_keeps_every_field_exactly(store: Path) -> None:
    plus2 = timezone(timedelta(hours=2))
    created = datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=plus2)
    jobs = [
        Job(
            id="bytes",
            job_type="tÿpe \U0001f600",
            job_definition=bytes(range(256)) * 3,
            tags=["z", "a", "\U0010ffff", "a" * 3000],
            created_at=created,
        ),
        Job(id="empty-result", job_type="", created_at=datetime(1, 1, 1, tzinfo=UTC)),
        Job(
            id="none-result",
            job_type="t",
            created_at=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        ),
        Job(id="failed", job_type="t", tags=["x"]),
        Job(id="cancelling", job_type="t"),
        Job(id="pending", job_type="t", job_definition=b""),
    ]
    async with PoolQueue(LevelDBBackend(store)) as q:
        await q.enqueue_jobs(jobs)
        running = await take(q, "worker \u00e9", 10)
        assert {j.id for j in running} == {j.id for j in jobs}
        await q.complete_job("bytes", bytes(range(255, -1, -1)))
        await q.complete_job("empty-result", b"")
        await q.update_job_status("none-result", S.STOPPED, error_message="stopped \n\t")
        await q.fail_job("failed", "boom \x01")
        await q.cancel_jobs(job_ids=["cancelling"])
        await q.fail_job("pending", "again")
        before = await q.get_jobs([j.id for j in jobs])
    async with PoolQueue(LevelDBBackend(store)) as q:
        after = await q.get_jobs([j.id for j in jobs])
    assert after == before
    for b, a in zip(before, after, strict=True):
        for name in ("created_at", "started_at", "finalized_at", "last_retry_at", "assigned_at"):
            value = getattr(a, name)
            assert value is None or value.tzinfo is UTC, (a.id, name, value)
            assert value == getattr(b, name)
    by_id = {j.id: j for j in after}
    assert by_id["bytes"].created_at == created
    assert by_id["bytes"].job_definition == bytes(range(256)) * 3
    assert by_id["bytes"].result == bytes(range(255, -1, -1))
    assert by_id["bytes"].tags == ["z", "a", "\U0010ffff", "a" * 3000]
    assert by_id["empty-result"].result == b""
    assert by_id["none-result"].result is None
    assert by_id["failed"].status is S.FAILED_RETRY and by_id["failed"].retry_count == 1
    assert by_id["cancelling"].status is S.CANCELLING
    assert by_id["bytes"].assignee_id == "worker \u00e9"
    check_store(store)


async def test_tables_are_written_uncompressed_and_compressed_ones_still_read(
    store: Path,
) -> None:
    payload = b"compressible " * 400  # snappy would shrink this to a fraction
    # A store whose tables were compressed (plyvel's default, as LevelDBBackend
    # opened stores before): its records are read as ever.
    async with PoolQueue(LevelDBBackend(store)) as q:
        await q.enqueue_jobs([Job(id="old", job_type="t", job_definition=payload)])
    db = plyvel.DB(str(store))  # reopening writes the log's contents to a table
    db.compact_range()
    db.close()
    holds = _tables_hold(store, payload)
    assert holds and not any(holds)
    async with PoolQueue(LevelDBBackend(store)) as q:
        await q.enqueue_jobs([Job(id="new", job_type="t", job_definition=payload)])
    async with PoolQueue(LevelDBBackend(store)) as q:
        # (this open wrote the log to a table, uncompressed)
        assert [j.job_definition for j in await q.get_jobs(["old", "new"])] == [payload] * 2
    assert any(_tables_hold(store, payload))
    check_store(store)


def _tables_hold(store: Path, data: bytes) -> list[bool]:
    """Per table file of the store: whether ``data`` is in it as it is."""
    return [data in table.read_bytes() for table in store.glob("*.ldb")]


async def test_enqueue_order_survives_reopen(store: Path) -> None:
    same_time = datetime(2025, 1, 1, tzinfo=UTC)
    async with PoolQueue(LevelDBBackend(store)) as q:
        await q.enqueue_jobs(
            [Job(id=f"first-{i}", job_type="t", created_at=same_time) for i in range(3)]
        )
    async with PoolQueue(LevelDBBackend(store)) as q:
        # ids sort before the first batch's, so only the sequence can order them
        await q.enqueue_jobs(
            [Job(id=f"a-{i}", job_type="t", created_at=same_time) for i in range(3)]
        )
        order = []
        for _ in range(6):
            order += [j.id for j in await take(q, "w", 1)]
    assert order == [f"first-{i}" for i in range(3)] + [f"a-{i}" for i in range(3)]


async def test_a_failed_write_leaves_the_store_and_counters_unchanged(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write failing like a full disk changes nothing; the backend then reopens its
    handle before the next call (every handle here fails its writes while
    ``failing`` is set), and works again once writes can succeed."""
    failing = [False]
    handles: list[CountingDB] = []
    real_db = plyvel.DB

    def open_db(*args: Any, **kwargs: Any) -> CountingDB:
        handle = CountingDB(real_db(*args, **kwargs))
        handle.fail_writes = failing[0]
        handles.append(handle)
        return handle

    monkeypatch.setattr(plyvel, "DB", open_db)
    async with PoolQueue(LevelDBBackend(store)) as q:
        await q.enqueue_jobs([Job(id=f"j{i}", job_type="t", tags=["t"]) for i in range(5)])
        before = (await q.get_job_stats(), await q.get_job_stats(["t"]))
        handles[-1].fail_writes = failing[0] = True
        with pytest.raises(StorageError, match=r"No space left.*reopened before the next call"):
            await q.enqueue_job(Job(id="new", job_type="t", tags=["t"]))
        assert len(handles) == 1
        with pytest.raises(StorageError, match="No space left"):
            await q.cancel_jobs(tags=["t"])
        assert len(handles) == 2, "the handle that failed a write was replaced"
        failing[0] = False
        assert (await q.get_job_stats(), await q.get_job_stats(["t"])) == before
        assert len(handles) == 3
        assert await q.get_jobs(["new"]) == []
        assert {j.status for j in await q.get_jobs([f"j{i}" for i in range(5)])} == {
            S.INITIAL_PENDING
        }
        assert len(await take(q, "w", 5)) == 5
        assert len(handles) == 3, "a sound handle is kept"
    jobs = check_store(store)
    assert {j.status for j in jobs.values()} == {S.RUNNING}


async def test_a_reopen_that_fails_is_retried_by_the_next_call(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the store cannot be reopened after a failed write (the disk is still
    full), each call says so; the first call after that works."""
    async with PoolQueue(LevelDBBackend(store)) as q:
        await q.enqueue_job(Job(id="a", job_type="t"))
        proxy = counting(q)
        proxy.fail_writes = True
        with pytest.raises(StorageError, match="No space left"):
            await q.enqueue_job(Job(id="b", job_type="t"))
        real_db = plyvel.DB

        def full_disk(*args: Any, **kwargs: Any) -> Any:
            raise plyvel.IOError(b"IO error: 000009.ldb: No space left on device")

        monkeypatch.setattr(plyvel, "DB", full_disk)
        for _ in range(2):
            with pytest.raises(StorageError, match="reopening the store failed too"):
                await q.get_jobs(["a"])
        monkeypatch.setattr(plyvel, "DB", real_db)
        assert [j.id for j in await q.get_jobs(["a", "b"])] == ["a"]
        await q.enqueue_job(Job(id="c", job_type="t"))
    assert sorted(check_store(store)) == ["a", "c"]


# --- damage and repair ---------------------------------------------------------------

#: LevelDB's human-readable diagnostic log, rotated by every open attempt: not data.
_INFO_LOGS = {"LOG", "LOG.old"}


async def _write_store(store: Path, n: int = 3000) -> dict[str, Job]:
    """A store written by the backend, jobs in several statuses; returns every job."""
    async with PoolQueue(LevelDBBackend(store)) as q:
        for start in range(0, n, 100):
            await q.enqueue_jobs(
                [
                    Job(id=f"j{i:05}", job_type="t", tags=["all", f"g{i % 3}"])
                    for i in range(start, start + 100)
                ]
            )
        running = await take(q, "w", 300)
        await q.complete_jobs({j.id: b"ok" for j in running[:100]})
        await q.fail_jobs({j.id: "boom" for j in running[100:200]})
        return {j.id: j for j in await q.get_jobs([f"j{i:05}" for i in range(n)])}


def _damage_log(store: Path) -> None:
    """Overwrite 64 bytes in the middle of the write-ahead log with other bytes."""
    (log,) = store.glob("*.log")
    data = bytearray(log.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    log.write_bytes(bytes(data))


def _files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in store.iterdir() if p.name not in _INFO_LOGS}


def _contents(store: Path) -> dict[bytes, bytes]:
    """Every key and value (a LevelDB open that succeeds writes a new manifest and
    log, so the files of a sound store change even when no key does)."""
    db = plyvel.DB(str(store))
    try:
        return dict(db.iterator())
    finally:
        db.close()


async def test_a_damaged_log_fails_the_open_and_leaves_the_store_as_it_was(store: Path) -> None:
    written = await _write_store(store)
    _damage_log(store)
    before = _files(store)
    for _ in range(2):  # (the first failed open must not make the damage permanent)
        with pytest.raises(StorageError, match=r"damaged.*LevelDBBackend\.repair"):
            await LevelDBBackend(store).open()
        assert _files(store) == before, "a failed open changed the store"
    report = await LevelDBBackend.repair(store)
    assert report.counted_before == len(written)
    # The damaged part of the log is lost; a record salvaged from it that does not
    # decode (its batch passed LevelDB's checks, its bytes are wrong) is removed.
    assert 0 < report.jobs <= report.jobs + report.dropped_records < len(written)
    survivors = check_store(store)  # every index and counter agrees with the records
    assert len(survivors) == report.jobs and set(survivors) <= set(written)
    async with PoolQueue(LevelDBBackend(store)) as q:
        assert (await q.get_job_stats()).total_jobs == report.jobs
        await q.enqueue_job(Job(id="after", job_type="t", tags=["all"]))
        assert (
            len(await take(q, "w2", 5000, ["all"]))
            == sum(1 for j in survivors.values() if j.status.is_eligible) + 1
        )
    check_store(store)


async def test_counters_that_disagree_with_the_records_fail_the_open(store: Path) -> None:
    """A store damaged before the open checked for it (LevelDB, opened without
    paranoid checks, dropped the damaged records and rewrote its log) counts jobs
    that are gone: the open says so instead of serving phantom pending jobs."""
    written = await _write_store(store)
    _damage_log(store)
    plyvel.DB(str(store)).close()  # what an open without paranoid checks does
    before = _contents(store)
    with pytest.raises(StorageError, match=r"counters disagree.*LevelDBBackend\.repair") as e:
        await LevelDBBackend(store).open()
    assert f"where the counters say {len(written)}" in str(e.value)
    assert _contents(store) == before
    report = await LevelDBBackend.repair(store)
    assert report.counted_before == len(written) and report.jobs < len(written)
    assert len(check_store(store)) == report.jobs
    async with PoolQueue(LevelDBBackend(store)) as q:
        assert (await q.get_job_stats()).total_jobs == report.jobs


async def test_a_lost_index_entry_fails_the_open_and_repair_restores_it(store: Path) -> None:
    async with PoolQueue(LevelDBBackend(store)) as q:
        await q.enqueue_jobs([Job(id=f"j{i}", job_type="t", tags=["x"]) for i in range(5)])
    db = plyvel.DB(str(store))
    (key,) = list(db.iterator(prefix=b"E", include_value=False))[:1]
    db.delete(key)
    db.put(b"Jjunk", b"\x01not a record")
    db.close()
    with pytest.raises(StorageError, match="4 eligible-index entries where the counters say 5"):
        await LevelDBBackend(store).open()
    report = await LevelDBBackend.repair(store)
    assert (report.jobs, report.counted_before, report.dropped_records) == (5, 5, 1)
    assert sorted(check_store(store)) == [f"j{i}" for i in range(5)]
    async with PoolQueue(LevelDBBackend(store)) as q:
        assert [j.id for j in await take(q, "w", 10, ["x"])] == [f"j{i}" for i in range(5)]


async def test_repair_of_a_sound_store_changes_no_job(store: Path) -> None:
    written = await _write_store(store, 500)
    report = await LevelDBBackend.repair(store)
    assert (report.jobs, report.counted_before, report.dropped_records) == (500, 500, 0)
    assert check_store(store) == written


# --- format 6: a claim held in the job's ``A`` key ----------------------------------------


async def test_a_claimed_job_read_from_the_store_is_as_its_claim_made_it(store: Path) -> None:
    """A claim writes no job record (format 6): the job's ``A`` key holds the claim's
    time, its record the job as it was. Read from the store (its cached record dropped,
    or after reopening), a claimed job (a first attempt, and a retried one that had
    started before) is as claimed in every read by id, state, listing, count and
    selection, and moves on from there (cancel, complete, an unresponsive worker)."""
    from jobpool_async.testing import FakeClock

    clock = FakeClock(datetime(2030, 1, 1, tzinfo=UTC))
    ids = [f"j{i}" for i in range(6)]
    async with PoolQueue(LevelDBBackend(store), clock=clock) as q:
        await q.enqueue_jobs(
            [
                Job(id=i, job_type=f"t{n % 2}", tags=["x"] if n % 2 else [])
                for n, i in enumerate(ids)
            ]
        )
        first = await take(q, "w1", 2)
        started = first[0].started_at
        await q.fail_jobs({first[0].id: ("boom", timedelta(0))})  # retried at once
        clock.advance(timedelta(seconds=5))
        claimed = {j.id: j for j in await take(q, "w\x01two", 10)}
        assert len(claimed) == 5 and first[0].id in claimed
        again = claimed[first[0].id]
        assert (again.attempts, again.started_at, again.error_message) == (2, started, "boom")
        assert again.assigned_at == clock.now() != started
        backend = q.backend
        assert isinstance(backend, LevelDBBackend)
        assert set(backend._claims) == {*claimed, first[1].id}
        backend._active.clear()  # (read from the store from here)
        want = await q.get_jobs(ids)
        assert {j.id: j for j in want if j.id in claimed} == claimed
    db = plyvel.DB(str(store))
    try:  # the claimed jobs' records are as before their claims
        for job_id in claimed:
            job, _ = codec.decode_job(db.get(b"J" + job_id.encode()))
            assert job.status in {S.INITIAL_PENDING, S.FAILED_RETRY}, job
    finally:
        db.close()
    async with PoolQueue(LevelDBBackend(store), clock=clock) as q:
        backend = q.backend
        assert isinstance(backend, LevelDBBackend)
        assert set(backend._claims) == {*claimed, first[1].id}
        assert await q.get_jobs(ids) == want
        states = await backend.job_states(ids)
        assert {i: (s.status, s.assigned_at) for i, s in states.items()} == {
            j.id: (j.status, j.assigned_at) for j in want
        }
        await _check_listings(q, want)
        stats = await q.get_job_stats()
        assert (stats.total_jobs, stats.by_status[S.RUNNING]) == (6, 6)
        everything = await backend._run(backend._everything, None)
        assert sorted((r.full() for r in everything), key=lambda j: j.id) == want
        await q.cancel_jobs(job_ids=["j0"])  # CANCELLING: its A key no longer a claim
        await q.complete_jobs({"j2": b"ok"})
        assert set(backend._claims) == {*claimed, first[1].id} - {"j0", "j2"}
    jobs = check_store(store)
    assert (jobs["j0"].status, jobs["j2"].status) == (S.CANCELLING, S.COMPLETED)
    async with PoolQueue(LevelDBBackend(store), clock=clock) as q:
        assert await q.mark_worker_unresponsive("w\x01two") == 4
        assert set(q.backend._claims) == {first[1].id}  # type: ignore[attr-defined]
        got = {j.id: j for j in await q.get_jobs(ids)}
        assert got["j0"].status is S.UNKNOWN_STOPPED and got["j3"].status is S.UNKNOWN_RETRY
        assert got["j3"].attempts == 1 and got["j3"].assignee_id == "w\x01two"
    check_store(store)


async def test_a_claim_that_does_not_fit_its_record_fails_the_open_and_repair_drops_it(
    store: Path,
) -> None:
    """An ``A`` key holding a claim (format 6) of the wrong size, or of a job whose
    record is not eligible, is damage: the open says so and changes nothing; a repair
    keeps every claim that fits (written into its record) and drops the other (the
    record stands: a job whose claim was lost is eligible again)."""
    async with PoolQueue(LevelDBBackend(store)) as q:
        await q.enqueue_jobs([Job(id=f"j{i}", job_type="t") for i in range(4)])
        claimed = await take(q, "w", 3)
        assert [j.id for j in claimed] == ["j0", "j1", "j2"]
        await q.complete_jobs({"j2": b"ok"})
    db = plyvel.DB(str(store))
    claims = {k[-2:]: k for k, v in db.iterator(prefix=b"A") if v}
    assert sorted(claims) == [b"j0", b"j1"]
    db.put(claims[b"j1"], b"\x00" * 3)
    db.close()
    before = _contents(store)
    with pytest.raises(StorageError, match=r"claim of job 'j1'.*LevelDBBackend\.repair"):
        await LevelDBBackend(store).open()
    assert _contents(store) == before
    db = plyvel.DB(str(store))  # j1's claim lost, one of j2 (COMPLETED) instead
    db.delete(claims[b"j1"])
    db.put(b"A" + _enc("w") + b"\x00" * 8 + b"j2", b"\x00" * 8)
    db.close()
    before = _contents(store)
    with pytest.raises(StorageError, match=r"claim of job 'j2'.*\(COMPLETED\)"):
        await LevelDBBackend(store).open()
    assert _contents(store) == before
    report = await LevelDBBackend.repair(store)
    assert (report.jobs, report.dropped_records) == (4, 0)
    jobs = check_store(store)
    assert (jobs["j0"].status, jobs["j0"].assignee_id, jobs["j0"].attempts) == (S.RUNNING, "w", 1)
    assert (jobs["j1"].status, jobs["j1"].attempts) == (S.INITIAL_PENDING, 0)
    assert jobs["j2"].status is S.COMPLETED
    async with PoolQueue(LevelDBBackend(store)) as q:
        assert (await q.get_jobs(["j0"]))[0] == claimed[0]
        await q.complete_jobs({"j0": b"ok"})
    check_store(store)


async def test_repair_refuses_a_store_in_use(store: Path, tmp_path: Path) -> None:
    backend = LevelDBBackend(store)
    await backend.open()
    try:
        with pytest.raises(StorageError, match="open in this process"):
            await LevelDBBackend.repair(store)
    finally:
        await backend.close()
    async with held_by_child(store):
        with pytest.raises(StorageError, match="in use by another process"):
            await LevelDBBackend.repair(store)
    with pytest.raises(StorageError, match="not a LevelDB store"):
        await LevelDBBackend.repair(tmp_path / "missing")
    assert (await LevelDBBackend.repair(store)).jobs == 0


# --- crash recovery -----------------------------------------------------------------


async def test_sigkill_mid_work_then_reopen_recovers(store: Path) -> None:
    n = 10000
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), "work", str(store), str(n), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    done: set[str] = set()
    failed: set[str] = set()
    try:
        line = await asyncio.wait_for(child.stdout.readline(), DEADLINE)
        assert line == b"enqueued\n", line
        while len(done) < 200:
            line = await asyncio.wait_for(child.stdout.readline(), DEADLINE)
            assert line, "the child ended early"
            kind, job_id = line.decode().split()
            (done if kind == "done" else failed).add(job_id)
    finally:
        child.send_signal(signal.SIGKILL)
        await asyncio.wait_for(child.wait(), DEADLINE)
    assert child.returncode == -signal.SIGKILL
    before = check_store(store)  # consistent straight after the kill
    assert len(before) == n
    async with PoolQueue(LevelDBBackend(store)) as q:
        running = sum(1 for j in before.values() if j.status in ACTIVE)
        assert await q.reset_running_jobs() == running
        stats = await q.get_job_stats()
        assert stats.total_jobs == n and stats.running_jobs == 0
        jobs = await q.get_jobs([f"job-{i}" for i in range(n)])
        # everything the child was told was stored, is stored
        for job in jobs:
            if job.id in done:
                assert job.status is S.COMPLETED
                assert job.result == f"result-{job.id}".encode() + b"\x00\xff"
                assert job.finalized_at is not None
            elif job.id in failed:
                assert job.retry_count >= 1
            assert job.job_definition == bytes(range(256)) + f"def-{job.id[4:]}".encode()
        # and the store is usable: every remaining job can still be run
        left = stats.pending_jobs + stats.failed_jobs
        assert left > 0, "the kill landed after the work, not in the middle of it"
        while left:
            batch = await take(q, "after", 500)
            await q.complete_jobs({j.id: b"late" for j in batch})
            left -= len(batch)
        assert (await q.get_job_stats()).completed_jobs == n
    after = check_store(store)
    assert all(j.status is S.COMPLETED for j in after.values())


# --- key encoding -------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text())
def test_key_components_are_prefix_free_and_order_preserving(a: str, b: str) -> None:
    ea, eb = codec.enc(a), codec.enc(b)
    if a != b:
        assert not ea.startswith(eb) and not eb.startswith(ea)
        raw_a, raw_b = (s.encode("utf-8", "surrogatepass") for s in (a, b))
        assert (ea < eb) == (raw_a < raw_b)
    assert codec.split_enc(b"X" + ea + b"tail", 1) == (a, len(ea) + 1)


@settings(max_examples=200, deadline=None)
@given(
    st.text(st.characters(blacklist_characters="\x00")),
    st.binary(),
    st.lists(st.text(st.characters(blacklist_characters="\x00"), min_size=1)),
    st.one_of(st.none(), st.binary()),
    st.integers(0, 2**40),
    st.datetimes(timezones=st.just(UTC)),
)
def test_records_round_trip(
    text: str, blob: bytes, tags: list[str], result: bytes | None, retries: int, when: datetime
) -> None:
    job = Job(
        id=text or "x",
        job_type=text,
        job_definition=blob,
        tags=tags,
        status=S.CANCELLING,
        created_at=when,
        started_at=when,
        error_message=text,
        result=result,
        retry_count=retries,
        assignee_id=text,
        assigned_at=when,
    )
    decoded, seq = codec.decode_job(codec.encode_job(job, 7))
    assert (decoded, seq) == (job, 7)
    assert decoded.created_at.tzinfo is UTC


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**63 - 1),
    st.integers(-(2**15), 2**15 - 1),
    st.one_of(st.none(), st.integers(1, 2**63 - 1)),
    st.integers(0, 2**63 - 1),
    st.datetimes(timezones=st.just(UTC)),
    st.one_of(st.none(), st.datetimes(timezones=st.just(UTC))),
)
def test_records_are_little_endian_and_read_in_the_format_4_encoding_too(
    seq: int,
    retries: int,
    priority: int,
    max_attempts: int | None,
    attempts: int,
    when: datetime,
    scheduled: datetime | None,
) -> None:
    """A record's header has the little-endian layout of version 3 whichever
    ``struct`` format packs it (native where the machine allows), and the version 2
    form of the same record (big-endian, as formats 3 and 4 wrote it) reads as the
    same job."""
    job = Job(
        id="j",
        job_type="t",
        job_definition=b"d",
        status=S.FAILED_RETRY,
        created_at=when,
        retry_count=retries,
        last_retry_at=when,
        error_message="e",
        scheduled_at=scheduled,
        priority=priority,
        max_attempts=max_attempts,
        attempts=attempts,
    )
    raw = codec.encode_job(job, seq)
    head = struct.unpack_from("<QQQQQQQQqqIIIIIIIhBB", raw, 1)
    code = codec.STATUS_CODES.index(S.FAILED_RETRY)
    assert raw[0] == 3 and head[:2] == (seq, retries) and head[-3:-1] == (priority, code)
    assert head[8] == (-1 if max_attempts is None else max_attempts) and head[9] == attempts
    assert codec.decode_job(raw) == (job, seq)
    assert codec.decode_job(_record_v2(raw)) == (job, seq)
    assert codec.decode_state(raw) == codec.decode_state(_record_v2(raw)) == (job.status, None)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["none", "now", "then", "equal", "other"]), min_size=5, max_size=5),
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(timezones=st.just(UTC)),
)
def test_records_given_the_moves_now_encode_as_without_it(
    kinds: list[str], now: datetime, then: datetime, other: datetime
) -> None:
    """``encode_job``'s ``now``/``now_us`` and ``then``/``then_us`` (a completion's and
    its claim's timestamps, looked up once per call) change nothing: a time that is
    ``now`` or ``then`` itself is encoded from its micros, any other time (equal to
    one or not) as before."""
    picks: dict[str, datetime | None] = {
        "none": None,
        "now": now,
        "then": then,
        "equal": now.replace(),  # equal, another object
        "other": other,
    }
    started, finalized, retried, assigned, scheduled = (picks[k] for k in kinds)
    job = Job(
        id="j",
        job_type="t",
        started_at=started,
        finalized_at=finalized,
        last_retry_at=retried,
        assigned_at=assigned,
        scheduled_at=scheduled,
        assignee_id="w" if assigned else "",
    )
    plain = codec.encode_job(job, 3)
    static = codec.job_static(job)
    now_us, then_us = codec.to_micros(now), codec.to_micros(then)
    assert codec.encode_job(job, 3, static, now, now_us) == plain
    assert codec.encode_job(job, 3, static, now, now_us, then, then_us) == plain
    assert codec.encode_job(job, 3, static, None, 0, then, then_us) == plain
    assert codec.decode_job(plain) == (job, 3)


async def test_hostile_ids_and_tags_never_collide(queue: PoolQueue, store: Path) -> None:
    jobs = [Job(id=v, job_type="t", tags=[v]) for v in HOSTILE]
    jobs.append(Job(id="all", job_type="t", tags=list(HOSTILE)))
    await queue.enqueue_jobs(jobs)
    for v in HOSTILE:
        stats = await queue.get_job_stats([v])
        assert stats.total_jobs == 2, v  # its own job and "all"
        assert [j.id for j in await queue.get_jobs([v])] == [v]
    assert (await queue.get_job_stats(["a", "ab"])).total_jobs == 1
    # claiming by a tag that prefixes others takes only that tag's jobs
    got = await take(queue, "w", 10, tags=["a"])
    assert {j.id for j in got} == {"a", "all"}
    got = await take(queue, "w", 10, tags=["a" * 5000])
    assert {j.id for j in got} == {"a" * 5000}
    # cancelling by a tag touches only that tag's jobs ("all" is running: now cancelling)
    result = await queue.cancel_jobs(tags=["a\x01"])
    assert sorted(result.cancelled) == ["a\x01", "all"]
    # an assignee whose name prefixes another's
    await queue.enqueue_jobs(
        [Job(id="p1", job_type="t", tags=["p"]), Job(id="p2", job_type="t", tags=["p"])]
    )
    await take(queue, "w\x01", 1, tags=["p"])
    await take(queue, "w\x01x", 1, tags=["p"])
    assert await queue.mark_worker_unresponsive("w\x01") == 1
    assert await queue.mark_worker_unresponsive("w") == 3  # "a", "a"*5000 and "all"
    assert (await queue.get_job("all")).status is S.UNKNOWN_STOPPED
    assert await queue.delete_jobs(tags=["a\x01"]) == 2
    assert (await queue.get_job_stats(["a\x01"])).total_jobs == 0
    assert (await queue.get_job_stats(["a\x01b"])).total_jobs == 1
    await queue.close()
    jobs_left = check_store(store)
    assert "a\x01" not in jobs_left and "all" not in jobs_left and "a\x01b" in jobs_left


# --- index consistency under random operations, against the memory backend ----------


#: ``list_jobs`` filters the random operations compare with the memory backend's.
LISTINGS: list[dict[str, Any]] = [
    {},
    {"statuses": [S.RUNNING]},
    {"statuses": [S.CANCELLING, S.COMPLETED]},
    {"statuses": list(ACTIVE)},
    {"statuses": [S.INITIAL_PENDING, S.UNSCHEDULED]},
    {"job_type": "u\x01"},
    {"tags": ["a"], "statuses": [S.RUNNING]},
]


def _check_caches(backend: Any) -> None:
    """The backend's cached jobs are as stored, RUNNING/CANCELLING ones in its active
    cache and eligible ones in its eligible cache only, each with its record's header as
    kept (which a claim and a completion patch in place); a claimed job's record, which
    no longer has the job it handed out, says what it is."""
    assert isinstance(backend, LevelDBBackend)
    if backend._db is None:  # (closed)
        return
    with backend._db.iterator(prefix=b"A") as it:  # (format 6: the claims it knows)
        assert backend._claims == {
            codec.id_text(k[codec.split_enc(k, 1)[1] + 8 :]): k for k, v in it if v
        }
    cached = [(rec, ACTIVE) for rec in backend._active.values()]
    cached += [(rec, ELIGIBLE) for rec in backend._eligible.values()]
    for rec, statuses in cached:
        job = rec.decoded() if rec.job is None else rec.job
        assert job.status in statuses, (job.id, job.status)
        raw = backend._db.get(b"J" + rec.idb)
        assert raw is not None, job.id
        stored = leveldb_module._decoded(raw, rec.idb)
        claim = backend._claims.get(job.id)
        if claim is not None:  # (its record is the job before the claim)
            stored = backend._claimed(stored, claim)
            assert stored.job is not None
            raw = codec.encode_job(stored.job, stored.seq)
        assert (stored.job, stored.seq) == (job, rec.seq)
        if rec.head is not None:
            assert bytes(rec.head) == raw[1 : 1 + codec.HEAD_SIZE], job.id


async def _random_ops(seed: int, store: Path) -> None:
    """Drive a MemoryBackend queue and a LevelDB queue with the same random calls."""
    rng = random.Random(seed)
    tag_pool = ["a", "b", "a\x01", "ab", "é"]
    base = datetime(2020, 1, 1, tzinfo=UTC)
    mem = PoolQueue(MemoryBackend())
    ldb = PoolQueue(LevelDBBackend(store))
    ids: list[str] = []

    async def both(name: str, *args: Any, **kwargs: Any) -> Any:
        outcomes = []
        for q in (mem, ldb):
            try:
                value = await getattr(q, name)(*args, **kwargs)
                if isinstance(value, CancelResult):  # order inside a selection is free
                    value = (sorted(value.cancelled), sorted(value.unknown))
                outcomes.append(("ok", value))
            except JobPoolError as exc:
                detail: Any = type(exc).__name__
                if isinstance(exc, BatchError):
                    detail = (detail, sorted(exc.errors))
                elif isinstance(exc, JobsNotFinalError):
                    detail = (detail, sorted(exc.job_ids))
                outcomes.append(("error", detail))
        assert outcomes[0] == outcomes[1], (name, args, outcomes)
        return outcomes[0][1]

    def some_ids() -> list[str]:
        picked = rng.sample(ids, min(len(ids), rng.randint(1, 6))) if ids else []
        return picked + (["missing"] if rng.random() < 0.2 else [])

    try:
        for step in range(250):
            op = rng.random()
            if op < 0.2 or not ids:
                batch = []
                for _ in range(rng.randint(1, 12)):
                    job_id = f"{seed}-{len(ids)}"
                    ids.append(job_id)
                    batch.append(
                        Job(
                            id=job_id,
                            job_type=rng.choice(["t", "u\x01"]),
                            tags=rng.sample(tag_pool, rng.randint(0, 3)),
                            created_at=base + timedelta(minutes=rng.randint(0, 50)),
                        )
                    )
                await both("enqueue_jobs", batch)
            elif op < 0.4:
                tags = rng.sample(tag_pool, rng.randint(0, 2))
                jobs = await mem.get_jobs(ids)
                if any(j.status in ELIGIBLE and set(tags) <= set(j.tags) for j in jobs):
                    limit, who = rng.randint(1, 6), rng.choice(["w1", "w2"])
                    got = [await take(q, who, limit, tags) for q in (mem, ldb)]
                    assert {j.id for j in got[0]} == {j.id for j in got[1]}
            elif op < 0.5:
                await both("complete_jobs", {i: rng.choice([b"r", b""]) for i in some_ids()})
            elif op < 0.58:
                await both("fail_jobs", dict.fromkeys(some_ids(), "err"))
            elif op < 0.64:
                await both("stop_jobs", dict.fromkeys(some_ids(), ""))
            elif op < 0.7:
                if rng.random() < 0.5:
                    await both("cancel_jobs", job_ids=some_ids())
                else:
                    await both("cancel_jobs", tags=rng.sample(tag_pool, rng.randint(1, 2)))
            elif op < 0.75:
                await both("acknowledge_cancellation", {i: rng.random() < 0.5 for i in some_ids()})
            elif op < 0.8:
                await both("mark_worker_unresponsive", rng.choice(["w1", "w2"]))
            elif op < 0.83:
                await both("reset_running_jobs")
            elif op < 0.88:
                target = rng.choice(list(S))
                await both("update_job_status", rng.choice(ids), target, b"u", "msg")
            elif op < 0.93:
                if rng.random() < 0.5:
                    await both("delete_jobs", job_ids=some_ids())
                else:
                    await both("delete_jobs", tags=rng.sample(tag_pool, rng.randint(1, 2)))
            elif op < 0.96:
                await both("cleanup_expired_jobs", timedelta(microseconds=1))
            else:
                await ldb.close()  # reopen mid-sequence
                ldb = PoolQueue(LevelDBBackend(store))
            if step % 25 == 0:
                _check_caches(ldb.backend)
                for tags in ([], ["a"], ["a", "b"], ["a\x01"], ["zzz"]):
                    await both("get_job_stats", tags)
                for filters in LISTINGS:
                    pages = [await _all_pages(q, 4, **filters) for q in (mem, ldb)]
                    assert pages[0] == pages[1], (step, filters)
                for statuses in (ACTIVE, {S.RUNNING}, {S.CANCELLING}, ELIGIBLE, set(S)):
                    asked = frozenset(statuses)
                    oldest = [await q.backend.oldest_created(asked) for q in (mem, ldb)]
                    assert oldest[0] == oldest[1], (step, statuses)
        _check_caches(ldb.backend)
        mem_jobs = {j.id: j for j in await mem.get_jobs(ids)}
        ldb_jobs = {j.id: j for j in await ldb.get_jobs(ids)}
        assert mem_jobs.keys() == ldb_jobs.keys()
        for job_id, m in mem_jobs.items():
            l_ = ldb_jobs[job_id]
            assert (m.status, m.retry_count, m.result, m.error_message, m.assignee_id, m.tags) == (
                l_.status,
                l_.retry_count,
                l_.result,
                l_.error_message,
                l_.assignee_id,
                l_.tags,
            ), job_id
    finally:
        await mem.close()
        await ldb.close()
    stored = check_store(store)
    assert stored == ldb_jobs


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_random_operations_match_memory_and_keep_indexes_consistent(
    seed: int, tmp_path: Path
) -> None:
    await _random_ops(seed, tmp_path / f"r{seed}.ldb")


@pytest.mark.parametrize("seed", [6, 7, 8])
async def test_every_record_a_claim_or_completion_writes_is_the_full_encoding(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim and a completion pack a cached job's record from its values as last
    staged, the moved ones changed (``_Rec.head``): every record any write stages must
    be exactly what ``encode_job`` gives for the job it decodes to (here at each
    write, not only in the store at the end, where later moves overwrite records).
    A claim writes no record (format 6): its ``A`` key holds the claim's time."""
    init = leveldb_module._Write.__init__
    records: Counter[str] = Counter()
    fast: Counter[str] = Counter()

    def checking(self: Any, batch: Any, promoted: int) -> None:
        init(self, batch, promoted)
        put = self.put

        def put_checked(key: bytes, value: bytes) -> None:
            if key[:1] == b"J":
                job, seq = codec.decode_job(value)
                assert value == codec.encode_job(job, seq), job
                records[job.status] += 1
            elif key[:1] == b"A" and value:
                assert len(value) == 8
                fast["claim"] += 1
            put(key, value)

        self.put = put_checked

    completion = LevelDBBackend._stage_complete

    def counted(self: LevelDBBackend, *args: Any) -> Any:
        moved = completion(self, *args)
        fast["completion"] += moved is not None
        return moved

    monkeypatch.setattr(leveldb_module._Write, "__init__", checking)
    monkeypatch.setattr(LevelDBBackend, "_stage_complete", counted)
    await _random_ops(seed, tmp_path / "r.ldb")
    records.clear()
    # A drain with results, retries and cancellations besides: the moves of the fast
    # paths from every state they start from (a job started before, with an error
    # message, CANCELLING, completed without a result).
    async with PoolQueue(LevelDBBackend(tmp_path / "d.ldb")) as queue:
        await queue.enqueue_jobs(
            [Job(id=f"d{i}", job_type="t", tags=["x"] if i % 3 else []) for i in range(30)]
        )
        first = await take(queue, "w", 10)
        await queue.fail_jobs(dict.fromkeys([j.id for j in first[:5]], ("boom", timedelta(0))))
        await queue.cancel_jobs(job_ids=[j.id for j in first[5:7]])
        await queue.complete_jobs({j.id: None for j in first[5:]})
        left = 25  # (20 never claimed, 5 to retry)
        while left:
            got = await take(queue, "w2", 10)
            left -= len(got)
            await queue.complete_jobs({j.id: b"r" * (len(j.id) % 3) for j in got})
    assert records[S.COMPLETED] and fast["completion"] and fast["claim"] >= 40
    assert not records[S.RUNNING]  # (claims: in the ``A`` keys)
    check_store(tmp_path / "d.ldb")


# --- cost and responsiveness --------------------------------------------------------


async def _claim_reads(queue: PoolQueue, n: int, tags: list[str] | None = None) -> int:
    proxy = counting(queue)
    got = 0
    while got < n:
        got += len(await take(queue, "w", 10, tags))
    return proxy.reads


async def test_assignment_cost_does_not_grow_with_completed_jobs(tmp_path: Path) -> None:
    # Leases off: a stream's first lease write reads its record once, and here it
    # would fall inside the counted claims of one store and not the other.
    pending = [Job(id=f"p{i}", job_type="t", tags=["x"]) for i in range(50)]
    async with PoolQueue(LevelDBBackend(tmp_path / "empty.ldb"), lease=None) as q:
        await q.enqueue_jobs(pending)
        empty = await _claim_reads(q, 50)
    async with PoolQueue(LevelDBBackend(tmp_path / "full.ldb"), lease=None) as q:
        old = [Job(id=f"c{i}", job_type="t", tags=["x"]) for i in range(3000)]
        await q.enqueue_jobs(old)
        left = len(old)
        while left:
            batch = await take(q, "w", 500)
            await q.complete_jobs({j.id: b"" for j in batch})
            left -= len(batch)
        await q.enqueue_jobs([j.copy() for j in pending])
        full = await _claim_reads(q, 50)
    assert full == empty, (full, empty)


async def test_and_filtered_claims_start_from_the_rarest_tag(queue: PoolQueue) -> None:
    await queue.enqueue_jobs([Job(id=f"c{i}", job_type="t", tags=["common"]) for i in range(2000)])
    await queue.enqueue_jobs(
        [Job(id=f"r{i}", job_type="t", tags=["common", "rare"]) for i in range(5)]
    )
    proxy = counting(queue)
    got = await take(queue, "w", 10, ["common", "rare"])
    assert {j.id for j in got} == {f"r{i}" for i in range(5)}
    assert proxy.reads < 50, proxy.reads
    proxy.reads = 0
    stats = await queue.get_job_stats(["rare", "common"])
    assert stats.running_jobs == 5
    assert proxy.reads < 50, proxy.reads


_TICK = 0.001


def assert_the_loop_ran(ticks: int, longest: float, total: float, beside_busy: float) -> None:
    """Ratios, not wall-clock limits: the ticker ran at least half as often as it
    does beside a thread running plain Python, measured on this machine at this
    load (``beside_busy``, ticks per second: what a loop gets beside a thread that
    gives up the GIL only when the interpreter makes it; one in LevelDB's C code
    gives it up more: 2-4 times as many ticks at load 5), and no pause of the loop
    took more than a fifth of the work (a blocked loop gives about one tick and one
    pause as long as the work itself, however fast the machine)."""
    assert ticks >= 0.5 * beside_busy * total, (ticks, total, beside_busy)
    assert longest < total / 5, (longest, total)


async def _ticks_beside_busy_thread(seconds: float) -> float:
    """Ticks per second of the ticker while another thread runs Python code (no
    I/O, so it gives up the GIL only when the interpreter makes it) for ``seconds``."""
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(1000))

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        ticks, _, total = await _ticks_during(asyncio.sleep(seconds))
    finally:
        stop.set()
        thread.join()
    return ticks / total


async def _loop_ran_during(work: Awaitable[object]) -> None:
    """Run ``work`` beside the ticker and assert the loop kept running (see
    :func:`assert_the_loop_ran`), against the busy-thread rate measured just before
    and just after it for as long (the lower: the machine's load moves)."""
    before = await _ticks_beside_busy_thread(0.5)
    ticks, longest, total = await _ticks_during(work)
    after = await _ticks_beside_busy_thread(max(total, 0.5))
    print(f"ticks/s: {ticks / total:.0f}, beside a busy thread: {before:.0f}, {after:.0f}")
    assert_the_loop_ran(ticks, longest, total, min(before, after))


async def _ticks_during(work: Awaitable[object]) -> tuple[int, float, float]:
    """Run ``work`` beside a ticker task: (ticks during it, longest pause, its duration).

    The garbage collector is paused meanwhile: a full collection stops every thread
    for as long as it takes (over 100 ms with the objects a whole test run leaves
    alive), which is not the pause these tests are about."""
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(_TICK)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        await work
        end = time.perf_counter()
    finally:
        gc.enable()
    stop.set()
    await task
    during = [t for t in ticks if start <= t <= end]
    gaps = [b - a for a, b in zip([start, *during], [*during, end], strict=True)]
    return len(during), max(gaps), end - start


async def test_the_event_loop_keeps_running_during_a_50000_job_insert(store: Path) -> None:
    from jobpool_async.backends.base import check_new_job

    jobs = [check_new_job(Job(id=f"j{i}", job_type="t", tags=["a"])) for i in range(50000)]
    backend = LevelDBBackend(store)
    await backend.open()
    try:
        await _loop_ran_during(backend.insert(jobs))  # the loop ran all along
        assert await backend.count_by_status([]) == ({S.INITIAL_PENDING: 50000}, 0)
    finally:
        await backend.close()


async def test_the_event_loop_keeps_running_while_the_queue_enqueues_50000_jobs(
    queue: PoolQueue,
) -> None:
    jobs = [Job(id=f"j{i}", job_type="t", tags=["a"]) for i in range(50000)]
    await _loop_ran_during(queue.enqueue_jobs(jobs))
    assert (await queue.get_job_stats()).pending_jobs == 50000


async def test_cleanup_reads_only_expired_jobs(queue: PoolQueue) -> None:
    await queue.enqueue_jobs([Job(id=f"j{i}", job_type="t") for i in range(300)])
    for _ in range(3):
        batch = await take(queue, "w", 100)
        await queue.complete_jobs({j.id: b"" for j in batch})
    await queue.enqueue_jobs([Job(id=f"k{i}", job_type="t") for i in range(10)])
    batch = await take(queue, "w", 10)
    proxy = counting(queue)
    assert await queue.cleanup_expired_jobs(timedelta(microseconds=1)) == 300
    assert proxy.reads <= 300 * 2 + 10, proxy.reads
    stats = await queue.get_job_stats()
    assert stats.total_jobs == 10 and stats.running_jobs == 10
    assert Counter(j.status for j in await queue.get_jobs([j.id for j in batch])) == {S.RUNNING: 10}


async def test_a_filtered_claim_does_not_hide_the_jobs_it_skipped(queue: PoolQueue) -> None:
    base = datetime(2024, 1, 1, tzinfo=UTC)
    await queue.enqueue_jobs(
        [
            Job(id="j1", job_type="t", tags=["r"], created_at=base),
            Job(id="j2", job_type="t", tags=["r", "s"], created_at=base + timedelta(seconds=1)),
            Job(id="j3", job_type="t", tags=["r", "s"], created_at=base + timedelta(seconds=2)),
            Job(id="j4", job_type="t", tags=["s"], created_at=base + timedelta(seconds=3)),
            Job(id="j5", job_type="t", tags=["s"], created_at=base + timedelta(seconds=4)),
        ]
    )
    # walks the "r" index (the rarer tag): skips j1, takes j2, stops at j3
    assert [j.id for j in await take(queue, "w", 1, ["r", "s"])] == ["j2"]
    assert [j.id for j in await take(queue, "w", 1, ["r"])] == ["j1"]
    assert [j.id for j in await take(queue, "w", 1, ["r"])] == ["j3"]
    # a job enqueued later but older than the last claimed one is still found first
    await queue.enqueue_job(Job(id="old", job_type="t", tags=["s"], created_at=base))
    assert [j.id for j in await take(queue, "w", 1)] == ["old"]
    assert [j.id for j in await take(queue, "w", 5)] == ["j4", "j5"]


async def test_an_operation_whose_caller_is_cancelled_still_completes(store: Path) -> None:
    from jobpool_async.backends.base import COMPLETE, Change, check_new_job

    backend = LevelDBBackend(store)
    await backend.open()
    try:
        await backend.insert([check_new_job(Job(id="a", job_type="t"))])
        await backend.claim("w", [], 1, datetime.now(UTC))
        task = asyncio.ensure_future(
            backend.apply([Change("a", COMPLETE, result=b"r")], datetime.now(UTC))
        )
        await asyncio.sleep(0)  # the call is now queued in the worker thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        [job] = await backend.get_jobs(["a"])  # queued behind it, so sees its effect
        assert (job.status, job.result) == (S.COMPLETED, b"r")
    finally:
        await backend.close()
    check_store(store)


async def test_selecting_everything_matches_the_memory_backend(store: Path) -> None:
    from jobpool_async.backends.base import CANCEL, WORKER_LOST, Selection

    outcomes = []
    for backend in (MemoryBackend(), LevelDBBackend(store)):
        async with PoolQueue(backend) as q:
            await q.enqueue_jobs(
                [Job(id=f"j{i}", job_type="t", tags=[f"t{i % 2}"]) for i in range(8)]
            )
            running = await take(q, "w", 4)
            await q.complete_job(running[0].id, b"")
            await q.cancel_jobs(job_ids=[running[1].id])
            everything = Selection(everything=True)
            now = datetime.now(UTC)
            lost = await backend.apply_selected(WORKER_LOST, everything, now)
            cancelled = await backend.apply_selected(CANCEL, everything, now, report_unmatched=True)
            outcomes.append(
                (
                    sorted((m.job_id, m.status) for m in lost.moved),
                    sorted((m.job_id, m.status) for m in cancelled.moved),
                    sorted(cancelled.unmatched),
                )
            )
    assert outcomes[0] == outcomes[1]
    check_store(store)


async def test_a_missing_parent_directory_is_named(tmp_path: Path) -> None:
    """LevelDB creates the store's own directory, not missing ones above it."""
    url = f"leveldb:///{tmp_path}/missing/dir/jobs.ldb"
    with pytest.raises(StorageError) as info:
        async with PoolQueue(open_backend(url)):
            pass
    assert f"the directory {str(tmp_path / 'missing' / 'dir')!r} does not exist" in str(info.value)
    assert os.listdir(tmp_path) == []


# --- one write per refilling completion ----------------------------------------------


async def _running_three(store: Path) -> tuple[LevelDBBackend, list[Job]]:
    from jobpool_async.backends.base import check_new_job

    backend = LevelDBBackend(store)
    await backend.open()
    jobs = [Job(id=f"j{i}", job_type="t", priority=1 if i == 0 else 0) for i in range(6)]
    await backend.insert([check_new_job(j) for j in jobs])
    return backend, await backend.claim("w", [], 3, datetime.now(UTC))


async def test_a_completion_and_its_refill_are_one_write_batch(store: Path) -> None:
    from jobpool_async.backends.base import COMPLETE, Change, Refill

    backend, running = await _running_three(store)
    try:
        proxy = CountingDB(backend._db)
        backend._db = proxy
        ids = [j.id for j in running]
        out = await backend.apply(
            [Change(i, COMPLETE, result=b"r") for i in ids],
            datetime.now(UTC),
            Refill("w", (), frozenset(ids)),
        )
        assert [m.status for m in out.moved] == [S.COMPLETED] * 3
        assert [j.id for j in out.claimed] == ["j3", "j4", "j5"]
        assert {j.status for j in out.claimed} == {S.RUNNING}
        assert proxy.writes == 1
    finally:
        await backend.close()
    jobs = check_store(store)
    assert {i: j.status for i, j in jobs.items()} == {
        **{f"j{i}": S.COMPLETED for i in range(3)},
        **{f"j{i}": S.RUNNING for i in range(3, 6)},
    }


async def test_a_refill_sees_a_job_its_own_call_made_eligible(store: Path) -> None:
    """A retry in the same call: the refill's claim cannot share the call's write
    (it must see the retried job), so it writes after it, and takes it first here
    (its priority is higher)."""
    from jobpool_async.backends.base import COMPLETE, FAIL, Change, Refill

    backend, running = await _running_three(store)
    try:
        proxy = CountingDB(backend._db)
        backend._db = proxy
        ids = [j.id for j in running]
        out = await backend.apply(
            [Change("j0", FAIL, error_message="again"), Change("j1", COMPLETE, result=b"")],
            datetime.now(UTC),
            Refill("w", (), frozenset(ids)),
        )
        assert [j.id for j in out.claimed] == ["j0", "j3"]
        assert proxy.writes == 2
    finally:
        await backend.close()
    check_store(store)


async def test_a_failed_refilling_write_changes_nothing(store: Path) -> None:
    """The apply and its refill fail together (one batch): every job as it was, and
    the backend's caches of running and eligible jobs do not keep the unwritten moves."""
    from jobpool_async.backends.base import COMPLETE, Change, Refill

    backend, running = await _running_three(store)
    try:
        proxy = CountingDB(backend._db)
        backend._db = proxy
        ids = [j.id for j in running]
        proxy.fail_writes = True
        with pytest.raises(StorageError, match="No space left"):
            await backend.apply(
                [Change(i, COMPLETE, result=b"r") for i in ids],
                datetime.now(UTC),
                Refill("w", (), frozenset(ids)),
            )
        proxy.fail_writes = False
        now = datetime.now(UTC)
        jobs = {j.id: j for j in await backend.get_jobs([f"j{i}" for i in range(6)])}
        assert {i: j.status for i, j in jobs.items()} == {
            **{f"j{i}": S.RUNNING for i in range(3)},
            **{f"j{i}": S.INITIAL_PENDING for i in range(3, 6)},
        }
        assert jobs["j0"].result is None
        assert [j.id for j in await backend.claim("v", [], 10, now)] == ["j3", "j4", "j5"]
        done = await backend.apply([Change(i, COMPLETE, result=b"r") for i in ids], now)
        assert not done.errors and len(done.moved) == 3
    finally:
        await backend.close()
    jobs = check_store(store)
    assert {j.status for i, j in jobs.items() if i in ids} == {S.COMPLETED}


async def test_a_claim_promotes_the_jobs_come_due_in_its_own_write(store: Path) -> None:
    """Jobs whose schedule came are moved to the eligible index by the claim that
    finds them, in its one write: those it takes and those it leaves (in order among
    the stored ones); a job due later stays waiting, and a claim that takes none of
    the promoted jobs (a tag filter) still writes the promotion."""
    from jobpool_async.backends.base import check_new_job

    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    created = t0 - timedelta(hours=1)
    backend = LevelDBBackend(store)
    await backend.open()
    try:
        await backend.insert(
            [
                check_new_job(
                    Job(id=name, job_type="t", created_at=created, scheduled_at=t0 + delay)
                )
                for name, delay in (
                    ("a", timedelta(seconds=1)),
                    ("b", timedelta(seconds=2)),
                    ("c", timedelta(seconds=3)),
                )
            ]
        )
        proxy = CountingDB(backend._db)
        backend._db = proxy
        got = await backend.claim("w", [], 1, t0 + timedelta(seconds=2.5))
        assert [j.id for j in got] == ["a"] and proxy.writes == 1
        assert backend.next_due() == t0 + timedelta(seconds=3)
        got = await backend.claim("w", [], 5, t0 + timedelta(seconds=2.6))
        assert [j.id for j in got] == ["b"]
        proxy.writes = 0
        assert await backend.claim("w", ["x"], 5, t0 + timedelta(seconds=4)) == []
        assert proxy.writes == 1 and backend.next_due() is None
    finally:
        await backend.close()
    jobs = check_store(store)  # c is in E now, a and b in A
    assert {i: j.status for i, j in jobs.items()} == {
        "a": S.RUNNING,
        "b": S.RUNNING,
        "c": S.INITIAL_PENDING,
    }
    backend = LevelDBBackend(store)
    await backend.open()
    try:
        assert [j.id for j in await backend.claim("w", [], 5, t0 + timedelta(seconds=4))] == ["c"]
    finally:
        await backend.close()


async def test_a_refill_of_free_slots_by_a_call_that_moves_nothing_is_written(
    store: Path,
) -> None:
    """``Refill.extra`` claims even when the call moves no job: the claim staged in
    the call's batch is written all the same."""
    from jobpool_async.backends.base import COMPLETE, Change, Refill

    backend, _ = await _running_three(store)
    try:
        out = await backend.apply(
            [Change("nope", COMPLETE, result=b"")],
            datetime.now(UTC),
            Refill("w", (), frozenset({"nope"}), extra=2),
        )
        assert not out.moved and list(out.errors) == ["nope"]
        assert [j.id for j in out.claimed] == ["j3", "j4"]
        jobs = {j.id: j.status for j in await backend.get_jobs(["j3", "j4", "j5"])}
        assert jobs == {"j3": S.RUNNING, "j4": S.RUNNING, "j5": S.INITIAL_PENDING}
    finally:
        await backend.close()
    assert check_store(store)["j4"].status is S.RUNNING


# --- store format 3 -> 4 (no L keys, no S keys of RUNNING/CANCELLING jobs) ---------------

FIXTURES = Path(__file__).parent / "fixtures" / "stores"
#: LevelDB stores written by older code, and their format: format 3 (main at 647893d
#: and at ae89716), format 4 (main at 1f3caf7), format 5 (main at 3475c0a: two
#: RUNNING jobs, whose records say so and whose ``A`` keys are empty).
OLD_FIXTURES = {
    "v0.2-647893d": 3,
    "v0.3-ae89716": 3,
    "v0.7-1f3caf7": 4,
    "v0.9-3475c0a-leveldb": 5,
}


def _dump(path: Path) -> dict[bytes, bytes]:
    db = plyvel.DB(str(path))
    try:
        return dict(db.iterator())
    finally:
        db.close()


def _format(path: Path) -> int:
    format_: int = json.loads(_dump(path)[b"M"])["format"]
    return format_


def _record_v2(raw: bytes) -> bytes:
    """A job record of version 3 as formats 3 and 4 wrote it (version 2: the same
    fields and body, the header big-endian in another order)."""
    if raw[0] == 2:
        return raw
    assert raw[0] == 3
    *head, priority, code, flags = struct.unpack_from("<QQQQQQQQqqIIIIIIIhBB", raw, 1)
    old = struct.pack(">BBBQQQQQQQQhqqIIIIIII", 2, code, flags, *head[:8], priority, *head[8:])
    return old + raw[len(old) :]


def _as_format_5(path: Path) -> None:
    """Rewrite the (closed) format 6 store at ``path`` as format 5 code wrote it: each
    claim its ``A`` key holds written into its job's record (what a repair does first),
    format mark 5."""
    db = plyvel.DB(str(path))
    try:
        assert json.loads(db.get(b"M"))["format"] == 6
        leveldb_module._settle_claims(db, str(path))
        assert not any(v for _, v in db.iterator(prefix=b"A"))
        db.put(b"M", json.dumps({"application": "jobpool_async", "format": 5}).encode())
    finally:
        db.close()


def _as_format_4(path: Path) -> None:
    """Rewrite the (closed) format 6 store at ``path`` as format 4 code wrote it: as
    format 5 (:func:`_as_format_5`), records of version 2, format mark 4 (the keys are
    those of format 4)."""
    _as_format_5(path)
    db = plyvel.DB(str(path))
    try:
        assert json.loads(db.get(b"M"))["format"] == 5
        with db.write_batch() as wb:
            for key, raw in db.iterator(prefix=b"J"):
                wb.put(key, _record_v2(raw))
            wb.put(b"M", json.dumps({"application": "jobpool_async", "format": 4}).encode())
    finally:
        db.close()


def _as_format_3(path: Path) -> None:
    """Rewrite the keys of the (closed) format 5 store at ``path`` as format 3 code
    wrote them: as format 4 (:func:`_as_format_4`), and an ``L`` key and an ``S`` key
    for every job, ``A`` keys without the job's created time, format mark 3 (records
    and counters are as in format 3)."""
    _as_format_4(path)
    db = plyvel.DB(str(path))
    try:
        with db.write_batch() as wb:
            for key, raw in db.iterator(prefix=b"J"):
                job, _ = codec.decode_job(raw)
                idb = key[1:]
                created = struct.pack(">Q", _micros(job.created_at))
                wb.put(b"L" + created + idb, b"")
                if job.status in ACTIVE:
                    code = codec.STATUS_CODES.index(job.status)
                    wb.put(b"S" + bytes([code]) + created + idb, b"")
                    wb.delete(b"A" + _enc(job.assignee_id) + created + idb)
                    wb.put(b"A" + _enc(job.assignee_id) + idb, b"")
            wb.put(b"M", json.dumps({"application": "jobpool_async", "format": 3}).encode())
    finally:
        db.close()


async def _all_pages(queue: PoolQueue, size: int, **filters: Any) -> list[str]:
    ids: list[str] = []
    after: str | None = None
    while True:
        page = await queue.list_jobs(limit=size, after=after, **filters)
        ids.extend(j.id for j in page.jobs)
        if (after := page.next_after) is None:
            return ids


async def _check_listings(queue: PoolQueue, jobs: list[Job]) -> None:
    """Every listing (no filter, each status, each pair of statuses present, each
    type) in pages of several sizes is a scan of ``jobs``, newest first; and
    ``oldest_created`` of each status set is the scan's."""

    def scan(chosen: list[Job]) -> list[str]:
        return [j.id for j in sorted(chosen, key=lambda j: (j.created_at, j.id), reverse=True)]

    present = sorted({j.status for j in jobs}, key=lambda s: s.value)
    asked = [[s] for s in S] + [[a, b] for a in present for b in present if a.value < b.value]
    for size in (1, 3, 1000):
        assert await _all_pages(queue, size) == scan(jobs), size
        for these in asked:
            listed = await _all_pages(queue, size, statuses=these)
            assert listed == scan([j for j in jobs if j.status in these]), (size, these)
        for job_type in {j.job_type for j in jobs}:
            listed = await _all_pages(queue, size, job_type=job_type)
            assert listed == scan([j for j in jobs if j.job_type == job_type]), job_type
    for these in [*asked, list(ACTIVE), list(S)]:
        oldest = await queue.backend.oldest_created(frozenset(these))
        assert oldest == min((j.created_at for j in jobs if j.status in these), default=None)


@pytest.mark.parametrize("fixture", sorted(OLD_FIXTURES))
async def test_a_format_3_4_or_5_store_is_upgraded_in_place(fixture: str, tmp_path: Path) -> None:
    """A store written by format 3, 4 or 5 code (committed under tests/fixtures/stores)
    is upgraded to format 6 on open: every job and counter kept, every listing page
    and ``oldest_created`` as a scan of the jobs gives them, every key as format 6
    has it, and the store keeps working (its records rewritten as their jobs move, but
    for a claim, which writes the job's ``A`` key only)."""
    from jobpool_async.testing import FakeClock

    from .test_store_upgrades import _stored_as_written

    source = FIXTURES / fixture
    want = json.loads((source / "expected.json").read_text())["leveldb"]
    path = tmp_path / "old.ldb"
    shutil.copytree(source / "leveldb", path)
    old = _dump(path)
    assert _format(path) == OLD_FIXTURES[fixture]
    ids = [w["id"] for w in want["jobs"]]
    clock = FakeClock(datetime(2031, 1, 1, tzinfo=UTC))
    for _ in range(2):  # upgraded once, then opened as it is
        async with PoolQueue(LevelDBBackend(path), clock=clock) as q:
            jobs = await _stored_as_written(q, ids, want)
            assert any(j.status is S.RUNNING for j in jobs)
            await _check_listings(q, jobs)
        check_store(path)
    new = _dump(path)
    # Records (of version 2 until they move), counters, leases and the other indexes
    # are as they were.
    kept = {k: v for k, v in old.items() if k[:1] not in b"MLSA"}
    assert {k: v for k, v in new.items() if k[:1] not in b"MLSA"} == kept
    version = 2 if OLD_FIXTURES[fixture] < 5 else 3
    assert {v[0] for k, v in new.items() if k[:1] == b"J"} == {version}
    if OLD_FIXTURES[fixture] == 5:  # (the upgrade writes only the format mark)
        assert {k: v for k, v in new.items() if k != b"M"} == {
            k: v for k, v in old.items() if k != b"M"
        }
    async with PoolQueue(LevelDBBackend(path), clock=clock) as q:
        running = [j.id for j in jobs if j.status is S.RUNNING]
        await q.cancel_jobs(job_ids=running[:1])
        await q.complete_jobs(dict.fromkeys(running[1:], b"ok"))
        async with q.stream_jobs("after", max_assigned_jobs=3) as stream:
            batch = await stream.__anext__()
        await q.fail_jobs({batch[0].id: "boom"})
        await _check_listings(q, await q.get_jobs(ids))
    # The claimed jobs not moved since keep their records as they were (the claim is in
    # their ``A`` keys); the others that moved were rewritten (as version 3).
    after = _dump(path)
    assert len(batch) == 3
    for job in batch[1:]:
        assert after[b"J" + job.id.encode()] == old[b"J" + job.id.encode()]
    claimed = {
        k[k.index(b"\x00\x01") + 10 :].decode() for k, v in after.items() if k[:1] == b"A" and v
    }
    assert claimed == {j.id for j in batch[1:]}
    if version == 2:
        moved = {*running, batch[0].id}
        assert {k[1:].decode() for k, v in after.items() if k[:1] == b"J" and v[0] == 3} == moved
    check_store(path)


async def _varied_store(path: Path) -> list[Job]:
    """A format 4 store with jobs in every status, of several types and assignees
    (RUNNING and CANCELLING jobs of three), created out of enqueue order."""
    base = datetime(2024, 3, 1, tzinfo=UTC)
    jobs = [
        Job(
            id=f"v{i:02d}",
            job_type=f"type{i % 3}",
            tags=[f"g{i % 2}"] if i % 4 else [],
            created_at=base + timedelta(seconds=(i * 7) % 11, microseconds=i % 2),
        )
        for i in range(30)
    ]
    async with PoolQueue(LevelDBBackend(path)) as q:
        await q.enqueue_jobs(jobs)
        for who in ("wa", "wb", "wc\x01x"):
            async with q.stream_jobs(who, max_assigned_jobs=6) as stream:
                batch = await stream.__anext__()
            ids = [j.id for j in batch]
            await q.cancel_jobs(job_ids=ids[:2])  # CANCELLING
            await q.complete_jobs({ids[2]: b"r"})
            await q.fail_jobs({ids[3]: "boom"})
        stored = await q.get_jobs([j.id for j in jobs])
        pending = [j.id for j in stored if j.status is S.INITIAL_PENDING]
        await q.cancel_jobs(job_ids=pending[:2])  # UNSCHEDULED
        return await q.get_jobs([j.id for j in jobs])


async def test_a_store_in_the_format_3_encoding_is_upgraded_with_its_listings(
    tmp_path: Path,
) -> None:
    """A store of many assignees' RUNNING and CANCELLING jobs, rewritten in the format
    3 key encoding, lists (every page, every filter) after its upgrade as before."""
    path = tmp_path / "s.ldb"
    before = await _varied_store(path)
    statuses = Counter(j.status for j in before)
    assert statuses[S.RUNNING] >= 3 and statuses[S.CANCELLING] == 6, statuses
    check_store(path)
    _as_format_3(path)
    assert _format(path) == 3
    async with PoolQueue(LevelDBBackend(path)) as q:
        after = await q.get_jobs([j.id for j in before])
        assert after == before
        await _check_listings(q, after)
        # Every RUNNING/CANCELLING job found through the rewritten assignee index.
        assert await q.mark_worker_unresponsive("wc\x01x") == 4
        assert await q.reset_running_jobs() == 8
        assert not (await q.list_jobs(statuses=list(ACTIVE))).jobs
    assert check_store(path).keys() == {j.id for j in before}


CRASH_UPGRADE_CHILD = """
import asyncio, os, random, signal, sys
from jobpool_async import PoolQueue
from jobpool_async.backends import leveldb as mod
where, seed, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# (a negative seed: the call it names, counted from the end: -1 the last)
left = [random.Random(seed).randint(1, calls) if seed >= 0 else calls + 1 + seed]
def hook(*_args):
    left[0] -= 1
    if left[0] == 0:
        os.kill(os.getpid(), signal.SIGKILL)
mod._UPGRADE_HOOK = hook
async def main():
    async with PoolQueue(mod.LevelDBBackend(where)):
        pass
asyncio.run(main())
print("not killed")
"""


def _crash_upgrade(where: Path, seed: int, calls: int) -> subprocess.CompletedProcess[str]:
    """Open the store at ``where`` in a child killed at a random one of the first
    ``calls`` calls of the upgrade's hook."""
    return subprocess.run(
        [sys.executable, "-c", CRASH_UPGRADE_CHILD, str(where), str(seed), str(calls)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "source", ["format 3", "format 4", "format 5", "v0.7-1f3caf7", "v0.9-3475c0a-leveldb"]
)
async def test_a_crash_during_the_upgrade_to_format_6_leaves_the_old_store_or_the_new(
    source: str, tmp_path: Path
) -> None:
    """SIGKILL at a random point of the upgrade (from format 3 each ``A`` key; before
    the write; after it) of a store rewritten as format 3, 4 or 5, or of the format 4
    and format 5 fixtures: the store is then exactly the old one or exactly the
    upgraded one, and opens with every job (and works on: a claim and its completion)."""
    path = tmp_path / "s.ldb"
    if source.startswith("format"):
        await _varied_store(path)
        {"format 3": _as_format_3, "format 4": _as_format_4, "format 5": _as_format_5}[source](path)
    else:
        shutil.copytree(FIXTURES / source / "leveldb", path)
    old = _dump(path)
    ids = [k[1:].decode() for k in old if k[:1] == b"J"]
    clean = tmp_path / "clean.ldb"
    shutil.copytree(path, clean)
    async with PoolQueue(LevelDBBackend(clean)) as q:
        jobs = await q.get_jobs(ids)
    new = _dump(clean)
    assert _format(clean) == 6 and new != old
    active = sum(1 for j in jobs if j.status in ACTIVE)
    calls = (active if source == "format 3" else 0) + 2  # the hook's calls
    for attempt in range(4):
        seed = random.randrange(2**32)
        where = tmp_path / f"{attempt}.ldb"
        shutil.copytree(path, where)
        result = _crash_upgrade(where, seed, calls)
        assert result.returncode == -signal.SIGKILL, (seed, result.stdout, result.stderr)
        assert _dump(where) in (old, new), f"a mix (seed {seed})"
        async with PoolQueue(LevelDBBackend(where)) as q:
            assert await q.get_jobs(ids) == jobs
            claimed = await take(q, "after", 2)
            assert claimed and (await q.get_jobs([claimed[0].id]))[0].status is S.RUNNING
            await q.complete_jobs({claimed[0].id: b"ok"})
        check_store(where)
    # Killed after the write, it is the new store (the last of the hook's calls).
    where = tmp_path / "last.ldb"
    shutil.copytree(path, where)
    result = _crash_upgrade(where, -1, calls)
    assert result.returncode == -signal.SIGKILL, (result.stdout, result.stderr)
    assert _dump(where) == new


@pytest.mark.parametrize("tags", [["a"], []])
async def test_a_claimed_job_is_the_callers_alone(tags: list[str], store: Path) -> None:
    """A claim hands out the job its record held (no copy): the backend keeps the
    record's values only, so changing a claimed job changes nothing stored, and the
    moves after (a read, a completion, a failure) leave the caller's object as it was
    claimed."""
    from jobpool_async.backends.base import COMPLETE, FAIL, Change

    backend = LevelDBBackend(store)
    await backend.open()
    try:
        await backend.insert([Job(id=f"j{i}", job_type="t", tags=list(tags)) for i in range(3)])
        now = datetime.now(UTC)
        got = {j.id: j for j in await backend.claim("w", tags, 3, now)}
        assert sorted(got) == ["j0", "j1", "j2"]
        before = {i: j.copy() for i, j in got.items()}
        for job in got.values():
            job.tags.append("changed")
            job.result = b"mine"
        # j0: read, then completed; j1: completed at once; j2: failed (general path).
        stored = (await backend.get_jobs(["j0"]))[0]
        assert (stored.status, stored.tags, stored.result) == (S.RUNNING, tags, None)
        later = now + timedelta(seconds=1)
        changes = [Change("j0", COMPLETE, result=b"r0"), Change("j1", COMPLETE, result=None)]
        decodes = 0
        decode = codec.decode_job

        def counted(raw: bytes) -> tuple[Job, int]:
            nonlocal decodes
            decodes += 1
            return decode(raw)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(codec, "decode_job", counted)
            assert not (await backend.apply(changes, later)).errors
        assert decodes == 0  # (completed from the record values, tags or not)
        assert not (await backend.apply([Change("j2", FAIL, error_message="x")], later)).errors
        for job_id, job in got.items():
            assert (job.status, job.finalized_at, job.error_message) == (S.RUNNING, None, "")
            assert job.result == b"mine" and job.tags == [*tags, "changed"]
            job.tags, job.result = before[job_id].tags, None
            assert job == before[job_id]
        final = {j.id: j for j in await backend.get_jobs(list(got))}
        assert [final[i].status for i in ("j0", "j1", "j2")] == [
            S.COMPLETED,
            S.COMPLETED,
            S.FAILED_RETRY,
        ]
        assert (final["j0"].result, final["j1"].result) == (b"r0", None)
        assert all(j.tags == tags and j.assigned_at == now for j in final.values())
    finally:
        await backend.close()
    check_store(store)


@pytest.mark.parametrize("tags", [["a"], []])
@pytest.mark.parametrize("method", ["insert", "insert_new"])
async def test_the_queues_checked_copies_are_kept_and_a_callers_jobs_copied(
    method: str, tags: list[str], store: Path
) -> None:
    """A queue's :class:`CheckedJobs` (its private copies) become the cached records as
    they are; the jobs of any other caller are copied (changing one afterwards changes
    nothing stored or claimed). Tagged jobs and plain ones (which the insert stages in
    its own loop)."""
    from jobpool_async.backends.base import CheckedJobs

    backend = LevelDBBackend(store)
    await backend.open()
    try:
        mine = Job(id="mine", job_type="t", tags=list(tags))
        checked = CheckedJobs([Job(id="checked", job_type="t", tags=list(tags))])
        await getattr(backend, method)([mine])
        await getattr(backend, method)(checked)
        assert backend._eligible[b"checked"].job is checked[0]
        assert backend._eligible[b"mine"].job is not mine
        for rec in backend._eligible.values():  # (made without ``__init__``: see insert)
            assert all(hasattr(rec, name) for name in type(rec).__slots__)
            assert rec.keys and rec.static is not None
            assert (rec.claimed, rec.claimed_us) == (None, 0)
        mine.job_type = "changed"
        mine.tags.append("b")
        read: list[bytes] = []
        db = backend._db

        class Reads(CountingDB):
            def get(self, key: bytes, default: Any = None) -> Any:
                read.append(key)
                return db.get(key, default)

        backend._db = Reads(db)
        got = await backend.claim("w", tags, 5, datetime.now(UTC))
        assert sorted((j.id, j.job_type, j.tags) for j in got) == [
            ("checked", "t", tags),
            ("mine", "t", tags),
        ]
        assert not [key for key in read if key[:1] == b"J"]  # (both cached: none read)
    finally:
        await backend.close()
    assert check_store(store)["mine"].job_type == "t"
