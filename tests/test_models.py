"""``Job.copy`` builds positionally (a hot path): every field must survive it."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from jobpool_async import Job, JobStatus


def test_copy_keeps_every_field() -> None:
    t = datetime(2030, 1, 1, tzinfo=UTC)
    values = {
        "id": "i",
        "job_type": "t",
        "job_definition": b"d",
        "tags": ["a", "b"],
        "status": JobStatus.RUNNING,
        "created_at": t,
        "started_at": t + timedelta(seconds=1),
        "finalized_at": t + timedelta(seconds=2),
        "error_message": "e",
        "result": b"r",
        "retry_count": 3,
        "last_retry_at": t + timedelta(seconds=4),
        "assignee_id": "w",
        "assigned_at": t + timedelta(seconds=5),
        "scheduled_at": t + timedelta(seconds=6),
        "priority": 7,
        "max_attempts": 8,
        "attempts": 9,
    }
    assert list(values) == [f.name for f in dataclasses.fields(Job)], "a field was added"
    job = Job(**values)  # type: ignore[arg-type]
    copy = job.copy()
    assert dataclasses.asdict(copy) == values
    assert copy.tags is not job.tags
