"""``Job.copy`` builds positionally (a hot path): every field must survive it."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from jobpool_async import Job, JobStatus
from jobpool_async.backends.base import check_new_job


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


def test_an_enqueue_check_copies_every_field_of_a_new_job() -> None:
    """``check_new_job``'s fast path builds its copy from the fields it read: every
    field a new job may carry survives it (a field added to ``Job`` and left out of
    it fails here: unset on the copy)."""
    t = datetime(2030, 1, 1, tzinfo=UTC)
    job = Job(
        id="i",
        job_type="t",
        job_definition=b"d",
        tags=["a", "b"],
        created_at=t,
        error_message="e",
        assignee_id="w",
        scheduled_at=t + timedelta(seconds=6),
        priority=7,
        max_attempts=8,
    )
    copy = check_new_job(job)
    assert copy is not job and copy.tags is not job.tags
    assert dataclasses.asdict(copy) == dataclasses.asdict(job)
    plain = Job(id="p", job_type="t")
    assert dataclasses.asdict(check_new_job(plain)) == dataclasses.asdict(plain)


def test_an_enqueue_check_of_a_job_type_seen_before_still_checks_a_new_one() -> None:
    """The fast path remembers the last job type it accepted (a batch's jobs share
    one: the same ``str`` needs no second check); any other value is checked."""
    ok = "type-a"
    assert check_new_job(Job(id="a", job_type=ok)).job_type is ok
    assert check_new_job(Job(id="b", job_type=ok)).job_type is ok
    with pytest.raises(ValueError):
        check_new_job(Job(id="c", job_type="type-a\x00"))
    with pytest.raises(TypeError):
        check_new_job(Job(id="d", job_type=b"type-a"))  # type: ignore[arg-type]
    assert check_new_job(Job(id="e", job_type="typé")).job_type == "typé"  # (full checks)
    assert check_new_job(Job(id="f", job_type=ok)).job_type is ok
