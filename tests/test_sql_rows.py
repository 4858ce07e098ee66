"""The SQL backends read rows into jobs by column name (``backends/_sql.py``).

Every field of a job read back by a claim, by a refill made in an apply, and by a
plain read holds its own value: the values below are distinct wherever two fields
share a type, so a column read for the wrong field shows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jobpool_async import Job, JobStatus
from jobpool_async.backends._sql import (
    ABSENT,
    CLAIMED,
    CLAIMED_COLUMNS,
    CLAIMED_FIELDS,
    JOB,
    JOB_COLUMNS,
    JOB_FIELDS,
    JobColumns,
)
from jobpool_async.backends.base import COMPLETE, Backend, Change, Refill

from .backends import backend_factory, drop_postgres_schema, new_schema_name

T = datetime(2024, 3, 1, 12, 0, 0, 1, tzinfo=UTC)


def test_positions_follow_the_names_of_a_select_list() -> None:
    reordered = tuple(reversed(JOB_FIELDS))
    c = JobColumns.of(reordered, start=3)
    assert c.id == 3 + reordered.index("id")
    assert c.attempts == 3
    row = (None, None, None, *reordered)  # each column holds its own name
    assert all(row[getattr(c, name)] == name for name in JOB_FIELDS)
    assert [JOB_FIELDS[getattr(JOB, name)] for name in JOB_FIELDS] == list(JOB_FIELDS)
    assert JOB_COLUMNS.split(", ") == list(JOB_FIELDS)
    assert CLAIMED_COLUMNS.split(", ") == list(CLAIMED_FIELDS)


def test_a_field_the_row_lacks_cannot_be_read_as_another_column() -> None:
    assert CLAIMED.status == CLAIMED.assignee_id == CLAIMED.assigned_at == ABSENT
    row = tuple(CLAIMED_FIELDS)
    with pytest.raises(IndexError):
        row[CLAIMED.status]


@pytest.mark.parametrize(
    "fields",
    [("id", "nonsense"), ("id", "id"), ("id", "job_type", "job_type")],
)
def test_positions_refuse_unknown_or_repeated_names(fields: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="distinct Job fields"):
        JobColumns.of(fields)


def _job(n: int) -> Job:
    """A claimable job whose fields of one type all differ (and differ per ``n``)."""
    us = timedelta(microseconds=1)
    return Job(
        id=f"job-{n}",
        job_type=f"type-{n}",
        job_definition=f"def-{n}".encode(),
        tags=[f"tag-{n}"],
        status=JobStatus.INITIAL_PENDING,
        created_at=T + 1 * us + n * 100 * us,
        started_at=T + 2 * us + n * 100 * us,
        finalized_at=T + 3 * us + n * 100 * us,
        error_message=f"error-{n}",
        result=f"result-{n}".encode(),
        retry_count=4 + n,
        last_retry_at=T + 5 * us + n * 100 * us,
        assignee_id=f"old-{n}",
        assigned_at=T + 6 * us + n * 100 * us,
        scheduled_at=T + 7 * us + n * 100 * us,
        priority=8 - n,
        max_attempts=9 + n,
        attempts=0,
    )


def _claimed_as(job: Job, assignee: str, now: datetime) -> Job:
    """``job`` as a claim at ``now`` hands it out."""
    fields = {f: getattr(job, f) for f in JOB_FIELDS}
    fields.update(
        status=JobStatus.RUNNING, assignee_id=assignee, assigned_at=now, attempts=job.attempts + 1
    )
    return Job(**fields)


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    schema = new_schema_name() if request.param == "postgres" else None
    b = backend_factory(request.param, tmp_path, schema)()
    await b.open()
    try:
        yield b
    finally:
        await b.close()
        if schema is not None:
            await drop_postgres_schema(schema)


async def test_claims_refills_and_reads_put_every_column_in_its_field(backend: Backend) -> None:
    jobs = [_job(0), _job(1)]
    await backend.insert(jobs)
    assert await backend.get_jobs([j.id for j in jobs]) == jobs
    now = T + timedelta(days=1)

    (first,) = await backend.claim("w", [], 1, now)
    assert first == _claimed_as(jobs[0], "w", now), "priority 8 is claimed first"

    refill = Refill("w", (), frozenset({first.id}))
    out = await backend.apply([Change(first.id, COMPLETE, result=b"ok")], now, refill)
    assert [m.job_id for m in out.moved] == [first.id] and not out.errors
    assert out.claimed == [_claimed_as(jobs[1], "w", now)]
    assert await backend.get_jobs([jobs[1].id]) == out.claimed
