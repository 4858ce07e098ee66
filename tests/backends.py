"""Backend factories for the test suites, on top of :mod:`jobpool_async.backends.registry`.

The conformance suite runs once per name in :data:`BACKENDS`. PostgreSQL runs when
``JOBPOOL_TEST_POSTGRES_DSN`` is set (``.ci/run`` sets it) and is skipped with that
reason otherwise; each PostgreSQL test gets a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pytest

from jobpool_async import Backend, Job, JobStatus
from jobpool_async.backends import registry
from jobpool_async.backends.base import (
    ApplyOutcome,
    Change,
    JobState,
    Listener,
    Refill,
    Selection,
    SelectOutcome,
    Transition,
)
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


class DelegatingBackend(Backend):
    """Passes every storage call to a real backend, calling ``_call(name)`` first: the
    base of test wrappers that fail or count calls (leases are not passed on, so a
    queue on it runs without them)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.default_poll_interval = inner.default_poll_interval  # type: ignore[misc]

    def _call(self, name: str) -> None:
        """Called before each storage call is passed on (``name``: the method)."""

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    def set_listener(self, listener: Listener | None) -> None:
        self.inner.set_listener(listener)

    async def insert(self, jobs: Sequence[Job]) -> None:
        self._call("insert")
        await self.inner.insert(jobs)

    async def insert_new(self, jobs: Sequence[Job]) -> list[str]:
        self._call("insert_new")
        return await self.inner.insert_new(jobs)

    def next_due(self) -> datetime | None:
        return self.inner.next_due()

    async def claim(
        self, assignee_id: str, tags: Sequence[str], limit: int, now: datetime
    ) -> list[Job]:
        self._call("claim")
        return await self.inner.claim(assignee_id, tags, limit, now)

    async def apply(
        self, changes: Sequence[Change], now: datetime, refill: Refill | None = None
    ) -> ApplyOutcome:
        self._call("apply")
        return await self.inner.apply(changes, now, refill)

    async def apply_selected(
        self,
        transition: Transition,
        selection: Selection,
        now: datetime,
        *,
        report_unmatched: bool = False,
        scheduled_at: datetime | None = None,
    ) -> SelectOutcome:
        self._call("apply_selected")
        return await self.inner.apply_selected(
            transition, selection, now, report_unmatched=report_unmatched, scheduled_at=scheduled_at
        )

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        self._call("get_jobs")
        return await self.inner.get_jobs(job_ids)

    async def job_states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        self._call("job_states")
        return await self.inner.job_states(job_ids)

    async def count_by_status(self, tags: Sequence[str]) -> tuple[dict[JobStatus, int], int]:
        self._call("count_by_status")
        return await self.inner.count_by_status(tags)

    async def delete(self, selection: Selection) -> int:
        self._call("delete")
        return await self.inner.delete(selection)

    async def delete_completed_before(self, cutoff: datetime) -> int:
        self._call("delete_completed_before")
        return await self.inner.delete_completed_before(cutoff)
