"""The storage contract every backend implements, and everything a backend needs.

This is the one module a backend author reads and imports from: the contract
(:class:`Backend` and the records it takes and returns: :class:`Change`,
:class:`Moved`, :class:`Refill`, :class:`Selection`, :class:`ApplyOutcome`,
:class:`SelectOutcome`, :class:`JobState`, :class:`ListQuery`, :class:`Lease`), the
job model (:class:`Job`, :class:`JobStatus`, the status sets :data:`ELIGIBLE`,
:data:`ACTIVE`, :data:`FINAL`), the state machine (:class:`Transition`, each named
transition such as :data:`ASSIGN` or :data:`COMPLETE`, the table
:data:`TRANSITIONS` and :data:`UPDATE_TO`, :func:`apply_transition` for backends
that move job records in Python), the errors a backend raises, the lease helpers
(:func:`aggregate`, :func:`plan_rescue`), the clock (:class:`Clock`, :func:`utcnow`)
and three checks: of a duration argument (:func:`check_seconds`), of a stored
job (:func:`has_history`: did it ever run) and the validated form of a new job as
the queue passes it to :meth:`Backend.insert` (:func:`check_new_job`, for tests
that call a backend directly). Register a new backend in
:mod:`jobpool_async.backends.registry`.

A backend owns storage and atomicity; :class:`~jobpool_async.PoolQueue` owns
streams, capacity and waking. The contract is shaped for a networked,
multi-process store: every operation is one call (one transaction), and each call
returns what the queue needs to free the right stream slots and wake the right
streams (:class:`Moved` records), so no second round trip is needed.

Rules every implementation follows (``docs/backends.md`` says them in full, and the
conformance kit :class:`jobpool_async.testing.BackendConformance` checks them on any
backend):

* Moves are decided only by the :class:`Transition` table above, as a
  compare-and-set on the current status inside the same transaction.
* Every method is one storage transaction; a failure raises :class:`StorageError`
  (or the documented ``JobPoolError``) and leaves the store as it was.
* Arguments arrive validated; backends do not re-check user input.
* Returned jobs are fresh snapshots with timezone-aware UTC datetimes.
* Claiming reads an index of eligible jobs in selection order (``priority``
  descending, then the due key ``scheduled_at`` or ``last_retry_at`` or else
  ``created_at``, then enqueue order); its cost does not grow with the number of
  final jobs kept, nor with the number of jobs scheduled for later: a job that
  becomes eligible with a ``scheduled_at`` (enqueue, a ``schedules`` transition)
  waits in a separate index ordered by that time and is moved into the eligible
  index ("promoted") by the first claim at or after it.
* :meth:`Backend.next_due` tells the queue the earliest time a waiting job
  comes due, as far as this process knows, so it sets one timer for it.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar, NamedTuple

from .._clock import Clock, SystemClock
from .._errors import (
    DuplicateJobError,
    InvalidTransitionError,
    JobNotFoundError,
    JobPoolError,
    JobsNotFinalError,
    StorageError,
)
from .._leases import Lease, LeaseRow, RescuePlan, aggregate, plan_rescue
from .._listing import ListQuery
from .._models import (
    ACTIVE,
    ELIGIBLE,
    FINAL,
    NO_TAGS,
    CheckedJobs,
    Job,
    JobStatus,
    check_new_job,
    check_seconds,
    has_history,
    utcnow,
)
from .._transitions import (
    ACK_EXECUTING,
    ACK_NOT_EXECUTING,
    ASSIGN,
    CANCEL,
    COMPLETE,
    DISCARD,
    FAIL,
    LEASE_EXPIRED,
    MARK_UNKNOWN_STOPPED,
    RELEASE,
    REQUEUE,
    STOP,
    STOP_WITH_RETRY,
    TRANSITIONS,
    UPDATE_TO,
    WORKER_LOST,
    Transition,
    attempts_left,
)
from .._transitions import apply as apply_transition

__all__ = [
    "ACK_EXECUTING",
    "ACK_NOT_EXECUTING",
    "ACTIVE",
    "ASSIGN",
    "CANCEL",
    "COMPLETE",
    "DISCARD",
    "ELIGIBLE",
    "FAIL",
    "FINAL",
    "LEASE_EXPIRED",
    "MARK_UNKNOWN_STOPPED",
    "NO_TAGS",
    "RELEASE",
    "REQUEUE",
    "STOP",
    "STOP_WITH_RETRY",
    "TRANSITIONS",
    "UPDATE_TO",
    "WORKER_LOST",
    "ApplyOutcome",
    "Backend",
    "Change",
    "CheckedJobs",
    "Clock",
    "DuplicateJobError",
    "InvalidTransitionError",
    "Job",
    "JobNotFoundError",
    "JobPoolError",
    "JobState",
    "JobStatus",
    "JobsNotFinalError",
    "Lease",
    "LeaseRow",
    "ListQuery",
    "Listener",
    "Moved",
    "Refill",
    "RescuePlan",
    "SelectOutcome",
    "Selection",
    "StorageError",
    "SystemClock",
    "Transition",
    "aggregate",
    "apply_transition",
    "attempts_left",
    "check_new_job",
    "check_seconds",
    "has_history",
    "plan_rescue",
    "refill_limit",
    "utcnow",
]


class Change(NamedTuple):
    """One job to move by ``transition``; ``None`` fields are left unchanged.

    (Named tuples, not dataclasses: one is built per job on the hot path.)
    """

    job_id: str
    transition: Transition
    result: bytes | None = None
    error_message: str | None = None
    #: For ``schedules`` transitions: the job's new ``scheduled_at`` (``None`` clears it).
    scheduled_at: datetime | None = None
    #: For ``exhausted`` transitions: the attempt limit of jobs without their own.
    max_attempts: int | None = None
    #: For ``guarded`` transitions: the assignment the move is for. A job assigned
    #: again since (another ``assigned_at``) is not moved: the compare and the move
    #: are one atomic write, so a stream never gives back a job another process
    #: claimed after it.
    assigned_at: datetime | None = None


class Moved(NamedTuple):
    """A job that a call moved (possibly to the same status), with its new status.

    ``assigned_at`` is the job's assignment time when it moved (a move never changes
    it): with the id it names the assignment the move ended or changed, so a queue
    never applies a move to a later assignment of the same job (a stream that
    claimed it again meanwhile). ``tags`` are needed only when the new status is
    eligible (to wake the streams that match); a backend may leave them empty
    otherwise."""

    job_id: str
    status: JobStatus
    assigned_at: datetime | None
    tags: tuple[str, ...] = ()
    #: An eligible job that is not due yet: when it comes due (``None``: due now).
    due_at: datetime | None = None


class Refill(NamedTuple):
    """A claim made by :meth:`Backend.apply` in the same call, for a stream waiting for
    a free slot: up to one job for each job of ``job_ids`` (that stream's) which the
    apply moved out of RUNNING/CANCELLING, i.e. one per slot the apply freed, plus
    ``extra`` more (slots of the stream that were free already, which the queue
    reserved for this call).

    This saves the stream its own claim round trip (and, on PostgreSQL, a commit)
    after every completion batch: the Worker's common case. A backend may leave out
    the jobs the changes name (PostgreSQL does); the error of a job it could not move
    names the status the job had, never RUNNING for this claim.
    """

    assignee_id: str
    tags: tuple[str, ...]
    job_ids: frozenset[str]
    #: Free slots beyond those the apply frees (the queue reserved them for this call).
    extra: int = 0


def refill_limit(refill: Refill, moved: Sequence[Moved]) -> int:
    """How many jobs ``refill`` may claim after ``moved``: the slots they freed, plus
    its ``extra``."""
    ids = refill.job_ids
    return refill.extra + sum(1 for m in moved if m.status not in ACTIVE and m.job_id in ids)


@dataclass(slots=True)
class ApplyOutcome:
    """Result of :meth:`Backend.apply`: the moves made and, per job, why not."""

    moved: list[Moved] = field(default_factory=list)
    #: ``JobNotFoundError`` or ``InvalidTransitionError`` for each job not moved.
    errors: dict[str, JobPoolError] = field(default_factory=dict)
    #: Jobs claimed for the call's :class:`Refill` (now RUNNING), oldest first.
    claimed: list[Job] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which jobs a selection-based call acts on.

    ``job_ids`` and ``tags`` select their union (tags match with AND; an empty
    tuple selects nothing by that criterion). ``assignee_id`` selects the jobs that
    assignee holds now: RUNNING or CANCELLING and assigned to it (a job keeps its
    ``assignee_id`` once it leaves those statuses, but is no longer selected by it;
    backends read an index of active jobs per assignee). ``everything`` selects
    every job.
    """

    job_ids: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    assignee_id: str | None = None
    everything: bool = False


@dataclass(slots=True)
class SelectOutcome:
    """Result of :meth:`Backend.apply_selected`."""

    moved: list[Moved] = field(default_factory=list)
    #: With ``report_unmatched``: selected ids that do not exist, and selected jobs
    #: whose status the transition does not move from (each once, ids first).
    unmatched: list[str] = field(default_factory=list)
    #: With ``report_unmatched``: the selected ids that do not exist (also in ``unmatched``).
    missing: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class JobState:
    """The cheap part of a job a stream needs to know if it still holds it."""

    status: JobStatus
    assigned_at: datetime | None


#: Called by backends with out-of-process changes: moves, or ``None`` for "re-check".
Listener = Callable[[Sequence[Moved] | None], None]


class Backend(abc.ABC):
    """Abstract storage for jobs. One :class:`PoolQueue` owns one backend instance."""

    #: Seconds between a stream's looks at storage shared with other processes;
    #: ``None`` when every change passes through this process (never poll).
    default_poll_interval: ClassVar[float | None] = None

    #: Whether every call awaits nothing but plain futures (a worker thread's hop, or
    #: none), under no timeout of its own: then a queue drives a call that suspends on
    #: in the calling task (``jobpool_async._eager.carry``: no task per call). False
    #: for a backend whose calls may await under an ``asyncio.timeout`` (which cancels
    #: the task it was entered in: the caller's, whose cancellation the call would then
    #: take for its own): each such call runs on in a task of its own.
    _carry_calls: ClassVar[bool] = False

    #: Whether :meth:`insert` and :meth:`insert_new` take a queue's checked copies of
    #: jobs without tags with the one shared empty tuple as their ``tags``
    #: (:data:`NO_TAGS`), not an empty list each: one object fewer
    #: per job for the garbage collector to track while the copy lives (the enqueue,
    #: or the store for a backend that keeps it). A backend that says so only reads a
    #: copy's ``tags``, never changes it, and never hands the copy itself out (a job
    #: it returns has a list of its own, as :meth:`Job.copy` makes). Memory does.
    _takes_no_tags: ClassVar[bool] = False

    #: Fault injection for tests: awaited by :meth:`rescue_expired` between its read
    #: of the jobs to rescue and its compare-and-set write (so a test can commit a
    #: completion exactly there). ``None`` in normal use.
    rescue_hook: Callable[[], Awaitable[None]] | None = None

    @abc.abstractmethod
    async def open(self) -> None:
        """Open (and create or check) the store. Called once before any other call."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the store. Idempotent."""

    @abc.abstractmethod
    async def insert(self, jobs: Sequence[Job]) -> None:
        """Store new ``INITIAL_PENDING`` jobs, all or nothing.

        Raises :class:`DuplicateJobError` if an id exists. The ids in ``jobs`` are
        distinct (the queue checks). A queue passes :class:`CheckedJobs`: its private
        copies, which a backend keeping ``Job`` objects may keep as they are; any
        other caller's jobs must be copied (they stay the caller's). With
        :attr:`_takes_no_tags`, a checked copy without tags has the shared empty tuple
        as its ``tags``.
        """

    def check_connection(self, connection: object) -> None:
        """Raise ``TypeError`` unless :meth:`insert_in` takes ``connection``.

        The default: this backend does not take the caller's connection at all.
        """
        raise TypeError(
            f"{type(self).__name__} does not take connection=: enqueueing in the caller's "
            "own transaction needs the PostgreSQL backend and an asyncpg connection"
        )

    async def insert_in(
        self, jobs: Sequence[Job], connection: object, *, ignore: bool = False
    ) -> list[str]:
        """Like :meth:`insert` (or with ``ignore``, :meth:`insert_new`), but with the
        caller's own database connection, inside the caller's transaction: the jobs
        exist if and only if it commits. Returns the ids inserted."""
        self.check_connection(connection)
        raise NotImplementedError  # pragma: no cover - check_connection raised

    @abc.abstractmethod
    async def insert_new(self, jobs: Sequence[Job]) -> list[str]:
        """Store the jobs of ``jobs`` (distinct ids) whose id is not stored, in one
        transaction; return their ids in input order (``if_exists="ignore"``). The
        jobs may be :class:`CheckedJobs`, as for :meth:`insert`."""

    @abc.abstractmethod
    async def claim(
        self, assignee_id: str, tags: Sequence[str], limit: int, now: datetime
    ) -> list[Job]:
        """Assign up to ``limit`` eligible jobs carrying every tag in ``tags``.

        Oldest first (see module docs), by :data:`ASSIGN`,
        in one transaction; returns the assigned jobs (now ``RUNNING``).
        """

    @abc.abstractmethod
    async def apply(
        self, changes: Sequence[Change], now: datetime, refill: Refill | None = None
    ) -> ApplyOutcome:
        """Apply each change that its job's current status allows, in one transaction.

        Job ids in ``changes`` are distinct. A job that does not exist gets
        ``JobNotFoundError``; one whose status the transition does not allow gets
        ``InvalidTransitionError(job_id, current, transition.target)``.

        With ``refill``, then claim up to :func:`refill_limit` jobs for it exactly as
        :meth:`claim` would (``now`` as the assignment time), in the same call: in the
        same transaction where the store has them, else right after the apply's own
        atomic write (if that claim fails, the apply's outcome is still returned, with
        no jobs claimed: the stream claims for itself when it wakes).
        """

    @abc.abstractmethod
    async def apply_selected(
        self,
        transition: Transition,
        selection: Selection,
        now: datetime,
        *,
        report_unmatched: bool = False,
        scheduled_at: datetime | None = None,
    ) -> SelectOutcome:
        """Move every selected job whose status ``transition`` allows, in one transaction.

        ``report_unmatched`` (what ``cancel_jobs`` reports) applies to selections by
        ids and tags; ``everything`` and ``assignee_id`` selections report nothing.
        ``scheduled_at`` is written by a ``schedules`` transition (requeue).
        """

    @abc.abstractmethod
    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        """The jobs with these ids, in input order; missing ids are skipped."""

    @abc.abstractmethod
    async def job_states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        """Status and ``assigned_at`` of the jobs that exist among ``job_ids``."""

    @abc.abstractmethod
    async def count_by_status(self, tags: Sequence[str]) -> tuple[dict[JobStatus, int], int]:
        """Job counts per status and the sum of ``retry_count``, over jobs with all ``tags``."""

    @abc.abstractmethod
    async def delete(self, selection: Selection) -> int:
        """Delete the selected jobs if all are final; else raise ``JobsNotFinalError``.

        ``JobsNotFinalError.job_ids`` names exactly the selected non-final jobs and
        nothing is deleted. Ids that do not exist are skipped.
        """

    @abc.abstractmethod
    async def delete_completed_before(self, cutoff: datetime) -> int:
        """Delete ``COMPLETED`` jobs whose ``finalized_at`` is at or before ``cutoff``."""

    async def list_jobs(self, query: ListQuery) -> list[Job]:
        """Up to ``query.limit`` jobs matching ``query``, newest first by ``created_at``
        then id (both descending), starting after ``query.before``; read from an index in
        that order, so the cost does not grow with the number of jobs stored.

        Every backend of this package implements it; the default tells a third-party
        backend's user what is missing.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement list_jobs")

    async def oldest_created(self, statuses: frozenset[JobStatus]) -> datetime | None:
        """The earliest ``created_at`` among jobs in ``statuses`` (``None``: no such job),
        read from the listing index per status (the dashboard's oldest waiting job)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement oldest_created")

    def next_due(self) -> datetime | None:
        """The earliest ``scheduled_at`` of a job waiting to come due, as far as this
        process knows (it may have been claimed or cancelled since: then the queue's
        timer fires for nothing), or ``None``. A claim at or after it promotes it."""
        return None

    async def watch(self, job_id: str, waiting: bool) -> None:  # noqa: B027 - optional hook
        """A ``wait_for`` starts (``waiting``) or stops waiting for ``job_id``: a backend
        shared with other processes that can push their moves may ask them to push this
        job's. The default does nothing (the waiter is woken by this queue's own moves
        and polls at ``poll_interval``)."""

    def set_listener(self, listener: Listener | None) -> None:  # noqa: B027 - optional hook
        """Receive changes made by other processes, for backends that can push them.

        The default does nothing: such backends are polled at ``poll_interval``.
        """

    # --- leases (SPEC §8.4) -----------------------------------------------------------
    #
    # Optional: a backend that does not override these has no leases (a queue on it
    # then behaves as with ``lease=None``). All four shipped backends implement them.

    @property
    def supports_leases(self) -> bool:
        return type(self).renew_leases is not Backend.renew_leases

    async def renew_leases(
        self,
        holder: str,
        renew: Sequence[str],
        release: Sequence[str],
        lease: timedelta,
        now: datetime,
    ) -> None:
        """In one write: the records (assignee, ``holder``) of ``renew`` now expire at
        ``now + lease`` (created with ``first_seen_at = now`` if missing); those of
        ``release`` are deleted. Both are sorted. A backend with a clock of its own
        (PostgreSQL) uses it instead of ``now``."""
        raise NotImplementedError

    async def list_leases(self) -> list[Lease]:
        """Every lease, live or expired, one per assignee (see :func:`aggregate`)."""
        raise NotImplementedError

    async def rescue_expired(
        self, now: datetime, forget_after: timedelta, max_attempts: int | None = None
    ) -> list[Moved]:
        """Rescue the jobs of assignees whose every lease record expired at ``now``.

        In one write: each RUNNING/CANCELLING job of such an assignee moves by
        :data:`LEASE_EXPIRED` (``max_attempts``: the limit
        for jobs without their own), as a compare-and-set on the
        status, ``assignee_id`` and ``assigned_at`` read before (and on the lease
        being still expired), so a job that moved or was assigned again meanwhile is
        left alone. Records expired before ``now - forget_after`` are deleted as
        :func:`plan_rescue` says (an expired assignee's only
        once it has no job left). Returns the moves. Awaits :attr:`rescue_hook`, if
        set, between the read and the write.
        """
        raise NotImplementedError

    async def _after_rescue_read(self) -> None:
        hook = self.rescue_hook
        if hook is not None:
            await hook()
