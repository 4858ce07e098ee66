"""Backend factories for the test suites, on top of :mod:`jobpool_async.backends.registry`.

The conformance suite runs once per name in :data:`BACKENDS`. PostgreSQL runs when
``JOBPOOL_TEST_POSTGRES_DSN`` is set (``.ci/run`` sets it) and is skipped with that
reason otherwise; each PostgreSQL test gets a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from jobpool_async.backends import registry
from jobpool_async.testing import BackendFactory as BackendFactory

BACKENDS = list(registry.BACKEND_NAMES)
POSTGRES_DSN_ENV = "JOBPOOL_TEST_POSTGRES_DSN"


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
    info = registry.backend_info(name)
    dsn = postgres_dsn() if info.needs_server else None
    store = registry.temporary_store(name, tmp_path, postgres_dsn=dsn, schema=schema)
    return store.new_backend


async def drop_postgres_schema(schema: str) -> None:
    await registry.drop_postgres_schema(postgres_dsn(), schema)
