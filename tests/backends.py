"""Backend factories for the test suites: one place that knows how to build each backend.

The conformance suite runs once per name in :data:`BACKENDS`. PostgreSQL runs when
``JOBPOOL_TEST_POSTGRES_DSN`` is set (``.ci/run`` sets it) and is skipped with that
reason otherwise; each PostgreSQL test gets a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from jobpool_async import Backend, MemoryBackend

BACKENDS = ["memory", "sqlite", "leveldb", "postgres"]
POSTGRES_DSN_ENV = "JOBPOOL_TEST_POSTGRES_DSN"

BackendFactory = Callable[[], Backend]


def postgres_dsn() -> str:
    dsn = os.environ.get(POSTGRES_DSN_ENV, "")
    if not dsn:
        pytest.skip(
            f"no PostgreSQL server configured: set {POSTGRES_DSN_ENV} "
            "(e.g. postgresql://postgres@127.0.0.1:5432/test) to run the PostgreSQL tests"
        )
    return dsn


def new_schema_name() -> str:
    return f"jp_test_{uuid.uuid4().hex[:12]}"


def backend_factory(name: str, tmp_path: Path, schema: str | None = None) -> BackendFactory:
    """A factory making backends that all open the same store (for reopen tests)."""
    if name == "memory":
        shared = MemoryBackend()
        return lambda: shared
    if name == "sqlite":
        from jobpool_async.backends.sqlite import SQLiteBackend

        path = tmp_path / "jobs.db"
        return lambda: SQLiteBackend(path)
    if name == "leveldb":
        from jobpool_async.backends.leveldb import LevelDBBackend

        path = tmp_path / "jobs.ldb"
        return lambda: LevelDBBackend(path)
    if name == "postgres":
        from jobpool_async.backends.postgres import PostgresBackend

        dsn = postgres_dsn()
        schema_name = schema or new_schema_name()
        return lambda: PostgresBackend(dsn, schema=schema_name)
    raise ValueError(f"unknown backend {name!r}")


async def drop_postgres_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(postgres_dsn())
    try:
        quoted = '"' + schema.replace('"', '""') + '"'
        await conn.execute(f"DROP SCHEMA IF EXISTS {quoted} CASCADE")
    finally:
        await conn.close()
