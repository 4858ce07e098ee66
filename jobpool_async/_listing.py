"""Listing jobs a page at a time: :class:`JobPage`, the query backends serve, the cursor.

Pages are ordered newest first by ``created_at``, then by id (descending, by code
point). The cursor is the position after the last job of a page,
``(created_at, id)``, written as opaque URL-safe text; every backend serves a page
from an index in that order, so a page costs about the same however many jobs are
stored.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ._models import Job, JobStatus, check_tags

__all__ = ["MAX_LIMIT", "JobPage", "ListQuery", "decode_cursor", "encode_cursor"]

#: The largest page ``list_jobs`` serves.
MAX_LIMIT = 1000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


@dataclass(slots=True)
class JobPage:
    """One page of :meth:`~jobpool_async.PoolQueue.list_jobs`.

    ``next_after`` is the cursor of the next page (pass it as ``after``), or
    ``None`` when this is the last page.
    """

    jobs: list[Job]
    next_after: str | None = None


@dataclass(frozen=True, slots=True)
class ListQuery:
    """A validated ``list_jobs`` call as backends receive it.

    ``before`` is the ``(created_at, id)`` the page starts after (exclusive);
    ``limit`` is how many jobs to return at most (the queue asks for one more than
    the page size, to know whether a next page exists).
    """

    limit: int
    statuses: frozenset[JobStatus] = frozenset()
    tags: tuple[str, ...] = ()
    job_type: str | None = None
    before: tuple[datetime, str] | None = field(default=None)

    def matches(self, job: Job) -> bool:
        """Whether ``job`` passes every filter and comes after the cursor."""
        if self.statuses and job.status not in self.statuses:
            return False
        if self.job_type is not None and job.job_type != self.job_type:
            return False
        if self.tags and not set(self.tags).issubset(job.tags):
            return False
        return self.before is None or (job.created_at, job.id) < self.before

    @classmethod
    def build(
        cls,
        *,
        statuses: Iterable[JobStatus | str] | None,
        tags: Iterable[str] | None,
        job_type: str | None,
        limit: int,
        after: str | None,
    ) -> ListQuery:
        """Check ``list_jobs`` arguments (``ValueError``/``TypeError`` naming the bad one)."""
        wanted: set[JobStatus] = set()
        if statuses is not None:
            if isinstance(statuses, str):
                statuses = [statuses]
            for s in statuses:
                try:
                    wanted.add(JobStatus(s))
                except ValueError:
                    raise ValueError(f"unknown job status in statuses: {s!r}") from None
        if job_type is not None and not isinstance(job_type, str):
            raise TypeError(f"job_type must be str or None, got {type(job_type).__name__}")
        if job_type is not None and "\x00" in job_type:
            raise ValueError("job_type must not contain NUL")
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be int, got {type(limit).__name__}")
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
        return cls(
            limit=limit,
            statuses=frozenset(wanted),
            tags=tuple(check_tags(tags)),
            job_type=job_type,
            before=decode_cursor(after) if after is not None else None,
        )


def encode_cursor(job: Job) -> str:
    """The cursor that starts a page right after ``job``."""
    micros = (job.created_at - _EPOCH) // _US
    raw = json.dumps([micros, job.id], ensure_ascii=True).encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """``(created_at, id)`` of a cursor from :func:`encode_cursor`; else ``ValueError``."""
    if not isinstance(cursor, str):
        raise TypeError(f"after must be a cursor string or None, got {type(cursor).__name__}")
    bad = ValueError(f"after is not a cursor returned by list_jobs: {cursor[:80]!r}")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        micros, job_id = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        raise bad from None
    if (
        isinstance(micros, bool)
        or not isinstance(micros, int)
        or not isinstance(job_id, str)
        or not job_id
    ):
        raise bad
    try:
        return _EPOCH + timedelta(microseconds=micros), job_id
    except OverflowError:
        raise bad from None
