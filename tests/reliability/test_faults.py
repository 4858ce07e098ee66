"""Fault injection: a storage failure in the middle of a call leaves the store exactly
as before, raises ``StorageError``, and the queue keeps working afterwards.

* SQLite: a trigger (added from a second connection) makes the statement touching
  one chosen "victim" job fail at run time, mid-batch.
* PostgreSQL: the same, with a PL/pgSQL trigger that raises.
* LevelDB: ``plyvel.DB`` is wrapped so that a ``WriteBatch`` fails on its second
  ``put``/``delete`` (mid-batch), before anything reaches the log.
* Any backend: a wrapper makes the next backend call raise ``StorageError``; the
  queue's own bookkeeping (stream slots, waking) must survive it.
* Full disk (SQLite, LevelDB): the store lives on a 2 MB tmpfs that fills up.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import sqlite3
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from jobpool_async import Backend, Job, JobStatus, PoolQueue, StorageError

from ..backends import BackendFactory, DelegatingBackend, backend_factory, postgres_dsn

VICTIM = "victim"
BASE = datetime(2024, 1, 1, tzinfo=UTC)


# --- fault injectors ----------------------------------------------------------------------


class Injector(abc.ABC):
    """Arms a fault that hits the storage operation on ``VICTIM`` (or the Nth write)."""

    @abc.abstractmethod
    async def arm(self) -> None: ...

    @abc.abstractmethod
    async def disarm(self) -> None: ...

    async def raw(self) -> object:
        """Every row/record of the store (``None`` where it cannot be read while open).

        Lease records are left out: a stream writes its lease before its first claim,
        in a call of its own that succeeds even when the claim then fails (the lease
        writes are tested in ``tests/test_leases.py``)."""
        return None


class SQLiteInjector(Injector):
    def __init__(self, path: Path) -> None:
        self.path = path

    def _conn(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None, timeout=10)

    async def arm(self) -> None:
        conn = self._conn()
        try:
            for op, row in (("INSERT", "new"), ("UPDATE", "new"), ("DELETE", "old")):
                # abs() of the smallest integer fails at run time ("integer overflow"),
                # only for the victim's row: the batch fails in its middle.
                conn.execute(
                    f"CREATE TRIGGER jp_fault_{op.lower()} BEFORE {op} ON jobs "
                    f"WHEN {row}.id = '{VICTIM}' "
                    "BEGIN SELECT abs(-9223372036854775807 - 1); END"
                )
        finally:
            conn.close()

    async def disarm(self) -> None:
        conn = self._conn()
        try:
            for op in ("insert", "update", "delete"):
                conn.execute(f"DROP TRIGGER IF EXISTS jp_fault_{op}")
        finally:
            conn.close()

    async def raw(self) -> object:
        conn = self._conn()
        try:
            tables = [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%' AND name <> 'leases' ORDER BY name"
                )
            ]
            return {t: sorted(map(repr, conn.execute(f'SELECT * FROM "{t}"'))) for t in tables}
        finally:
            conn.close()


class PostgresInjector(Injector):
    def __init__(self, schema: str) -> None:
        self.schema = schema

    async def _run(self, fn: Callable[[Any], Awaitable[object]]) -> object:
        import asyncpg

        conn = await asyncpg.connect(postgres_dsn())
        try:
            return await fn(conn)
        finally:
            await conn.close()

    async def _job_table(self, conn: Any) -> str:
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.columns "
            "WHERE table_schema = $1 AND column_name = 'id' AND table_name LIKE '%job%'",
            self.schema,
        )
        names: list[str] = sorted({str(r[0]) for r in rows})
        assert names, f"no job table found in schema {self.schema}"
        return names[0]

    async def arm(self) -> None:
        async def go(conn: Any) -> None:
            table = await self._job_table(conn)
            s = self.schema
            await conn.execute(
                f"""
                CREATE FUNCTION "{s}".jp_fault() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF TG_OP = 'DELETE' THEN
                        IF OLD.id = '{VICTIM}' THEN RAISE EXCEPTION 'injected fault'; END IF;
                        RETURN OLD;
                    END IF;
                    IF NEW.id = '{VICTIM}' THEN RAISE EXCEPTION 'injected fault'; END IF;
                    RETURN NEW;
                END $$;
                CREATE TRIGGER jp_fault BEFORE INSERT OR UPDATE OR DELETE ON "{s}"."{table}"
                    FOR EACH ROW EXECUTE FUNCTION "{s}".jp_fault();
                """
            )

        await self._run(go)

    async def disarm(self) -> None:
        async def go(conn: Any) -> None:
            await conn.execute(f'DROP FUNCTION IF EXISTS "{self.schema}".jp_fault() CASCADE')

        await self._run(go)

    async def raw(self) -> object:
        async def go(conn: Any) -> object:
            tables = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 "
                "AND table_name <> 'leases' ORDER BY table_name",
                self.schema,
            )
            out = {}
            for (name,) in tables:
                rows = await conn.fetch(f'SELECT * FROM "{self.schema}"."{name}"')
                out[name] = sorted(repr(tuple(r)) for r in rows)
            return out

        return await self._run(go)


class _FailingWriteBatch:
    """Wraps a plyvel WriteBatch: its ``fail_at``-th put/delete raises ``plyvel.IOError``."""

    def __init__(self, real: Any, owner: LevelDBInjector) -> None:
        self._real, self._owner = real, owner

    def _step(self) -> None:
        import plyvel

        if self._owner.armed:
            self._owner.ops += 1
            if self._owner.ops == 2:
                raise plyvel.IOError(b"IO error: injected fault (disk went away)")

    def put(self, key: bytes, value: bytes) -> None:
        self._step()
        self._real.put(key, value)

    def delete(self, key: bytes) -> None:
        self._step()
        self._real.delete(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __enter__(self) -> _FailingWriteBatch:
        self._real.__enter__()
        return self

    def __exit__(self, *exc: object) -> Any:
        return self._real.__exit__(*exc)


class _DBProxy:
    def __init__(self, real: Any, owner: LevelDBInjector) -> None:
        self._real, self._owner = real, owner

    def write_batch(self, *args: Any, **kwargs: Any) -> _FailingWriteBatch:
        return _FailingWriteBatch(self._real.write_batch(*args, **kwargs), self._owner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class LevelDBInjector(Injector):
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import plyvel

        self.armed = False
        self.ops = 0
        self.db: _DBProxy | None = None
        real_db = plyvel.DB

        def open_db(*args: Any, **kwargs: Any) -> _DBProxy:
            self.db = _DBProxy(real_db(*args, **kwargs), self)
            return self.db

        monkeypatch.setattr(plyvel, "DB", open_db)

    async def arm(self) -> None:
        self.armed, self.ops = True, 0

    async def disarm(self) -> None:
        self.armed = False

    async def raw(self) -> object:
        """Every key and value in the store (read through the backend's own handle),
        lease records (``G``) left out as in :meth:`Injector.raw`."""
        assert self.db is not None
        return [kv for kv in self.db.iterator() if not kv[0].startswith(b"G")]


# --- scenarios: each sets up jobs, then runs one call with VICTIM mid-batch ---------------


def _job(job_id: str, minute: int, tags: Sequence[str] = ()) -> Job:
    return Job(
        job_id,
        "t",
        b"payload-" + job_id.encode(),
        list(tags),
        created_at=BASE + timedelta(minutes=minute),
    )


async def _run_to(queue: PoolQueue, ids: Sequence[str], assignee: str = "w") -> None:
    """Claim exactly ``ids`` (the only eligible jobs) for ``assignee``."""
    async with queue.stream_jobs(assignee, max_assigned_jobs=len(ids)) as stream:
        batch = await asyncio.wait_for(stream.__anext__(), 10)
    assert sorted(j.id for j in batch) == sorted(ids)


ALL_IDS = ["a", "b", VICTIM, "c", "d"]


async def _setup_pending(queue: PoolQueue) -> None:
    await queue.enqueue_jobs([_job(i, n) for n, i in enumerate(ALL_IDS)])


async def _setup_running(queue: PoolQueue) -> None:
    await _setup_pending(queue)
    await _run_to(queue, ALL_IDS)


async def _setup_final(queue: PoolQueue) -> None:
    await _setup_running(queue)
    await queue.complete_jobs({i: b"r" for i in ALL_IDS})


async def _claim(queue: PoolQueue) -> object:
    stream = queue.stream_jobs("w2", max_assigned_jobs=5)
    try:
        return await asyncio.wait_for(stream.__anext__(), 10)
    finally:
        await stream.aclose()


Scenario = tuple[Callable[[PoolQueue], Awaitable[object]], Callable[[PoolQueue], Awaitable[object]]]
SCENARIOS: dict[str, Scenario] = {
    "enqueue_jobs": (
        lambda q: q.enqueue_jobs([_job("x", 10)]),
        lambda q: q.enqueue_jobs([_job(i, n) for n, i in enumerate(ALL_IDS)]),
    ),
    "claim": (_setup_pending, _claim),
    "complete_jobs": (_setup_running, lambda q: q.complete_jobs({i: b"done" for i in ALL_IDS})),
    "fail_jobs": (_setup_running, lambda q: q.fail_jobs({i: "boom" for i in ALL_IDS})),
    "cancel_jobs": (_setup_running, lambda q: q.cancel_jobs(job_ids=ALL_IDS)),
    "acknowledge_cancellation": (
        lambda q: _then(_setup_running(q), q.cancel_jobs(job_ids=ALL_IDS)),
        lambda q: q.acknowledge_cancellation(dict.fromkeys(ALL_IDS, True)),
    ),
    "mark_worker_unresponsive": (_setup_running, lambda q: q.mark_worker_unresponsive("w")),
    "reset_running_jobs": (_setup_running, lambda q: q.reset_running_jobs()),
    "delete_jobs": (_setup_final, lambda q: q.delete_jobs(job_ids=ALL_IDS)),
    "cleanup_expired_jobs": (
        _setup_final,
        lambda q: q.cleanup_expired_jobs(timedelta(microseconds=1)),
    ),
}


async def _then(first: Awaitable[object], second: Awaitable[object]) -> None:
    await first
    await second


async def _snapshot(queue: PoolQueue) -> tuple[list[Job], object]:
    return await queue.get_jobs([*ALL_IDS, "x"]), await queue.get_job_stats()


@contextlib.asynccontextmanager
async def _store(
    backend_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[BackendFactory, Injector]]:
    schema = f"jp_fault_{uuid.uuid4().hex[:10]}" if backend_name == "postgres" else None
    injector: Injector
    if backend_name == "sqlite":
        injector = SQLiteInjector(tmp_path / "jobs.db")
    elif backend_name == "leveldb":
        injector = LevelDBInjector(monkeypatch)
    else:
        assert schema is not None
        injector = PostgresInjector(schema)
    factory = backend_factory(backend_name, tmp_path, schema)
    try:
        yield factory, injector
    finally:
        if schema is not None:
            from ..backends import drop_postgres_schema

            await drop_postgres_schema(schema)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("backend_name", ["sqlite", "leveldb", "postgres"])
async def test_failure_mid_batch_changes_nothing(
    backend_name: str, scenario: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup, call = SCENARIOS[scenario]
    async with _store(backend_name, tmp_path, monkeypatch) as (factory, injector):
        queue = PoolQueue(factory())
        await queue.open()
        try:
            await setup(queue)
            before, raw_before = await _snapshot(queue), await injector.raw()
            await injector.arm()
            with pytest.raises(StorageError):
                await call(queue)
            await injector.disarm()
            assert await _snapshot(queue) == before, "a failed call changed the store"
            assert await injector.raw() == raw_before, "a failed call changed stored rows"
            # The queue keeps working: the same call now succeeds.
            await call(queue)
            after = await _snapshot(queue)
        finally:
            await queue.close()
        async with PoolQueue(factory()) as reopened:  # what was written is what was reported
            assert await _snapshot(reopened) == after


# --- any backend: the queue survives a failing backend call --------------------------------


class FlakyBackend(DelegatingBackend):
    """Delegates to a real backend; ``fail_next`` makes the next call raise StorageError
    before it reaches storage (so the store is unchanged by construction)."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.fail_next: set[str] = set()

    def _call(self, name: str) -> None:
        name = "insert" if name == "insert_new" else name
        if name in self.fail_next:
            self.fail_next.discard(name)
            raise StorageError(f"injected failure in {name}")


async def test_queue_survives_failing_backend_calls(make_backend: BackendFactory) -> None:
    """Each kind of backend call fails once: the error is StorageError, nothing changes,
    the stream keeps its slots right, and the very next attempt works."""
    flaky = FlakyBackend(make_backend())
    async with PoolQueue(flaky) as queue:
        flaky.fail_next.add("insert")
        with pytest.raises(StorageError):
            await queue.enqueue_jobs([_job("a", 0), _job("b", 1)])
        assert await queue.get_jobs(["a", "b"]) == []
        await queue.enqueue_jobs([_job("a", 0), _job("b", 1)])

        async with queue.stream_jobs("w", max_assigned_jobs=1) as stream:
            flaky.fail_next.add("claim")
            with pytest.raises(StorageError):
                await asyncio.wait_for(stream.__anext__(), 10)
            assert stream.assigned_job_ids == []
            assert (await queue.get_job_stats()).running_jobs == 0
            (first,) = await asyncio.wait_for(stream.__anext__(), 10)  # the stream still works
            assert first.id == "a" and stream.assigned_job_ids == ["a"]

            flaky.fail_next.add("apply")
            with pytest.raises(StorageError):
                await queue.complete_job("a", b"r")
            assert stream.assigned_job_ids == ["a"], "a failed move must not free the slot"
            assert (await queue.get_job("a")).status is JobStatus.RUNNING

            flaky.fail_next.add("apply_selected")
            with pytest.raises(StorageError):
                await queue.cancel_jobs(job_ids=["a", "b"])
            assert [j.status for j in await queue.get_jobs(["a", "b"])] == [
                JobStatus.RUNNING,
                JobStatus.INITIAL_PENDING,
            ]

            await queue.complete_job("a", b"r")  # frees the slot and wakes the stream
            (second,) = await asyncio.wait_for(stream.__anext__(), 10)
            assert second.id == "b"
            await queue.complete_job("b", b"r")

        for name, call in (
            ("delete", lambda: queue.delete_jobs(job_ids=["a"])),
            (
                "delete_completed_before",
                lambda: queue.cleanup_expired_jobs(timedelta(microseconds=1)),
            ),
            ("count_by_status", lambda: queue.get_job_stats()),
            ("get_jobs", lambda: queue.get_job("a")),
        ):
            flaky.fail_next.add(name)
            with pytest.raises(StorageError):
                await call()
        assert [j.status for j in await queue.get_jobs(["a", "b"])] == [JobStatus.COMPLETED] * 2
        assert await queue.cleanup_expired_jobs(timedelta(microseconds=1)) == 2


# --- full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, or a skip saying why one cannot be mounted here."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("full-disk tests mount a 2 MB tmpfs, which needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(where: Path) -> Path:
    """Fill the filesystem at ``where`` to the last byte; return the filler file."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("backend_name", ["sqlite", "leveldb"])
async def test_full_disk_gives_storage_error_and_no_corruption(
    backend_name: str, small_disk: Path
) -> None:
    factory = backend_factory(backend_name, small_disk)
    payload = os.urandom(20_000)
    queue = PoolQueue(factory())
    await queue.open()
    stored: list[str] = []
    try:
        for n in range(10):
            await queue.enqueue_jobs([_job(f"early{n}", n)])
            stored.append(f"early{n}")
        await _run_to(queue, ["early0"])
        await queue.complete_job("early0", b"result")
        filler = _fill(small_disk)
        failed = None
        for n in range(200):  # payloads until the disk is really full for the store too
            try:
                await queue.enqueue_jobs([Job(f"late{n}-{k}", "t", payload) for k in range(3)])
            except StorageError as exc:
                failed = (n, exc)
                break
            stored.extend(f"late{n}-{k}" for k in range(3))
        assert failed is not None, "the store never reported the full disk"
        rejected = [f"late{failed[0]}-{k}" for k in range(3)]
        with pytest.raises(StorageError):  # still full: still refused, nothing written
            await queue.enqueue_job(Job("still-full", "t", payload))
        filler.unlink()
        # Space is back: the same queue, in the same process, works again.
        assert await queue.get_jobs([*rejected, "still-full"]) == [], "a failed batch was written"
        await queue.enqueue_job(Job("recovered", "t", tags=["after"]))
        stored.append("recovered")
        async with queue.stream_jobs("w", tags=["after"]) as stream:
            batch = await asyncio.wait_for(stream.__anext__(), 10)
        assert [j.id for j in batch] == ["recovered"]
        await queue.complete_job("recovered", b"done")
        assert (await queue.get_job_stats()).total_jobs == len(stored)
    finally:
        with contextlib.suppress(StorageError):
            await queue.close()
    async with PoolQueue(factory()) as reopened:
        jobs = await reopened.get_jobs([*stored, *rejected, "still-full"])
        assert [j.id for j in jobs] == stored, "every job written before the failure is intact"
        done = await reopened.get_job("early0")
        assert (done.status, done.result) == (JobStatus.COMPLETED, b"result")
        assert all(j.job_definition == payload for j in jobs if j.id.startswith("late"))
        await reopened.enqueue_job(Job("after", "t"))  # and the store takes writes again
        assert (await reopened.get_job_stats()).total_jobs == len(stored) + 1
