"""Stores written by the code before ``list_jobs`` are upgraded in place on open.

The previous code is the package as of :data:`PREVIOUS` (taken from git), run in a
subprocess to write a store; this code then opens it and lists it. Listing alone
changed no store version on SQLite and PostgreSQL, but schedules and priorities
(SPEC §8) did, on every backend: so the previous code now refuses the upgraded store
(naming both versions), as it refuses a LevelDB store of format 2 or later.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from jobpool_async import Backend, JobStatus, PoolQueue
from jobpool_async.backends.leveldb import LevelDBBackend
from jobpool_async.backends.sqlite import SQLiteBackend

from .backends import drop_postgres_schema, new_schema_name, postgres_dsn

#: The last commit on main before list_jobs: its code writes the "previous" stores.
PREVIOUS = "9177464ebb953dc4ebf15d9d184a599c2890bd00"
ROOT = Path(__file__).resolve().parents[1]

WRITE = """
import asyncio, sys
from datetime import UTC, datetime, timedelta
from jobpool_async import Job, PoolQueue, open_backend

async def main(url, prefix, schema):
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    backend = open_backend(url, schema=schema) if schema else open_backend(url)
    async with PoolQueue(backend) as q:
        await q.enqueue_jobs([
            Job(id=f"{prefix}{i}", job_type=f"type{i % 2}", tags=[f"g{i % 3}", "all"],
                created_at=t0 + timedelta(seconds=i % 5))
            for i in range(30)
        ])
        async with q.stream_jobs("w", tags=["g0"], max_assigned_jobs=100) as s:
            batch = await s.__anext__()
        await q.complete_jobs({j.id: b"ok" for j in batch})
    print("written")

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""


def _git_available() -> bool:
    if shutil.which("git") is None:
        return False
    probe = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS}^{{commit}}"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    """A directory holding the previous code's ``jobpool_async`` package."""
    if not _git_available():
        pytest.skip(f"needs git and this repository's history (commit {PREVIOUS[:10]})")
    out = tmp_path / "previous"
    out.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", PREVIOUS, "jobpool_async"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def run_previous(
    previous: Path, url: str, prefix: str, schema: str = ""
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(previous)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WRITE), url, prefix, schema],
        capture_output=True,
        text=True,
        env=env,
        cwd=previous,
        timeout=60,
    )


async def _check_listing(queue: PoolQueue, prefixes: str) -> None:
    expected = sorted(((i % 5, f"{p}{i}") for p in prefixes for i in range(30)), reverse=True)
    ids: list[str] = []
    after = None
    while True:
        page = await queue.list_jobs(limit=7, after=after)
        ids += [j.id for j in page.jobs]
        if page.next_after is None:
            break
        after = page.next_after
    assert ids == [i for _, i in expected]
    for tag, n in (("g0", 10), ("all", 30)):
        page = await queue.list_jobs(tags=[tag], limit=100)
        assert len(page.jobs) == n * len(prefixes)
        assert [(j.created_at, j.id) for j in page.jobs] == sorted(
            ((j.created_at, j.id) for j in page.jobs), reverse=True
        )
    done = await queue.list_jobs(statuses=[JobStatus.COMPLETED], limit=100)
    assert len(done.jobs) == 10 * len(prefixes)
    typed = await queue.list_jobs(job_type="type1", limit=100)
    assert len(typed.jobs) == 15 * len(prefixes)


async def _both_ways(previous: Path, url: str, schema: str, ours: Callable[[], Backend]) -> None:
    """Previous code writes, we list; then the previous code refuses the upgraded store
    and leaves it alone."""
    first = run_previous(previous, url, "a", schema)
    assert first.returncode == 0, first.stderr
    async with PoolQueue(ours()) as queue:
        await _check_listing(queue, "a")
    refused = run_previous(previous, url, "b", schema)
    assert refused.returncode != 0
    assert "StorageError" in refused.stderr and "version" in refused.stderr
    async with PoolQueue(ours()) as queue:
        await _check_listing(queue, "a")


async def test_sqlite_store_of_the_previous_code(previous: Path, tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    await _both_ways(previous, f"sqlite:///{path}", "", lambda: SQLiteBackend(path))


async def test_leveldb_store_of_the_previous_code(previous: Path, tmp_path: Path) -> None:
    path = tmp_path / "old.ldb"
    url = f"leveldb:///{path}"
    first = run_previous(previous, url, "a")
    assert first.returncode == 0, first.stderr
    async with PoolQueue(LevelDBBackend(path)) as queue:
        await _check_listing(queue, "a")
        await queue.enqueue_jobs([])  # still writable
    async with PoolQueue(LevelDBBackend(path)) as queue:  # reopened: format 2 as is
        await _check_listing(queue, "a")
    refused = run_previous(previous, url, "b")
    assert refused.returncode != 0
    assert "newer" in refused.stderr and "StorageError" in refused.stderr


async def test_leveldb_upgrade_cut_short_is_redone(
    previous: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobpool_async.backends import _leveldb_codec, leveldb

    path = tmp_path / "old.ldb"
    assert run_previous(previous, f"leveldb:///{path}", "a").returncode == 0
    monkeypatch.setattr(leveldb, "_UPGRADE_BATCH", 4)
    calls = 0
    real = _leveldb_codec.encode_meta

    def crash_before_mark(*args: object) -> bytes:
        nonlocal calls
        calls += 1
        raise OSError("power cut")

    monkeypatch.setattr(_leveldb_codec, "encode_meta", crash_before_mark)
    with pytest.raises(OSError, match="power cut"):
        async with PoolQueue(LevelDBBackend(path)) as queue:
            await queue.open()
    assert calls == 1
    monkeypatch.setattr(_leveldb_codec, "encode_meta", real)
    async with PoolQueue(LevelDBBackend(path)) as queue:
        await _check_listing(queue, "a")


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    postgres_dsn()
    schema = new_schema_name()
    yield schema
    await drop_postgres_schema(schema)


async def test_postgres_store_of_the_previous_code(previous: Path, pg_schema: str) -> None:
    from jobpool_async.backends.postgres import PostgresBackend

    dsn = postgres_dsn()
    await _both_ways(previous, dsn, pg_schema, lambda: PostgresBackend(dsn, schema=pg_schema))
