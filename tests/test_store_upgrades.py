"""Stores written by the previous version are upgraded in place on open (SPEC §8).

The stores under ``tests/fixtures/stores/<version>`` were written by that version's
code with ``tests/fixtures/stores/generate.py`` (its docstring says how to regenerate
them); ``expected.json`` holds every job and the stats as that code read them back.
This code must open each store, keep every job and counter exactly, give the new
fields their defaults, and keep working on it. A crash (SIGKILL) at a random point
of an upgrade leaves the old store or the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from jobpool_async import Backend, Job, JobStatus, PoolQueue, StorageError
from jobpool_async.backends.leveldb import LevelDBBackend
from jobpool_async.backends.sqlite import SCHEMA_VERSION as SQLITE_VERSION
from jobpool_async.backends.sqlite import SQLiteBackend
from jobpool_async.testing import FakeClock

from .backends import drop_postgres_schema, new_schema_name, postgres_dsn

FIXTURES = Path(__file__).parent / "fixtures" / "stores"
#: The stores of the version before schedules and priorities (main at 64c066e).
PREVIOUS = FIXTURES / "v0.1-64c066e"
#: The stores of schema version 2 of SQLite (main at 647893d), with timed jobs.
VERSION_2 = FIXTURES / "v0.2-647893d"
#: The stores of schema version 3 of SQLite (main at ae89716).
VERSION_3 = FIXTURES / "v0.3-ae89716"
#: The SQLite store of schema version 4 (main at b751006).
VERSION_4 = FIXTURES / "v0.4-b751006"
#: The PostgreSQL store of schema version 4: the one written at ae89716 (the code up to
#: a68b318 wrote the same schema; a dump made there differs only in timestamps).
PG_VERSION_4 = VERSION_3
#: The SQLite store of schema version 5 (main at a68b318).
VERSION_5 = FIXTURES / "v0.5-a68b318"
#: The PostgreSQL store of schema version 5 (main at fc07ff3).
PG_VERSION_5 = FIXTURES / "v0.6-fc07ff3"
#: The SQLite store of schema version 6 (main at 1f3caf7).
VERSION_6 = FIXTURES / "v0.7-1f3caf7"
#: The PostgreSQL store of schema version 6 (main at 03ffe0d).
PG_VERSION_6 = FIXTURES / "v0.8-03ffe0d-postgres"
ROOT = Path(__file__).resolve().parents[1]
#: Crash points tried per backend (raise it to search harder).
CRASHES = int(os.environ.get("JOBPOOL_UPGRADE_CRASHES", "4"))
NAMES = ["sqlite", "leveldb", "postgres"]


def expected(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PREVIOUS / "expected.json").read_text())[name]
    return data


def _value(field: str, raw: Any) -> Any:
    if raw is None:
        return None
    if field in ("job_definition", "result"):
        return base64.b64decode(raw)
    if field == "status":
        return JobStatus(raw)
    if field.endswith("_at"):
        return datetime.fromisoformat(raw)
    return raw


def check_jobs(jobs: list[Job], want: dict[str, Any]) -> None:
    assert [j.id for j in jobs] == [w["id"] for w in want["jobs"]]
    for job, old in zip(jobs, want["jobs"], strict=True):
        for field, raw in old.items():
            assert getattr(job, field) == _value(field, raw), (job.id, field)
        assert (job.scheduled_at, job.priority, job.max_attempts, job.attempts) == (
            None,
            0,
            None,
            0,
        ), job.id


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    postgres_dsn()
    schema = new_schema_name()
    yield schema
    await drop_postgres_schema(schema)


def _pg_script(schema: str, fixture: Path = PREVIOUS) -> str:
    """A version's dump, into ``schema`` (psql meta-commands dropped)."""
    text = (fixture / "postgres.sql").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("\\")]
    return "\n".join(lines).replace("jobpool_fixture", schema)


async def _load_pg(schema: str, fixture: Path = PREVIOUS) -> None:
    import asyncpg

    conn = await asyncpg.connect(postgres_dsn())
    try:
        await conn.execute(_pg_script(schema, fixture))
    finally:
        await conn.close()


async def copy_store(name: str, tmp_path: Path, schema: str) -> Callable[[], Backend]:
    """A copy of the previous version's store, and a factory of backends on it."""
    if name == "sqlite":
        path = tmp_path / "old.db"
        shutil.copy(PREVIOUS / "sqlite.db", path)
        return lambda: SQLiteBackend(path)
    if name == "leveldb":
        path = tmp_path / "old.ldb"
        shutil.copytree(PREVIOUS / "leveldb", path)
        return lambda: LevelDBBackend(path)
    from jobpool_async.backends.postgres import PostgresBackend

    await _load_pg(schema)
    dsn = postgres_dsn()
    return lambda: PostgresBackend(dsn, schema=schema)


@pytest.fixture(params=NAMES)
async def old_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[str, Callable[[], Backend]]]:
    name = str(request.param)
    if name == "postgres":
        postgres_dsn()
        schema = new_schema_name()
        try:
            yield name, await copy_store(name, tmp_path, schema)
        finally:
            await drop_postgres_schema(schema)
    else:
        yield name, await copy_store(name, tmp_path, "")


async def test_a_store_of_the_previous_version_is_upgraded_in_place(
    old_store: tuple[str, Callable[[], Backend]],
) -> None:
    name, factory = old_store
    want = expected(name)
    ids = [w["id"] for w in want["jobs"]]
    clock = FakeClock(datetime(2031, 1, 1, tzinfo=UTC))
    async with PoolQueue(factory(), clock=clock) as q:
        check_jobs(await q.get_jobs(ids), want)
        stats = await q.get_job_stats()
        assert stats.total_jobs == want["stats"]["total_jobs"]
        assert stats.total_retries == want["stats"]["total_retries"]
        assert {s.value: n for s, n in stats.by_status.items() if n} == {
            s: n for s, n in want["stats"]["by_status"].items() if n
        }
        assert stats.discarded_jobs == 0
    async with PoolQueue(factory(), clock=clock) as q:  # reopened: upgraded once, kept
        check_jobs(await q.get_jobs(ids), want)
        # The eligible jobs come out in the old order (no priorities, no schedules) ...
        old = [
            w
            for w in want["jobs"]
            if JobStatus(w["status"])
            in (JobStatus.INITIAL_PENDING, JobStatus.FAILED_RETRY, JobStatus.UNKNOWN_RETRY)
        ]
        old.sort(key=lambda w: w["last_retry_at"] or w["created_at"])
        await q.enqueue_jobs(
            [
                Job(id="new-top", job_type="t", priority=5),
                Job(id="new-later", job_type="t", scheduled_at=clock.now() + timedelta(hours=1)),
            ]
        )
        async with q.stream_jobs("after", max_assigned_jobs=len(old) + 2) as stream:
            batch = await stream.__anext__()
        got = {j.id for j in batch}
        assert got == {w["id"] for w in old} | {"new-top"}
        assert all(j.attempts == 1 for j in batch)
        # ... and every new call works on the upgraded store.
        await q.fail_jobs({"new-top": ("boom", timedelta(minutes=5))})
        await q.discard_job(old[0]["id"], "gave up")
        assert await q.requeue_jobs(job_ids=[old[0]["id"]]) == [old[0]["id"]]
        assert (await q.get_job("new-top")).scheduled_at == clock.now() + timedelta(minutes=5)


async def test_sqlite_refuses_a_newer_store_naming_both_versions(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    shutil.copy(PREVIOUS / "sqlite.db", path)
    async with PoolQueue(SQLiteBackend(path)):
        pass
    newer = SQLITE_VERSION + 1
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {newer}")
    conn.close()
    with pytest.raises(StorageError, match=rf"version {newer}.*version {SQLITE_VERSION}"):
        async with PoolQueue(SQLiteBackend(path)):
            pass
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == newer, "left as it was"
    conn.close()


# --- SQLite store version 2 (schedules, before jobs_list_state) --------------------------------


def _indexes(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    finally:
        conn.close()


async def _taken_one_at_a_time(q: PoolQueue, n: int) -> list[str]:
    """The ids of the next ``n`` jobs a stream of one slot takes, each completed."""
    taken: list[str] = []
    async with q.stream_jobs("after", max_assigned_jobs=1) as stream:
        while len(taken) < n:
            (job,) = await stream.__anext__()
            taken.append(job.id)
            await q.complete_job(job.id, b"ok")
    return taken


async def _claims_keep_their_order(q: PoolQueue, jobs: list[Job], ids: list[str]) -> None:
    """Claims take the stored eligible jobs by priority, then due key (the due
    scheduled job is promoted), then enqueue order; the one scheduled for 2035 waits.
    Their completions list as COMPLETED."""
    eligible = [j for j in jobs if j.status.is_eligible and j.id != "sched-later"]
    eligible.sort(key=lambda j: (-j.priority, j.sort_key, ids.index(j.id)))
    taken = await _taken_one_at_a_time(q, len(eligible))
    assert taken == [j.id for j in eligible]
    assert taken[0] == "prio-high" and taken[-1] == "sched-due"
    done = await q.list_jobs(statuses=[JobStatus.COMPLETED], limit=1000)
    assert set(taken) <= {j.id for j in done.jobs}


async def test_sqlite_store_of_version_2_is_upgraded_in_place(tmp_path: Path) -> None:
    """Version 2 → 3: the status listing index is rebuilt COMPLETED-last; every job (with
    its schedule, priority and attempt limit), counter and listing page is kept."""
    want = json.loads((VERSION_2 / "expected.json").read_text())["sqlite"]
    path = tmp_path / "v2.db"
    shutil.copy(VERSION_2 / "sqlite.db", path)
    assert "jobs_list_idle" in _indexes(path)
    ids = [w["id"] for w in want["jobs"]]
    clock = FakeClock(datetime(2031, 1, 1, tzinfo=UTC))
    for _ in range(2):  # upgraded once, then opened as it is
        async with PoolQueue(SQLiteBackend(path), clock=clock) as q:
            jobs = await q.get_jobs(ids)
            assert [j.id for j in jobs] == ids
            for job, old in zip(jobs, want["jobs"], strict=True):
                for field, raw in old.items():
                    assert getattr(job, field) == _value(field, raw), (job.id, field)
            stats = await q.get_job_stats()
            assert stats.total_jobs == want["stats"]["total_jobs"]
            assert stats.total_retries == want["stats"]["total_retries"]
            # Every status lists the same jobs as a scan, newest first.
            for status in JobStatus:
                page = await q.list_jobs(statuses=[status], limit=1000)
                listed = [(j.created_at, j.id) for j in page.jobs]
                scanned = sorted((j.created_at, j.id) for j in jobs if j.status is status)
                assert listed == scanned[::-1], status
    names = _indexes(path)
    assert "jobs_list_prio" in names and not {"jobs_list_state", "jobs_list_idle"} & names
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SQLITE_VERSION
    conn.close()
    async with PoolQueue(SQLiteBackend(path), clock=clock) as q:
        await _claims_keep_their_order(q, jobs, ids)


# --- SQLite store version 3 (before the enqueue counter left seq) -------------------------------


def _check_stored(jobs: list[Job], want: dict[str, Any]) -> None:
    assert [j.id for j in jobs] == [w["id"] for w in want["jobs"]]
    for job, old in zip(jobs, want["jobs"], strict=True):
        for field, raw in old.items():
            assert getattr(job, field) == _value(field, raw), (job.id, field)


async def _stored_as_written(q: PoolQueue, ids: list[str], want: dict[str, Any]) -> list[Job]:
    """The stored jobs, checked against what the old code read back, and the stats."""
    jobs = await q.get_jobs(ids)
    _check_stored(jobs, want)
    stats = await q.get_job_stats()
    assert stats.total_jobs == want["stats"]["total_jobs"]
    assert stats.total_retries == want["stats"]["total_retries"]
    assert {s.value: n for s, n in stats.by_status.items() if n} == {
        s: n for s, n in want["stats"]["by_status"].items() if n
    }
    return jobs


async def test_sqlite_store_of_version_3_is_upgraded_in_place(tmp_path: Path) -> None:
    """Version 3 → 4: the enqueue counter moves from ``seq`` to ``jobs_order``. Every
    job, counter and listing page is kept, and a job enqueued after the upgrade comes
    after the stored ones of its priority and due key (enqueued before it)."""
    want = json.loads((VERSION_3 / "expected.json").read_text())["sqlite"]
    path = tmp_path / "v3.db"
    shutil.copy(VERSION_3 / "sqlite.db", path)
    assert _sqlite_schema(path)[0] == 3
    ids = [w["id"] for w in want["jobs"]]
    clock = FakeClock(datetime(2031, 1, 1, tzinfo=UTC))
    for _ in range(2):  # upgraded once, then opened as it is
        async with PoolQueue(SQLiteBackend(path), clock=clock) as q:
            jobs = await _stored_as_written(q, ids, want)
            for status in JobStatus:
                page = await q.list_jobs(statuses=[status], limit=1000)
                listed = [(j.created_at, j.id) for j in page.jobs]
                scanned = sorted((j.created_at, j.id) for j in jobs if j.status is status)
                assert listed == scanned[::-1], status
    assert _sqlite_schema(path)[0] == SQLITE_VERSION
    eligible = [j for j in jobs if j.status.is_eligible and j.id != "sched-later"]
    # New jobs that tie with stored ones on priority and due key: enqueue order decides.
    ties = [
        Job(
            id=f"tie-{j.id}",
            job_type="t",
            priority=j.priority,
            created_at=j.created_at,
            scheduled_at=j.scheduled_at,
        )
        for j in eligible
        if j.last_retry_at is None
    ]
    assert {j.priority for j in ties} >= {7, 0, -3}
    async with PoolQueue(SQLiteBackend(path), clock=clock) as q:
        await q.enqueue_jobs(ties)
        order = ids + [j.id for j in ties]
        expect = sorted(
            [*eligible, *await q.get_jobs([j.id for j in ties])],
            key=lambda j: (-j.priority, j.sort_key, order.index(j.id)),
        )
        taken = await _taken_one_at_a_time(q, len(expect))
        assert taken == [j.id for j in expect]
        assert taken.index("prio-high") + 1 == taken.index("tie-prio-high")


# --- SQLite store version 4 (before the status listing index held priorities) ----------------


def _listing_matches_a_scan(jobs: list[Job], pages: list[list[Job]]) -> None:
    """``pages`` are the pages of a listing of ``jobs``: newest first, each once."""
    listed = [(j.created_at, j.id) for page in pages for j in page]
    assert listed == sorted(((j.created_at, j.id) for j in jobs), reverse=True)


async def test_sqlite_store_of_version_4_is_upgraded_in_place(tmp_path: Path) -> None:
    """Version 4 → 5: ``jobs_list_state`` becomes ``jobs_list_prio`` (idle jobs by status
    and priority). Every job, counter and listing page is kept (pages of any size, by
    every status and pair of statuses), and claims keep their order."""
    want = json.loads((VERSION_4 / "expected.json").read_text())["sqlite"]
    path = tmp_path / "v4.db"
    shutil.copy(VERSION_4 / "sqlite.db", path)
    assert _sqlite_schema(path)[0] == 4 and "jobs_list_state" in _indexes(path)
    ids = [w["id"] for w in want["jobs"]]
    clock = FakeClock(datetime(2031, 1, 1, tzinfo=UTC))
    for _ in range(2):  # upgraded once, then opened as it is
        async with PoolQueue(SQLiteBackend(path), clock=clock) as q:
            jobs = await _stored_as_written(q, ids, want)
            await _lists_match_a_scan(q, jobs)
    assert _sqlite_schema(path)[0] == SQLITE_VERSION
    names = _indexes(path)
    assert "jobs_list_prio" in names and "jobs_list_state" not in names
    async with PoolQueue(SQLiteBackend(path), clock=clock) as q:
        await _claims_keep_their_order(q, jobs, ids)
        oldest = await q.backend.oldest_created(frozenset({JobStatus.INITIAL_PENDING}))
        assert oldest == min(j.created_at for j in await q.get_jobs(ids) if j.status.is_eligible)


# --- PostgreSQL store version 4 (before jobs_idle_tagged took jobs_idle_list's place) --------


async def _pg_state(schema: str) -> tuple[int, set[str]]:
    """The store's version and the names of its indexes."""
    import asyncpg

    conn = await asyncpg.connect(postgres_dsn())
    try:
        version = await conn.fetchval(f'SELECT max(version) FROM "{schema}".jobpool_version')
        rows = await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = $1", schema)
    finally:
        await conn.close()
    return version, {r[0] for r in rows}


async def _all_pages(q: PoolQueue, size: int, **filters: Any) -> list[list[Job]]:
    pages: list[list[Job]] = []
    after = None
    while True:
        page = await q.list_jobs(limit=size, after=after, **filters)
        pages.append(page.jobs)
        if (after := page.next_after) is None:
            return pages


def _kept(job: Job, filters: dict[str, Any]) -> bool:
    """Whether ``job`` is in a listing with ``filters`` (``list_jobs`` arguments)."""
    return (
        job.status in filters.get("statuses", [job.status])
        and job.job_type == filters.get("job_type", job.job_type)
        and set(filters.get("tags", [])) <= set(job.tags)
    )


async def _lists_match_a_scan(q: PoolQueue, jobs: list[Job]) -> None:
    """Every listing of ``jobs`` (no filter, each status and pair of statuses, each type,
    each tag, a type with a tag), in pages of any size, lists what a scan finds."""
    statuses = [s for s in JobStatus if any(j.status is s for j in jobs)]
    tags = sorted({t for j in jobs for t in j.tags})
    types = sorted({j.job_type for j in jobs})
    asked: list[dict[str, Any]] = [{}]
    asked += [{"statuses": [s]} for s in JobStatus]
    asked += [{"statuses": [a, b]} for a in statuses for b in statuses if a.value < b.value]
    asked += [{"job_type": t} for t in types]
    asked += [{"tags": [t]} for t in tags]
    asked += [{"tags": [t], "job_type": types[0]} for t in tags]
    for size in (1, 3, 1000):
        for filters in asked:
            pages = await _all_pages(q, size, **filters)
            _listing_matches_a_scan([j for j in jobs if _kept(j, filters)], pages)


async def _pg_opened_together(pg_schema: str, want: dict[str, Any]) -> list[Job]:
    """Four backends open the loaded store at once (one upgrades it under the advisory
    lock, the others find it done); then it is opened twice more as it is, and every
    job and listing page is as written. Returns the jobs read back."""
    from jobpool_async.backends.postgres import PostgresBackend

    dsn = postgres_dsn()
    together = [PostgresBackend(dsn, schema=pg_schema) for _ in range(4)]
    try:
        await asyncio.gather(*(b.open() for b in together))
    finally:
        await asyncio.gather(*(b.close() for b in together))
    ids = [w["id"] for w in want["jobs"]]
    for _ in range(2):  # opened again as it is
        async with PoolQueue(PostgresBackend(dsn, schema=pg_schema), clock=_pg_clock()) as q:
            jobs = await _stored_as_written(q, ids, want)
            await _lists_match_a_scan(q, jobs)
    return jobs


def _pg_clock() -> FakeClock:
    """The clock the PostgreSQL upgrade tests open their stores with."""
    return FakeClock(datetime(2031, 1, 1, tzinfo=UTC))


async def test_postgres_store_of_version_4_is_upgraded_in_place(pg_schema: str) -> None:
    """Version 4 → 5: ``jobs_idle_list`` (every idle job by creation time) gives way to
    ``jobs_idle_tagged`` (only jobs with tags): a job without tags writes two index
    entries fewer. Four backends open the store at once (one upgrades it under the
    advisory lock, the others find it done); every job, counter and listing page is
    kept, and claims keep their order."""
    from jobpool_async.backends.postgres import SCHEMA_VERSION as PG_VERSION
    from jobpool_async.backends.postgres import PostgresBackend

    want = json.loads((PG_VERSION_4 / "expected.json").read_text())["postgres"]
    await _load_pg(pg_schema, PG_VERSION_4)
    version, names = await _pg_state(pg_schema)
    assert version == 4 and "jobs_idle_list" in names and "jobs_idle_tagged" not in names
    jobs = await _pg_opened_together(pg_schema, want)
    dsn, ids, clock = postgres_dsn(), [w["id"] for w in want["jobs"]], _pg_clock()
    version, after = await _pg_state(pg_schema)
    assert version == PG_VERSION == 7
    assert after == names - {"jobs_idle_list", "jobs_completed"} | {
        "jobs_idle_tagged",
        "jobs_completed_early",
    }
    async with PoolQueue(PostgresBackend(dsn, schema=pg_schema), clock=clock) as q:
        await _claims_keep_their_order(q, jobs, ids)
        await _lists_match_a_scan(q, await q.get_jobs(ids))


# --- PostgreSQL store version 5 (before jobs_completed_early took jobs_completed's place) ------


async def test_postgres_store_of_version_5_is_upgraded_in_place(pg_schema: str) -> None:
    """Version 5 → 6: ``jobs_completed`` (every completed job by ``finalized_at``) gives
    way to ``jobs_completed_early`` (only those finalized before their creation time;
    cleanup finds the others through ``jobs_idle_status``): a completion writes one index
    entry fewer. Four backends open the store at once (one upgrades it under the advisory
    lock, the others find it done); every job, counter and listing page is kept, claims
    keep their order, and a purge finds every completed job, those created after they
    were finalized too, and only those finalized by its cutoff."""
    from jobpool_async.backends.postgres import SCHEMA_VERSION as PG_VERSION
    from jobpool_async.backends.postgres import PostgresBackend

    want = json.loads((PG_VERSION_5 / "expected.json").read_text())["postgres"]
    await _load_pg(pg_schema, PG_VERSION_5)
    version, names = await _pg_state(pg_schema)
    assert version == 5 and "jobs_completed" in names and "jobs_completed_early" not in names
    jobs = await _pg_opened_together(pg_schema, want)
    dsn, ids, clock = postgres_dsn(), [w["id"] for w in want["jobs"]], _pg_clock()
    version, after = await _pg_state(pg_schema)
    assert version == PG_VERSION == 7
    assert after == names - {"jobs_completed"} | {"jobs_completed_early"}
    async with PoolQueue(PostgresBackend(dsn, schema=pg_schema), clock=clock) as q:
        await _claims_keep_their_order(q, jobs, ids)
        await _lists_match_a_scan(q, await q.get_jobs(ids))
        done = [j for j in await q.get_jobs(ids) if j.status is JobStatus.COMPLETED]
        completed = [j.id for j in done]
        assert completed
        late = clock.now() + timedelta(days=400)  # created after it is finalized
        await q.enqueue_jobs([Job(id="late", job_type="t", created_at=late)])
        async with q.stream_jobs("w", max_assigned_jobs=100) as stream:
            while "late" not in {
                j.id for j in await q.get_jobs(["late"]) if j.status is JobStatus.COMPLETED
            }:
                batch = await stream.__anext__()
                await q.complete_jobs({j.id: b"" for j in batch})
        first = min(j.finalized_at for j in done if j.finalized_at is not None)
        before = first - timedelta(microseconds=1)  # every completion is later
        assert await q.backend.delete_completed_before(before) == 0
        gone = await q.backend.delete_completed_before(clock.now())
        assert gone >= len(completed) + 1
        assert await q.get_jobs([*completed, "late"]) == []
        assert not any(j.status is JobStatus.COMPLETED for j in await q.get_jobs(ids))


# --- PostgreSQL store version 6 (before the text keys compared as bytes) --------------------


async def _pg_collations(schema: str) -> dict[str, str]:
    """The collation of each text column of the store's jobs table, and of each index
    key column (``index.n``)."""
    import asyncpg

    conn = await asyncpg.connect(postgres_dsn())
    try:
        rows = await conn.fetch(
            "SELECT a.attname, c.collname FROM pg_attribute a "
            "JOIN pg_collation c ON c.oid = a.attcollation "
            "WHERE a.attrelid = ($1 || '.jobs')::regclass AND a.attnum > 0",
            f'"{schema}"',
        )
        keys = await conn.fetch(
            "SELECT i.relname || '.' || k.n, c.collname FROM pg_index x "
            "JOIN pg_class i ON i.oid = x.indexrelid "
            "CROSS JOIN LATERAL unnest(x.indcollation) WITH ORDINALITY AS k(coll, n) "
            "JOIN pg_collation c ON c.oid = k.coll "
            "WHERE x.indrelid = ($1 || '.jobs')::regclass",
            f'"{schema}"',
        )
    finally:
        await conn.close()
    return {r[0]: r[1] for r in [*rows, *keys]}


async def test_postgres_store_of_version_6_is_upgraded_in_place(pg_schema: str) -> None:
    """Version 6 → 7: the text keys (``id_key``, ``status``, ``job_type``,
    ``assignee_id``) compare as bytes (``COLLATE "C"``), and every index on them with
    them (the primary key, the type and assignee prefixes). Four backends open the store
    at once (one upgrades it under the advisory lock, the others find it done); every
    job, counter and listing page is kept, claims keep their order, and the type
    statistics that lists by type need are kept."""
    from jobpool_async.backends.postgres import SCHEMA_VERSION as PG_VERSION
    from jobpool_async.backends.postgres import PostgresBackend

    want = json.loads((PG_VERSION_6 / "expected.json").read_text())["postgres"]
    await _load_pg(pg_schema, PG_VERSION_6)
    version, names = await _pg_state(pg_schema)
    before = await _pg_collations(pg_schema)
    assert version == 6 and set(before.values()) == {"default"}
    jobs = await _pg_opened_together(pg_schema, want)
    dsn, ids, clock = postgres_dsn(), [w["id"] for w in want["jobs"]], _pg_clock()
    version, after = await _pg_state(pg_schema)
    assert version == PG_VERSION == 7 and after == names
    keys = {"id_key", "status", "job_type", "assignee_id"}
    collations = await _pg_collations(pg_schema)
    assert {c for c, coll in collations.items() if coll == "C"} == keys | {
        "jobs_pkey.1",
        "jobs_idle_type.1",
        "jobs_idle_status.1",
        "jobs_active_assignee.1",
    }
    assert set(collations) == set(before)
    async with PoolQueue(PostgresBackend(dsn, schema=pg_schema), clock=clock) as q:
        await _claims_keep_their_order(q, jobs, ids)
        await _lists_match_a_scan(q, await q.get_jobs(ids))
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            stats = await conn.fetchval(
                "SELECT count(*) FROM pg_statistic_ext WHERE stxname = 'jobs_type' "
                "AND stxnamespace = $1::regnamespace",
                f'"{pg_schema}"',
            )
        finally:
            await conn.close()
        assert stats == 1


@pytest.mark.parametrize(
    ("fixture", "steps"),
    [
        pytest.param(PG_VERSION_4, (3, 4), id="from-4"),  # the listing indexes, the version
        pytest.param(PG_VERSION_5, (5, 6, 4), id="from-5"),  # the cleanup index, ...
        pytest.param(PG_VERSION_6, (6, 4), id="from-6"),  # the collation, the version
    ],
)
async def test_a_crash_during_a_postgres_upgrade_leaves_it_as_it_was(
    pg_schema: str, fixture: Path, steps: tuple[int, ...]
) -> None:
    """An upgrade is one transaction: a process killed at any of the steps an upgrade
    from that version passes leaves the old store, which a later open upgrades."""
    want = json.loads((fixture / "expected.json").read_text())["postgres"]
    await _load_pg(pg_schema, fixture)
    old = await _pg_state(pg_schema)
    for step in steps:
        result = _crash("postgres", pg_schema, 0, step)
        assert result.returncode == -signal.SIGKILL, (step, result.stdout, result.stderr)
        assert await _pg_state(pg_schema) == old
    from jobpool_async.backends.postgres import PostgresBackend

    async with PoolQueue(PostgresBackend(postgres_dsn(), schema=pg_schema)) as q:
        _check_stored(await q.get_jobs([w["id"] for w in want["jobs"]]), want)
    assert (await _pg_state(pg_schema))[0] == 7


# --- SQLite store version 5 (before jobs.list_state) ------------------------------------------


def _index_sql(path: Path) -> dict[str, str]:
    return {name: sql for kind, name, sql in _sqlite_schema(path)[1] if kind == "index" and sql}


def _codes_match_statuses(path: Path) -> None:
    """Every job's ``list_state`` is its status's code (NULL while active)."""
    from jobpool_async.backends import sqlite as mod

    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT id, status, list_state FROM jobs").fetchall()
    finally:
        conn.close()
    assert rows
    for job_id, status, code in rows:
        assert code == mod._STATE_CODES.get(JobStatus(status)), (job_id, status, code)


async def _upgraded_twice(fixture: Path, path: Path) -> tuple[list[Job], list[str], FakeClock]:
    """Open the copy at ``path`` of the store in ``fixture`` twice (upgraded, then as it
    is): every job, counter and listing page as that version's code read them, every
    job's ``list_state`` its status's code, the indexes of version 7. Returns the jobs,
    their ids and the clock (2031) the queues ran on."""
    want = json.loads((fixture / "expected.json").read_text())["sqlite"]
    ids = [w["id"] for w in want["jobs"]]
    clock = FakeClock(datetime(2031, 1, 1, tzinfo=UTC))
    for _ in range(2):
        async with PoolQueue(SQLiteBackend(path), clock=clock) as q:
            jobs = await _stored_as_written(q, ids, want)
            assert len({j.status for j in jobs}) >= 6
            await _lists_match_a_scan(q, jobs)
        _codes_match_statuses(path)
    assert _sqlite_schema(path)[0] == SQLITE_VERSION == 7
    indexes = _index_sql(path)
    assert "(list_state, priority, created_at, id)" in indexes["jobs_list_prio"]
    assert "jobs_completed" not in indexes
    assert "WHERE finalized_at < created_at" in indexes["jobs_finalized_early"]
    return jobs, ids, clock


async def test_sqlite_store_of_version_5_is_upgraded_in_place(tmp_path: Path) -> None:
    """Version 5 → 6: every job gets its ``list_state`` (its status's code) and the
    indexes keyed by an expression over the status (``jobs_list_prio``,
    ``jobs_completed``) are made again over it. Every job, counter and listing page is
    kept (pages of any size, by every status and pair of statuses present); moves keep
    the codes in step, claims keep their order, and a purge of completed jobs finds them."""
    path = tmp_path / "v5.db"
    shutil.copy(VERSION_5 / "sqlite.db", path)
    assert _sqlite_schema(path)[0] == 5
    assert "list_state" not in _index_sql(path)["jobs_list_prio"]
    jobs, ids, clock = await _upgraded_twice(VERSION_5, path)
    async with PoolQueue(SQLiteBackend(path), clock=clock) as q:
        await _claims_keep_their_order(q, jobs, ids)
        _codes_match_statuses(path)
        completed = [j.id for j in jobs if j.status is JobStatus.COMPLETED]
        assert completed
        assert await q.backend.delete_completed_before(clock.now()) >= len(completed)
        assert await q.get_jobs(completed) == []


# --- SQLite store version 6 (every completed job in jobs_completed) -------------------------


async def test_sqlite_store_of_version_6_is_upgraded_in_place(tmp_path: Path) -> None:
    """Version 6 → 7: ``jobs_completed`` (every completed job by ``finalized_at``) gives
    way to ``jobs_finalized_early``. Every job, counter and listing page is kept, claims
    keep their order, and a purge finds the completed jobs written by version 6 code
    (through ``jobs_list_prio``): none before the first one's completion time, exactly
    those finalized by its cutoff after it."""
    path = tmp_path / "v6.db"
    shutil.copy(VERSION_6 / "sqlite.db", path)
    assert _sqlite_schema(path)[0] == 6 and "jobs_completed" in _index_sql(path)
    jobs, ids, clock = await _upgraded_twice(VERSION_6, path)
    completed = [j for j in jobs if j.status is JobStatus.COMPLETED]
    assert completed
    finalized = sorted(j.finalized_at for j in completed if j.finalized_at)
    async with PoolQueue(SQLiteBackend(path), clock=clock) as q:
        first = finalized[0] - timedelta(microseconds=1)
        assert await q.backend.delete_completed_before(first) == 0
        await _claims_keep_their_order(q, jobs, ids)  # completes more, in 2031
        assert await q.backend.delete_completed_before(finalized[-1]) == len(completed)
        assert await q.get_jobs([j.id for j in completed]) == []
        assert (await q.get_job_stats()).completed_jobs > 0  # those completed in 2031


# --- a crash during the upgrade -------------------------------------------------------------

CRASH_CHILD = """
import asyncio, os, random, signal, sys
from jobpool_async import PoolQueue
name, where, seed, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)

def die(*_args):
    os.kill(os.getpid(), signal.SIGKILL)

if name == "sqlite":
    from jobpool_async.backends import sqlite as mod
    from jobpool_async.backends.sqlite import SQLiteBackend as B
    left = [rng.randint(1, steps)]  # within the upgrade and the rest of the open
    def step():
        left[0] -= 1
        if left[0] == 0:
            die()
        return 0
    # SIGKILL after a random number of SQLite VM steps from the start of the upgrade
    mod._UPGRADE_HOOK = lambda conn: conn.set_progress_handler(step, 1)
    backend = B(where)
elif name == "leveldb":
    from jobpool_async.backends import leveldb as mod
    from jobpool_async.backends.leveldb import LevelDBBackend as B
    calls = [rng.randint(1, 41)]  # one of the 40 records of the rewrite, or after it
    def hook(*_args):
        calls[0] -= 1
        if calls[0] == 0:
            die()
    mod._UPGRADE_HOOK = hook
    backend = B(where)
else:
    from jobpool_async.backends.postgres import _schema as mod
    from jobpool_async.backends.postgres import PostgresBackend as B
    steps = steps if steps <= 5 else rng.randint(1, 5)  # a step named, or any
    async def hook(step):
        if step == steps:
            die()
    mod._UPGRADE_HOOK = hook
    backend = B(os.environ["JOBPOOL_TEST_POSTGRES_DSN"], schema=where)

async def main():
    async with PoolQueue(backend):
        pass

asyncio.run(main())
print("not killed")
"""


def _crash(name: str, where: str, seed: int, steps: int = 3000) -> subprocess.CompletedProcess[str]:
    """Open the store at ``where`` in a child killed at a random point of the upgrade
    (SQLite: within its first ``steps`` VM steps; from version 1 the upgrade and the
    rest of the open take about 3,200; PostgreSQL: at upgrade step ``steps`` if it is
    one of 1-5, else at a random one)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH_CHILD), name, where, str(seed), str(steps)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def _sqlite_schema(path: Path) -> tuple[int, list[Any]]:
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        objects = conn.execute(
            "SELECT type, name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()
    finally:
        conn.close()
    return version, objects


@pytest.mark.parametrize("name", NAMES)
async def test_a_crash_during_the_upgrade_leaves_the_old_store_or_the_new(
    name: str, tmp_path: Path
) -> None:
    schemas: list[str] = []
    old_sqlite = _sqlite_schema(PREVIOUS / "sqlite.db")
    try:
        for attempt in range(CRASHES):
            seed = random.randrange(2**32)
            where_dir = tmp_path / f"{attempt}"
            where_dir.mkdir()
            schema = new_schema_name() if name == "postgres" else ""
            if schema:
                schemas.append(schema)
            factory = await copy_store(name, where_dir, schema)
            where = schema or str(where_dir / ("old.db" if name == "sqlite" else "old.ldb"))
            result = _crash(name, where, seed)
            assert result.returncode == -signal.SIGKILL, (seed, result.stdout, result.stderr)
            if name == "sqlite":
                state = _sqlite_schema(Path(where))
                assert state == old_sqlite or state[0] == SQLITE_VERSION, f"a mix (seed {seed})"
            # Whatever the crash left opens, upgraded, with every job intact.
            want = expected(name)
            async with PoolQueue(factory()) as q:
                check_jobs(await q.get_jobs([w["id"] for w in want["jobs"]]), want)
                assert (await q.get_job_stats()).total_jobs == want["stats"]["total_jobs"]
    finally:
        for schema in schemas:
            await drop_postgres_schema(schema)


@pytest.mark.parametrize(
    "fixture",
    [VERSION_3, VERSION_4, VERSION_5, VERSION_6],
    ids=["version 3", "version 4", "version 5", "version 6"],
)
async def test_a_crash_during_a_sqlite_upgrade_from_version_3_to_6_leaves_old_or_new(
    fixture: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobpool_async.backends import sqlite as mod

    want = json.loads((fixture / "expected.json").read_text())["sqlite"]
    ids = [w["id"] for w in want["jobs"]]
    old = _sqlite_schema(fixture / "sqlite.db")
    # The new store, and how many SQLite VM steps the upgrade and the rest of the open take.
    clean = tmp_path / "clean.db"
    shutil.copy(fixture / "sqlite.db", clean)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    monkeypatch.setattr(mod, "_UPGRADE_HOOK", lambda conn: conn.set_progress_handler(count, 1))
    async with PoolQueue(SQLiteBackend(clean)):
        pass
    monkeypatch.setattr(mod, "_UPGRADE_HOOK", None)
    new = _sqlite_schema(clean)
    assert new[0] == SQLITE_VERSION and steps > 10
    for attempt in range(CRASHES):
        seed = random.randrange(2**32)
        path = tmp_path / f"{attempt}.db"
        shutil.copy(fixture / "sqlite.db", path)
        result = _crash("sqlite", str(path), seed, steps)
        assert result.returncode == -signal.SIGKILL, (seed, result.stdout, result.stderr)
        assert _sqlite_schema(path) in (old, new), f"a mix (seed {seed})"
        async with PoolQueue(SQLiteBackend(path)) as q:
            _check_stored(await q.get_jobs(ids), want)
            await q.enqueue_jobs([Job(id="after", job_type="t")])
        conn = sqlite3.connect(path)
        try:
            seqs = dict(conn.execute("SELECT id, seq FROM jobs").fetchall())
        finally:
            conn.close()
        order = {i: seq & mod._ORDER_MASK for i, seq in seqs.items()}  # enqueue order
        assert order["after"] > max(order[i] for i in ids), "enqueued after every stored job"
