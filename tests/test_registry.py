"""The backend registry: one list of backends, URL options, temporary stores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from jobpool_async import Job, JobStatus, PoolQueue, open_backend
from jobpool_async.backends import registry
from jobpool_async.backends.memory import MemoryBackend
from jobpool_async.backends.sqlite import SQLiteBackend
from jobpool_async.pytest_plugin import BACKEND_NAMES as PLUGIN_NAMES

from .backends import BACKENDS, postgres_dsn

needs_asyncpg = pytest.mark.skipif(
    __import__("importlib").util.find_spec("asyncpg") is None,
    reason="the PostgreSQL backend needs asyncpg",
)


def test_one_list_of_backend_names() -> None:
    assert registry.BACKEND_NAMES == ("memory", "sqlite", "leveldb", "postgres")
    assert tuple(BACKENDS) == registry.BACKEND_NAMES
    assert PLUGIN_NAMES == registry.BACKEND_NAMES
    from benchmarks._targets import BACKEND_NAMES as BENCH_NAMES

    assert BENCH_NAMES == registry.BACKEND_NAMES
    with pytest.raises(ValueError, match="unknown backend 'mysql'; choose one of memory, sqlite"):
        registry.backend_info("mysql")


def test_sqlite_url_options_are_converted(tmp_path: Path) -> None:
    backend = open_backend(f"sqlite:///{tmp_path}/jobs.db?synchronous=full&busy_timeout=2.5")
    assert isinstance(backend, SQLiteBackend)
    assert backend.path == tmp_path / "jobs.db"  # not "jobs.db?synchronous=full&..."
    assert backend.synchronous == "FULL"
    assert backend._busy_timeout == 2.5
    assert list(tmp_path.iterdir()) == []  # built, not opened


async def test_a_url_option_reaches_the_open_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/jobs.db?synchronous=FULL"
    async with PoolQueue(open_backend(url)) as queue:
        await queue.enqueue_job(Job(id="a", job_type="t"))
        db = queue.backend._db  # type: ignore[attr-defined]
        async with db.execute("PRAGMA synchronous") as cursor:
            (level,) = await cursor.fetchone()
        assert level == 2  # FULL
    async with PoolQueue(open_backend(f"sqlite:///{tmp_path}/jobs.db")) as queue:
        assert (await queue.get_job("a")).status is JobStatus.INITIAL_PENDING


def test_leveldb_and_quoted_paths(tmp_path: Path) -> None:
    backend = open_backend(f"leveldb:///{tmp_path}/a.ldb?sync=true")
    assert repr(backend) == f"LevelDBBackend('{tmp_path}/a.ldb', sync=True)"
    assert repr(open_backend(f"leveldb:///{tmp_path}/b.ldb?sync=off")).endswith("sync=False)")
    weird = open_backend(f"sqlite:///{tmp_path}/a%3Fb%23c.db")
    assert isinstance(weird, SQLiteBackend) and weird.path.name == "a?b#c.db"


@needs_asyncpg
def test_postgres_url_options_and_connection_parameters() -> None:
    backend: Any = open_backend(
        "postgresql://u@h/db?sslmode=disable&schema=app_jobs&pool_max_size=3"
        "&command_timeout=2.5&self_vacuum=none&application_name=x"
    )
    assert backend.schema == "app_jobs"
    assert (backend._pool_max, backend._command_timeout, backend._self_vacuum) == (3, 2.5, None)
    assert backend._dsn == "postgresql://u@h/db?sslmode=disable&application_name=x"
    assert open_backend("postgres://u@h/db?self_vacuum=yes")._self_vacuum is True  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "sqlite:///{d}/x.db?synchronus=FULL",
            "unknown option 'synchronus'.*busy_timeout, synchronous",
        ),
        ("sqlite:///{d}/x.db?busy_timeout=soon", "busy_timeout='soon': expected a number"),
        ("sqlite:///{d}/x.db?synchronous=ALWAYS", "synchronous must be 'NORMAL' or 'FULL'"),
        ("sqlite:///{d}/x.db?synchronous=FULL&synchronous=NORMAL", "'synchronous' is given twice"),
        ("sqlite:///{d}/x#.db", "'#'"),
        ("sqlite://host/x.db", "three slashes"),
        ("sqlite:///", "no path"),
        ("leveldb:///{d}/x.ldb?sync=maybe", "sync='maybe': expected true or false"),
        ("leveldb:///{d}/x.ldb?compression=snappy", "unknown option 'compression'.*accepts: sync"),
        ("memory://?size=3", "unknown option 'size'.*memory backend accepts: no options"),
        ("memory://somewhere", "takes no path"),
        ("redis://h/0", "unknown backend URL scheme 'redis'"),
    ],
)
def test_bad_urls_are_clear_value_errors_before_anything_is_made(
    tmp_path: Path, url: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        open_backend(url.format(d=tmp_path))
    assert list(tmp_path.iterdir()) == []


@needs_asyncpg
def test_bad_postgres_options() -> None:
    with pytest.raises(ValueError, match=r"unknown option 'shema'.*schema.*sslmode"):
        open_backend("postgresql://u@h/db?shema=x")
    with pytest.raises(ValueError, match="pool_max_size='many': expected an integer"):
        open_backend("postgresql://u@h/db?pool_max_size=many")
    with pytest.raises(ValueError, match=r"given twice \(in the URL and as a keyword"):
        open_backend("postgresql://u@h/db?schema=a", schema="b")


def test_keyword_options_are_checked_by_name(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="no option 'synchronus'; it accepts: busy_timeout"):
        open_backend(f"sqlite:///{tmp_path}/x.db", synchronus="FULL")
    with pytest.raises(TypeError, match="memory backend has no option 'x'; it accepts: none"):
        open_backend("memory://", x=1)
    with pytest.raises(TypeError, match="url must be str"):
        open_backend(Path("x.db"))  # type: ignore[arg-type]
    assert isinstance(open_backend("MEMORY://"), MemoryBackend)


def _entries(path: Path) -> list[Path]:
    return list(path.iterdir())


@pytest.mark.parametrize("name", BACKENDS)
async def test_temporary_stores_reopen_and_are_removed(name: str, tmp_path: Path) -> None:
    info = registry.backend_info(name)
    dsn = postgres_dsn() if info.needs_server else None
    store = registry.temporary_store(name, tmp_path, postgres_dsn=dsn)
    try:
        async with PoolQueue(store.new_backend()) as queue:
            await queue.enqueue_job(Job(id="kept", job_type="t"))
        again = store.new_backend() if name == "memory" else open_backend(store.url)
        async with PoolQueue(again) as queue:
            assert (await queue.get_job("kept")).id == "kept"
    finally:
        await store.remove()
    if info.location == "path":
        assert _entries(tmp_path) == []
    if store.schema is not None:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            found = await conn.fetchval(
                "SELECT count(*) FROM pg_namespace WHERE nspname = $1", store.schema
            )
        finally:
            await conn.close()
        assert found == 0


def test_a_server_store_needs_a_dsn(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a server: pass postgres_dsn"):
        registry.temporary_store("postgres", tmp_path)


class Fake(MemoryBackend):
    """A third-party backend: a path and two typed options."""

    def __init__(
        self, path: str | os.PathLike[str], *, level: int = 1, fast: bool | None = None
    ) -> None:
        super().__init__()
        self.path, self.level, self.fast = path, level, fast


def test_a_new_backend_needs_only_its_registry_entry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    entry = registry.BackendInfo("fake", ("fake",), f"{__name__}:Fake", "path", ".fk")
    monkeypatch.setattr(registry, "BACKENDS", (*registry.BACKENDS, entry))
    backend = open_backend("fake:///x.fk?level=3&fast=no")
    assert isinstance(backend, Fake)
    assert (backend.path, backend.level, backend.fast) == ("x.fk", 3, False)
    with pytest.raises(ValueError, match=r"unknown option 'slow'.*accepts: fast, level"):
        open_backend("fake:///x.fk?slow=1")
    with pytest.raises(ValueError, match=r"memory://, sqlite:///path, .* or fake:///path"):
        open_backend("nope://x")
    from benchmarks._targets import find_targets

    (target,) = find_targets(["fake"], None)
    assert not target.available and "no raw storage floor" in target.reason
    store = registry.temporary_store("fake", tmp_path)
    assert store.url == f"fake:///{tmp_path}/jobs.fk"
    made = store.new_backend()
    assert isinstance(made, Fake) and made.path == tmp_path / "jobs.fk"
