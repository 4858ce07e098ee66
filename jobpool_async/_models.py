"""The data model: :class:`Job`, :class:`JobStatus`, :class:`JobStats`, :class:`CancelResult`.

Also the validation of values coming from users, so every entry point rejects bad
input the same way, before anything is written.
"""

from __future__ import annotations

import enum
import functools
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

__all__ = [
    "ACTIVE",
    "ELIGIBLE",
    "FINAL",
    "CancelResult",
    "Job",
    "JobStats",
    "JobStatus",
    "utcnow",
]


class JobStatus(enum.StrEnum):
    """Where a job is in its life. See the state diagram in the README."""

    INITIAL_PENDING = "initial_pending"
    RUNNING = "running"
    CANCELLING = "cancelling"
    FAILED_RETRY = "failed_retry"
    UNKNOWN_RETRY = "unknown_retry"
    COMPLETED = "completed"
    STOPPED = "stopped"
    UNSCHEDULED = "unscheduled"
    UNKNOWN_STOPPED = "unknown_stopped"
    DISCARDED = "discarded"

    @property
    def is_final(self) -> bool:
        return self in FINAL

    @property
    def is_eligible(self) -> bool:
        """Whether a stream may assign a job in this status."""
        return self in ELIGIBLE

    @property
    def is_active(self) -> bool:
        """Whether a job in this status occupies a stream slot."""
        return self in ACTIVE


ELIGIBLE: frozenset[JobStatus] = frozenset(
    {JobStatus.INITIAL_PENDING, JobStatus.FAILED_RETRY, JobStatus.UNKNOWN_RETRY}
)
ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.RUNNING, JobStatus.CANCELLING})
FINAL: frozenset[JobStatus] = frozenset(
    {
        JobStatus.COMPLETED,
        JobStatus.STOPPED,
        JobStatus.UNSCHEDULED,
        JobStatus.UNKNOWN_STOPPED,
        JobStatus.DISCARDED,
    }
)
#: ``JobStatus.X`` is a slow class-attribute lookup on Python 3.11: hot paths use this.
_INITIAL_PENDING = JobStatus.INITIAL_PENDING
#: The range of ``Job.priority`` (a PostgreSQL ``smallint``).
PRIORITY_MIN = -32_768
PRIORITY_MAX = 32_767
#: The largest ``max_attempts`` (a PostgreSQL ``integer``).
MAX_ATTEMPTS_LIMIT = 2**31 - 1


_new_object = object.__new__


def utcnow() -> datetime:
    """The calling process's clock, timezone-aware UTC."""
    return datetime.now(UTC)


@dataclass(slots=True)
class Job:
    """One unit of work and its whole recorded history.

    Jobs returned by the library are snapshots: changing one changes nothing stored.
    """

    id: str
    job_type: str
    job_definition: bytes = b""
    tags: list[str] = field(default_factory=list)
    status: JobStatus = JobStatus.INITIAL_PENDING
    #: (``datetime.now(UTC)`` itself: no frame of ``utcnow``'s per job built)
    created_at: datetime = field(default_factory=functools.partial(datetime.now, UTC))
    started_at: datetime | None = None
    finalized_at: datetime | None = None
    error_message: str = ""
    result: bytes | None = None
    retry_count: int = 0
    last_retry_at: datetime | None = None
    assignee_id: str = ""
    assigned_at: datetime | None = None
    scheduled_at: datetime | None = None
    priority: int = 0
    max_attempts: int | None = None
    attempts: int = 0

    def copy(self) -> Job:
        """An independent snapshot (tags list copied).

        Each field set on a bare instance, on purpose: this runs for every job a
        backend hands out, and calling ``Job(...)`` costs the frame of ``__init__``
        besides (0.1 us per job; keyword arguments 0.7 us more).
        ``test_copy_keeps_every_field`` fails if a field is ever left out."""
        new: Job = _new_object(Job)
        new.id = self.id
        new.job_type = self.job_type
        new.job_definition = self.job_definition
        new.tags = [*self.tags]  # (no call of ``list``: per job handed out)
        new.status = self.status
        new.created_at = self.created_at
        new.started_at = self.started_at
        new.finalized_at = self.finalized_at
        new.error_message = self.error_message
        new.result = self.result
        new.retry_count = self.retry_count
        new.last_retry_at = self.last_retry_at
        new.assignee_id = self.assignee_id
        new.assigned_at = self.assigned_at
        new.scheduled_at = self.scheduled_at
        new.priority = self.priority
        new.max_attempts = self.max_attempts
        new.attempts = self.attempts
        return new

    @property
    def sort_key(self) -> datetime:
        """The due key (SPEC §8.2): ``scheduled_at``, else ``last_retry_at``, else
        ``created_at``. Selection order is priority descending, then this, then
        enqueue order."""
        if self.scheduled_at is not None:
            return self.scheduled_at
        return self.last_retry_at if self.last_retry_at is not None else self.created_at


@dataclass(slots=True)
class JobStats:
    """Counts of the jobs matching a tag filter."""

    tags: list[str]
    total_jobs: int
    pending_jobs: int
    running_jobs: int
    completed_jobs: int
    stopped_jobs: int
    failed_jobs: int
    total_retries: int
    by_status: dict[JobStatus, int]
    #: ``DISCARDED`` jobs (not counted in ``failed_jobs`` or ``stopped_jobs``).
    discarded_jobs: int = 0

    @classmethod
    def from_counts(
        cls, tags: Sequence[str], counts: dict[JobStatus, int], total_retries: int
    ) -> JobStats:
        by = {s: counts.get(s, 0) for s in JobStatus}
        return cls(
            tags=list(tags),
            total_jobs=sum(by.values()),
            pending_jobs=by[JobStatus.INITIAL_PENDING],
            running_jobs=by[JobStatus.RUNNING] + by[JobStatus.CANCELLING],
            completed_jobs=by[JobStatus.COMPLETED],
            stopped_jobs=by[JobStatus.STOPPED]
            + by[JobStatus.UNSCHEDULED]
            + by[JobStatus.UNKNOWN_STOPPED],
            failed_jobs=by[JobStatus.FAILED_RETRY] + by[JobStatus.UNKNOWN_RETRY],
            total_retries=total_retries,
            by_status=by,
            discarded_jobs=by[JobStatus.DISCARDED],
        )


@dataclass(slots=True)
class CancelResult:
    """What ``cancel_jobs`` did: jobs cancelled (or already cancelling), and the rest.

    ``unknown``: every selected job not cancelled, i.e. requested ids that do not
    exist and selected jobs already final. ``missing``: those of ``unknown`` that do
    not exist (in request order), so a caller can tell "no such job" (HTTP 404) from
    "already finished" (409) without another read.
    """

    cancelled: list[str]
    unknown: list[str]
    missing: list[str] = field(default_factory=list)


# --- validation -----------------------------------------------------------------------


def is_storable_text(text: str) -> bool:
    """Text every backend stores exactly: valid Unicode (no lone surrogates), no NUL."""
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(text: str, what: str) -> None:
    if "\x00" in text:
        raise ValueError(f"{what} must not contain NUL: {text[:80]!r}")
    if not is_storable_text(text):
        raise ValueError(f"{what} is not valid Unicode (it has a lone surrogate): {text[:80]!r}")


def check_id(job_id: object, what: str = "job id") -> str:
    """A job id: non-empty ``str`` of valid Unicode without NUL."""
    if not isinstance(job_id, str):
        raise TypeError(f"{what} must be str, got {type(job_id).__name__}")
    if not job_id:
        raise ValueError(f"{what} must not be empty")
    if not job_id.isascii() or "\x00" in job_id:
        _check_text(job_id, what)
    return job_id


def check_ids(job_ids: object, what: str = "job_ids") -> list[str]:
    if isinstance(job_ids, str | bytes) or not isinstance(job_ids, Iterable):
        raise TypeError(f"{what} must be a sequence of str, got {type(job_ids).__name__}")
    return [check_id(i, f"{what} item") for i in job_ids]


def check_tags(tags: object, what: str = "tags") -> list[str]:
    """A tag list: each a non-empty ``str`` without NUL; duplicates collapse (order kept)."""
    if tags is None:
        return []
    if isinstance(tags, str | bytes) or not isinstance(tags, Iterable):
        raise TypeError(f"{what} must be a list of str, got {type(tags).__name__}")
    out: dict[str, None] = {}
    for tag in tags:
        if not isinstance(tag, str):
            raise TypeError(f"each tag must be str, got {type(tag).__name__}: {tag!r}")
        if not tag:
            raise ValueError("a tag must not be empty")
        if not tag.isascii() or "\x00" in tag:
            _check_text(tag, "a tag")
        out[tag] = None
    return list(out)


def check_aware(value: object, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got naive {value!r}")
    return value.astimezone(UTC)


def check_bytes(value: object, what: str, *, optional: bool = False) -> bytes | None:
    if value is None and optional:
        return None
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes, got {type(value).__name__}")
    return value


def check_message(value: object, what: str = "error_message", *, required: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, got {type(value).__name__}")
    if required and not value:
        raise ValueError(f"{what} must not be empty")
    if not value.isascii() or "\x00" in value:
        _check_text(value, what)
    return value


def check_seconds(value: object, what: str, *, zero: bool = False) -> float:
    """A duration or interval in seconds: a finite ``int``/``float`` (not ``bool``),
    positive (or at least zero with ``zero``). NaN and infinity are refused: every
    timer built on them misbehaves (NaN never compares, infinity never fires)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
    if seconds < 0 or (seconds == 0 and not zero):
        rule = "at least zero" if zero else "positive"
        raise ValueError(f"{what} must be {rule}, got {value!r}")
    return seconds


def check_ttl(ttl: object) -> timedelta:
    if not isinstance(ttl, timedelta):
        raise TypeError(f"ttl must be a timedelta, got {type(ttl).__name__}")
    if ttl <= timedelta(0):
        raise ValueError(f"ttl must be positive, got {ttl!r}")
    return ttl


def _plain_tags(tags: object) -> bool:
    """Tags already in normal form: a list of distinct non-empty str without NUL."""
    if type(tags) is not list:
        return False
    for tag in tags:
        if type(tag) is not str or not tag or not is_storable_text(tag):
            return False
    return len(set(tags)) == len(tags)


def has_history(job: Job) -> bool:
    """Whether a job to enqueue carries any history field (a re-imported job, say) or
    any of the time fields of SPEC §8 (a schedule, a priority, an attempt limit).

    Most do not; storage backends insert those with the history columns as
    constants, which is cheaper than binding a parameter for each."""
    return (
        job.scheduled_at is not None
        or job.priority != 0
        or job.max_attempts is not None
        or job.started_at is not None
        or job.finalized_at is not None
        or job.result is not None
        or job.retry_count != 0
        or job.last_retry_at is not None
        or job.assigned_at is not None
    )


class CheckedJobs(list[Job]):
    """Jobs that :func:`check_new_job` returned for one enqueue: private copies that
    nothing else refers to, so a backend that keeps ``Job`` objects (memory) may keep
    these as they are instead of copying each again.

    A copy's ``tags`` is a list of its own; for a backend that takes them
    (``Backend._takes_no_tags``) a job without tags has the one shared empty tuple
    instead (:data:`NO_TAGS`), to be read, never changed nor handed out."""

    __slots__ = ()


#: The last job type that ``check_new_job``'s fast path accepted (a ``str``, ASCII,
#: no NUL: an immutable value, so the same object needs no second check).
_last_job_type = ""
_ZERO = 0
#: The ``tags`` of a checked copy of a job without tags, for a backend that takes it
#: (``Backend._takes_no_tags``): one shared empty tuple, not an empty list per job. A
#: list is an object the garbage collector tracks, and a copy lives as long as the
#: enqueue or (memory keeps it) the store: on memory, a 10,000-job enqueue made a
#: full collection due with the lists, and none without them.
NO_TAGS: tuple[str, ...] = ()
_EMPTY = ""

#: Count the jobs that :func:`check_new_job` accepted with a schedule, and with tags
#: (and callers' marks): ``next()`` on one is one atomic C call (from 1: always true,
#: so it stands in the fast path's conditions). An enqueue takes a mark of each before
#: its checks and one after; if they are consecutive, none of its jobs had that field,
#: and it skips its pass over the jobs for it (per job). Any other count between
#: (another enqueue's, in any task or thread) only sends it through the pass.
noted_schedules = itertools.count(1)
noted_tags = itertools.count(1)


def _plain_text(text: str) -> bool:
    """ASCII text without NUL (storable: the fast path's test of a non-empty field)."""
    return text.isascii() and "\x00" not in text


def check_new_job(job: object, listed: bool = True) -> Job:
    """Validate a job for enqueueing and return a normalised private copy (its tags
    a list of its own; with ``listed`` false, :data:`NO_TAGS` for none).

    The common case (a freshly built job with default history fields) takes a fast
    path of exact type checks, each field read once, its copy made here from what
    was read (per job: a copy's call and second reads cost more than the checks);
    anything else goes through the full checks, which name what is wrong.
    ``test_copy_keeps_every_field`` covers this copy too.
    """
    if type(job) is not Job:
        return _check_new_job_slow(job, listed)
    # (ASCII text without NUL is storable: checked inline; other text takes the full
    # checks, which accept any valid Unicode)
    global _last_job_type  # (a cache of one checked value)
    job_id = job.id
    job_type = job.job_type
    definition = job.job_definition
    tags = job.tags
    created = job.created_at
    scheduled = job.scheduled_at
    priority = job.priority
    limit = job.max_attempts
    message = job.error_message
    assignee = job.assignee_id
    attempts = job.attempts
    # (``x is _ZERO``: the int 0 itself, CPython's one object for it, what a default
    # or any computed 0 is; ``x is _EMPTY`` likewise for ``""``. Anything else that
    # equals them, a ``bool`` or a subclass, takes the full checks.)
    if not (
        job.status is _INITIAL_PENDING
        and job.started_at is None
        and job.finalized_at is None
        and job.last_retry_at is None
        and job.assigned_at is None
        and job.result is None
        and job.retry_count is _ZERO
        and attempts is _ZERO
        and type(job_id) is str
        and job_id
        and job_id.isascii()
        and "\x00" not in job_id
        and (
            job_type is _last_job_type  # (checked already: a batch's jobs share a type)
            or (type(job_type) is str and job_type.isascii() and "\x00" not in job_type)
        )
        and type(definition) is bytes
        and type(created) is datetime
        and created.tzinfo is UTC
        and (
            scheduled is None
            or (type(scheduled) is datetime and scheduled.tzinfo is UTC and next(noted_schedules))
        )
        and (
            priority is _ZERO
            or (type(priority) is int and PRIORITY_MIN <= priority <= PRIORITY_MAX)
        )
        and (limit is None or (type(limit) is int and 1 <= limit <= MAX_ATTEMPTS_LIMIT))
        and (message is _EMPTY or (type(message) is str and _plain_text(message)))
        and (assignee is _EMPTY or (type(assignee) is str and _plain_text(assignee)))
        and type(tags) is list
        and (not tags or (_plain_tags(tags) and next(noted_tags)))
    ):
        return _check_new_job_slow(job, listed)
    _last_job_type = job_type
    new: Job = _new_object(Job)  # (``Job.copy``, of the fields read, inline: per job)
    new.id = job_id
    new.job_type = job_type
    new.job_definition = definition
    new.tags = [*tags] if tags or listed else NO_TAGS  # type: ignore[assignment]
    new.status = _INITIAL_PENDING
    new.created_at = created
    new.started_at = None
    new.finalized_at = None
    new.error_message = message
    new.result = None
    new.retry_count = 0
    new.last_retry_at = None
    new.assignee_id = assignee
    new.assigned_at = None
    new.scheduled_at = scheduled
    new.priority = priority
    new.max_attempts = limit
    new.attempts = 0
    return new


def _check_new_job_slow(job: object, listed: bool) -> Job:
    if not isinstance(job, Job):
        raise TypeError(f"expected a Job, got {type(job).__name__}")
    check_id(job.id)
    if not isinstance(job.job_type, str):
        raise TypeError(f"job {job.id!r}: job_type must be str, got {type(job.job_type).__name__}")
    _check_text(job.job_type, f"job {job.id!r}: job_type")
    check_bytes(job.job_definition, f"job {job.id!r}: job_definition")
    tags = check_tags(job.tags, f"job {job.id!r}: tags")
    if not isinstance(job.status, JobStatus) or job.status is not JobStatus.INITIAL_PENDING:
        raise ValueError(
            f"job {job.id!r}: enqueue accepts only status INITIAL_PENDING, got {job.status!r}"
        )
    if job.created_at is None:
        raise TypeError(f"job {job.id!r}: created_at must be a datetime, got None")
    created = check_aware(job.created_at, f"job {job.id!r}: created_at")
    assert created is not None
    for name in ("started_at", "finalized_at", "last_retry_at", "assigned_at"):
        check_aware(getattr(job, name), f"job {job.id!r}: {name}")
    check_message(job.error_message, f"job {job.id!r}: error_message")
    check_bytes(job.result, f"job {job.id!r}: result", optional=True)
    if not isinstance(job.retry_count, int) or isinstance(job.retry_count, bool):
        raise TypeError(f"job {job.id!r}: retry_count must be int")
    if job.retry_count < 0:
        raise ValueError(f"job {job.id!r}: retry_count must not be negative")
    if not isinstance(job.assignee_id, str):
        raise TypeError(f"job {job.id!r}: assignee_id must be str")
    _check_text(job.assignee_id, f"job {job.id!r}: assignee_id")
    check_priority(job.priority, f"job {job.id!r}: priority")
    check_max_attempts(job.max_attempts, f"job {job.id!r}: max_attempts")
    if not isinstance(job.attempts, int) or isinstance(job.attempts, bool):
        raise TypeError(f"job {job.id!r}: attempts must be int, got {type(job.attempts).__name__}")
    if job.attempts != 0:
        raise ValueError(f"job {job.id!r}: enqueue accepts only attempts=0, got {job.attempts}")
    if tags:
        next(noted_tags)
    if job.scheduled_at is not None:
        next(noted_schedules)
    return Job(
        id=job.id,
        job_type=job.job_type,
        job_definition=bytes(job.job_definition),
        tags=tags if tags or listed else NO_TAGS,  # type: ignore[arg-type]
        status=JobStatus.INITIAL_PENDING,
        created_at=created,
        started_at=check_aware(job.started_at, "started_at"),
        finalized_at=check_aware(job.finalized_at, "finalized_at"),
        error_message=job.error_message,
        result=job.result,
        retry_count=job.retry_count,
        last_retry_at=check_aware(job.last_retry_at, "last_retry_at"),
        assignee_id=job.assignee_id,
        assigned_at=check_aware(job.assigned_at, "assigned_at"),
        scheduled_at=check_aware(job.scheduled_at, f"job {job.id!r}: scheduled_at"),
        priority=job.priority,
        max_attempts=job.max_attempts,
    )


def check_priority(value: object, what: str = "priority") -> int:
    """A priority: an ``int`` in -32,768 … 32,767 (higher is assigned first)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be int, got {type(value).__name__}")
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise ValueError(f"{what} must be in {PRIORITY_MIN}..{PRIORITY_MAX}, got {value}")
    return value


def check_max_attempts(value: object, what: str = "max_attempts") -> int | None:
    """An attempt limit: ``None`` (unlimited) or an ``int`` ≥ 1."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be int or None, got {type(value).__name__}")
    if not 1 <= value <= MAX_ATTEMPTS_LIMIT:
        raise ValueError(
            f"{what} must be in 1..{MAX_ATTEMPTS_LIMIT} (or None for unlimited), got {value}"
        )
    return value


def check_delay(value: object, what: str = "retry_in") -> timedelta:
    """A delay: a ``timedelta`` ≥ 0."""
    if not isinstance(value, timedelta):
        raise TypeError(f"{what} must be a timedelta, got {type(value).__name__}")
    if value < timedelta(0):
        raise ValueError(f"{what} must not be negative, got {value!r}")
    return value
