"""The one exception hierarchy: every error about jobs, the queue or storage derives
from :class:`JobPoolError`.

Bad arguments are not in it: a value of the wrong type raises ``TypeError`` and a
wrong value raises ``ValueError``, as Python's own functions do, before anything
is written and naming what was wrong (a caller's bug, not a state of the queue).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._models import JobStatus

__all__ = [
    "BatchError",
    "DuplicateJobError",
    "InvalidTransitionError",
    "JobNotFoundError",
    "JobPoolError",
    "JobsNotFinalError",
    "QueueClosedError",
    "StorageError",
]


class JobPoolError(Exception):
    """Base class of every error jobpool_async raises on purpose."""


class JobNotFoundError(JobPoolError, LookupError):
    """No job has this id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


class DuplicateJobError(JobPoolError):
    """A job with this id already exists (or appears twice in one batch)."""

    def __init__(self, job_id: str, message: str | None = None) -> None:
        super().__init__(message or f"job {job_id!r} already exists")
        self.job_id = job_id


class InvalidTransitionError(JobPoolError):
    """The job's current status does not allow the requested move."""

    def __init__(self, job_id: str, current: JobStatus, target: JobStatus | None) -> None:
        what = f"to {target.name}" if target is not None else "by this operation"
        super().__init__(f"job {job_id!r} cannot move from {current.name} {what}")
        self.job_id = job_id
        self.current = current
        self.target = target


class JobsNotFinalError(JobPoolError):
    """Some selected jobs are not in a final status, so nothing was deleted."""

    def __init__(self, job_ids: Sequence[str]) -> None:
        self.job_ids = list(job_ids)
        shown = ", ".join(repr(i) for i in self.job_ids[:10])
        more = f" and {len(self.job_ids) - 10} more" if len(self.job_ids) > 10 else ""
        super().__init__(f"jobs not in a final status: {shown}{more}")


class BatchError(JobPoolError):
    """Some jobs of a batch call could not be moved; the others' moves were kept."""

    def __init__(self, errors: Mapping[str, JobPoolError]) -> None:
        self.errors: dict[str, JobPoolError] = dict(errors)
        first = next(iter(self.errors.values()), None)
        super().__init__(f"{len(self.errors)} job(s) of the batch failed; first: {first}")


class QueueClosedError(JobPoolError):
    """The queue (or the stream) is closed."""


class StorageError(JobPoolError):
    """The storage failed, is locked by another process, or is not a jobpool store."""
