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


class _Str(str):
    pass


class _Int(int):
    pass


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("priority", False, TypeError),
        ("retry_count", False, TypeError),
        ("attempts", False, TypeError),
        ("retry_count", -1, ValueError),
        ("attempts", 1, ValueError),
        ("priority", 40_000, ValueError),
        ("error_message", "bad\x00", ValueError),
        ("assignee_id", "bad\x00", ValueError),
    ],
)
def test_an_enqueue_check_of_a_value_equal_to_a_default_is_not_the_default(
    field: str, value: object, error: type[Exception]
) -> None:
    """The fast path takes the defaults by identity (the int ``0``, the ``""``);
    a value that only equals one (``False``), or any other, gets the full checks."""
    job = Job(id="i", job_type="t")
    setattr(job, field, value)
    with pytest.raises(error):
        check_new_job(job)


def test_an_enqueue_check_of_zero_and_empty_values_not_the_defaults() -> None:
    """Values that equal the defaults without being those objects (subclasses) pass
    the full checks and are stored as given; computed ``0`` and ``""`` pass too."""
    job = Job(id="i", job_type="t", priority=_Int(0), error_message=_Str(""))
    copy = check_new_job(job)
    assert copy.priority == 0 and copy.error_message == ""
    zero, empty = int("0"), "ab"[:0]
    copy = check_new_job(Job(id="j", job_type="t", priority=zero, assignee_id=empty))
    assert copy.priority == 0 and copy.assignee_id == "" and copy.tags == []
    tagged = Job(id="k", job_type="t", tags=["x"])
    copy = check_new_job(tagged)
    assert copy.tags == ["x"] and copy.tags is not tagged.tags
