from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobpool_async import Backend, PoolQueue

from .backends import (
    BACKENDS,
    BackendFactory,
    backend_factory,
    drop_postgres_schema,
    new_schema_name,
    postgres_dsn,
)


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_backend(backend_name: str, tmp_path: Path) -> AsyncIterator[BackendFactory]:
    """Builds backends on one store; a second call reopens the same store."""
    schema = new_schema_name() if backend_name == "postgres" else None
    yield backend_factory(backend_name, tmp_path, schema)
    if schema is not None:
        await drop_postgres_schema(schema)


@pytest.fixture
async def queue(make_backend: BackendFactory) -> AsyncIterator[PoolQueue]:
    backend: Backend = make_backend()
    q = PoolQueue(backend)
    await q.open()
    try:
        yield q
    finally:
        await q.close()


@pytest.fixture
def dsn() -> str:
    """The PostgreSQL test server (the test is skipped, saying why, without one)."""
    return postgres_dsn()


@pytest.fixture
async def schema(dsn: str) -> AsyncIterator[str]:
    """A schema of the test's own on that server, dropped afterwards."""
    name = new_schema_name()
    yield name
    await drop_postgres_schema(name)
