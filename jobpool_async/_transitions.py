"""The one transition table of the job state machine (SPEC §2).

Every backend applies moves through the :class:`Transition` objects defined here:
the memory and LevelDB backends call :func:`apply` on job records, the SQL backends
compile the same table into ``CASE`` expressions (``backends/_sql.py``). Nothing
else in the library decides which move is legal.

Side effects are derived from the move, uniformly:

* ``assign`` transitions set ``assignee_id``/``assigned_at`` (and ``started_at`` once)
  and count an attempt (``attempts += 1``);
* a transition with ``exhausted`` moves a job that has no attempts left (its
  ``attempts`` ≥ its ``max_attempts``, else the caller's default limit) to the
  ``exhausted`` target instead (``fail`` → ``DISCARDED``, SPEC §8.3);
* a ``schedules`` transition writes the change's ``scheduled_at`` (``None`` clears
  it) on moves to an eligible status; a ``reopens`` one clears ``finalized_at`` and
  ``result`` (requeue);
* entering a status in ``retry_targets`` from another status counts a retry
  (``retry_count += 1``, ``last_retry_at = now``);
* entering a final status from another status sets ``finalized_at = now``;
* a given ``result`` / ``error_message`` (not ``None``) is stored, except that a
  ``keeps_message`` transition writes its message only to a job that has none;
* a ``guarded`` transition moves a job only while it holds the assignment the
  change names (its ``assigned_at``), checked by the backend in the same write.

A move from a status to itself therefore changes no timestamp.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from ._models import ELIGIBLE, FINAL, Job, JobStatus

__all__ = [
    "ACK_EXECUTING",
    "ACK_NOT_EXECUTING",
    "ASSIGN",
    "CANCEL",
    "COMPLETE",
    "DISCARD",
    "FAIL",
    "LEASE_EXPIRED",
    "MARK_UNKNOWN_STOPPED",
    "RELEASE",
    "REQUEUE",
    "STOP",
    "STOP_WITH_RETRY",
    "TRANSITIONS",
    "UPDATE_TO",
    "WORKER_LOST",
    "Transition",
    "apply",
    "attempts_left",
]

S = JobStatus


@dataclass(frozen=True, slots=True)
class Transition:
    """A named operation: which statuses it moves from, and to what."""

    name: str
    moves: Mapping[JobStatus, JobStatus]
    #: The status named in ``InvalidTransitionError.target`` (``None`` if several).
    target: JobStatus | None = None
    retry_targets: frozenset[JobStatus] = frozenset()
    assign: bool = False
    #: Where a job with no attempts left goes instead (by source status).
    exhausted: Mapping[JobStatus, JobStatus] = field(default_factory=dict)
    #: Writes the change's ``scheduled_at`` on moves to an eligible status.
    schedules: bool = False
    #: Clears ``finalized_at`` and ``result`` (a final job made eligible again).
    reopens: bool = False
    #: A compare-and-set on the assignment: a job moves only if its ``assigned_at``
    #: is the change's (``Change.assigned_at``); backends check it in the same write.
    guarded: bool = False
    #: Writes the change's ``error_message`` only to a job that has none stored: it
    #: explains a move, it does not replace a real error (checked in the same write).
    keeps_message: bool = False
    #: Moves in ``moves`` that count a retry / set ``finalized_at`` (derived).
    retry_sources: frozenset[JobStatus] = field(init=False)
    finalize_sources: frozenset[JobStatus] = field(init=False)
    #: ``moves`` as a plain dict, for :func:`apply` (a ``get`` on the read-only view
    #: goes through a method call of its own: twice per job).
    _targets: dict[JobStatus, JobStatus] = field(init=False, repr=False, compare=False)
    #: ``exhausted`` as a plain dict (empty for most: one test of it, no lookup).
    _exhausts: dict[JobStatus, JobStatus] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_targets", dict(self.moves))
        object.__setattr__(self, "_exhausts", dict(self.exhausted))
        object.__setattr__(self, "moves", MappingProxyType(dict(self.moves)))
        object.__setattr__(self, "exhausted", MappingProxyType(dict(self.exhausted)))
        object.__setattr__(
            self,
            "retry_sources",
            frozenset(s for s, t in self.moves.items() if t in self.retry_targets and s != t),
        )
        object.__setattr__(
            self,
            "finalize_sources",
            frozenset(s for s, t in self.moves.items() if t in FINAL and s != t),
        )

    @property
    def sources(self) -> frozenset[JobStatus]:
        return frozenset(self.moves)

    def target_of(self, current: JobStatus) -> JobStatus | None:
        """Where a job in ``current`` goes, or ``None`` if this move is not allowed."""
        return self.moves.get(current)

    @property
    def schedule_sources(self) -> frozenset[JobStatus]:
        """Sources whose (normal) target is eligible: where ``scheduled_at`` is written."""
        if not self.schedules:
            return frozenset()
        return frozenset(s for s, t in self.moves.items() if t in ELIGIBLE)


def attempts_left(job: Job, default_max_attempts: int | None) -> bool:
    """SPEC §8.3: the job's own ``max_attempts`` wins, else the caller's default;
    ``None`` for both means unlimited."""
    limit = job.max_attempts if job.max_attempts is not None else default_max_attempts
    return limit is None or job.attempts < limit


def _to(target: JobStatus, *sources: JobStatus) -> dict[JobStatus, JobStatus]:
    return dict.fromkeys(sources, target)


ASSIGN = Transition(
    "assign",
    _to(S.RUNNING, S.INITIAL_PENDING, S.FAILED_RETRY, S.UNKNOWN_RETRY),
    target=S.RUNNING,
    assign=True,
)
COMPLETE = Transition(
    "complete",
    _to(S.COMPLETED, S.RUNNING, S.CANCELLING, S.UNKNOWN_RETRY, S.UNKNOWN_STOPPED),
    target=S.COMPLETED,
)
FAIL = Transition(
    "fail",
    _to(S.FAILED_RETRY, S.RUNNING, S.UNKNOWN_RETRY),
    target=S.FAILED_RETRY,
    retry_targets=frozenset({S.FAILED_RETRY, S.DISCARDED}),
    exhausted=_to(S.DISCARDED, S.RUNNING, S.UNKNOWN_RETRY),
    schedules=True,
)
DISCARD = Transition(
    "discard", _to(S.DISCARDED, S.RUNNING, S.CANCELLING, S.UNKNOWN_RETRY), target=S.DISCARDED
)
#: ``requeue_jobs``: a final job back to FAILED_RETRY, counters kept (SPEC §8.3).
REQUEUE = Transition(
    "requeue",
    _to(S.FAILED_RETRY, S.DISCARDED, S.STOPPED, S.UNKNOWN_STOPPED),
    target=S.FAILED_RETRY,
    schedules=True,
    reopens=True,
)
STOP = Transition(
    "stop", _to(S.STOPPED, S.RUNNING, S.CANCELLING, S.UNKNOWN_RETRY), target=S.STOPPED
)
STOP_WITH_RETRY = Transition(
    "stop_with_retry",
    _to(S.STOPPED, S.CANCELLING),
    target=S.STOPPED,
    retry_targets=frozenset({S.STOPPED}),
)
MARK_UNKNOWN_STOPPED = Transition(
    "mark_unknown_stopped",
    _to(S.UNKNOWN_STOPPED, S.RUNNING, S.CANCELLING, S.UNKNOWN_RETRY),
    target=S.UNKNOWN_STOPPED,
)
#: ``cancel_jobs``; a job already CANCELLING stays so and counts as cancelled.
CANCEL = Transition(
    "cancel",
    {
        S.INITIAL_PENDING: S.UNSCHEDULED,
        S.RUNNING: S.CANCELLING,
        S.CANCELLING: S.CANCELLING,
        S.FAILED_RETRY: S.STOPPED,
        S.UNKNOWN_RETRY: S.STOPPED,
    },
)
ACK_EXECUTING = Transition("acknowledge_cancellation", {S.CANCELLING: S.STOPPED}, target=S.STOPPED)
ACK_NOT_EXECUTING = Transition(
    "acknowledge_cancellation", {S.CANCELLING: S.UNKNOWN_STOPPED}, target=S.UNKNOWN_STOPPED
)
#: ``mark_worker_unresponsive`` and ``reset_running_jobs``.
WORKER_LOST = Transition(
    "worker_lost", {S.RUNNING: S.UNKNOWN_RETRY, S.CANCELLING: S.UNKNOWN_STOPPED}
)
#: A lease rescue (SPEC §8.4): as ``WORKER_LOST``, but a RUNNING job with no
#: attempts left ends UNKNOWN_STOPPED (it is not run again).
LEASE_EXPIRED = Transition(
    "lease_expired",
    {S.RUNNING: S.UNKNOWN_RETRY, S.CANCELLING: S.UNKNOWN_STOPPED},
    exhausted={S.RUNNING: S.UNKNOWN_STOPPED},
)
#: A stream gives back jobs it assigned but never handed to its caller. Its message
#: explains the move only where the job has no message of its own (an earlier run's
#: error, or one an ``update_job_status`` set while the stream held the job).
RELEASE = Transition(
    "release",
    {S.RUNNING: S.FAILED_RETRY, S.CANCELLING: S.STOPPED},
    retry_targets=frozenset({S.FAILED_RETRY}),
    guarded=True,
    keeps_message=True,
)

_UPDATE_ALLOWED: dict[JobStatus, tuple[JobStatus, ...]] = {
    S.INITIAL_PENDING: (S.UNSCHEDULED,),
    S.RUNNING: (
        S.COMPLETED,
        S.FAILED_RETRY,
        S.STOPPED,
        S.CANCELLING,
        S.UNKNOWN_RETRY,
        S.UNKNOWN_STOPPED,
        S.DISCARDED,
    ),
    S.CANCELLING: (S.COMPLETED, S.STOPPED, S.UNKNOWN_STOPPED),
    S.FAILED_RETRY: (S.STOPPED, S.UNKNOWN_STOPPED),
    S.UNKNOWN_RETRY: (S.COMPLETED, S.FAILED_RETRY, S.STOPPED, S.UNKNOWN_STOPPED, S.DISCARDED),
    S.UNKNOWN_STOPPED: (S.COMPLETED, S.STOPPED),
    S.COMPLETED: (),
    S.STOPPED: (),
    S.UNSCHEDULED: (),
    S.DISCARDED: (),
}


def _update_to(target: JobStatus) -> Transition:
    moves = {src: target for src, targets in _UPDATE_ALLOWED.items() if target in targets}
    moves[target] = target  # any status to itself: updates result/error only
    return Transition(f"update_to_{target.value}", moves, target=target)


#: ``update_job_status(job_id, status)``: one transition per target status.
UPDATE_TO: Mapping[JobStatus, Transition] = MappingProxyType(
    {status: _update_to(status) for status in JobStatus}
)

#: The table: every named transition (``update_job_status``'s are in :data:`UPDATE_TO`).
TRANSITIONS: tuple[Transition, ...] = (
    ASSIGN,
    COMPLETE,
    FAIL,
    DISCARD,
    REQUEUE,
    STOP,
    STOP_WITH_RETRY,
    MARK_UNKNOWN_STOPPED,
    CANCEL,
    ACK_EXECUTING,
    ACK_NOT_EXECUTING,
    WORKER_LOST,
    LEASE_EXPIRED,
    RELEASE,
)


def apply(
    job: Job,
    transition: Transition,
    now: datetime,
    result: bytes | None = None,
    error_message: str | None = None,
    assignee_id: str | None = None,
    scheduled_at: datetime | None = None,
    max_attempts: int | None = None,
) -> JobStatus | None:
    """Move ``job`` in place; return the new status, or ``None`` if not allowed.

    ``scheduled_at`` is written by ``schedules`` transitions; ``max_attempts`` is the
    caller's default attempt limit for ``exhausted`` ones. (Hot callers pass every
    argument by position: binding keywords costs a search of the parameter names
    each.)"""
    current = job.status
    target = transition._targets.get(current)
    if target is None:
        return None
    if (
        transition._exhausts
        and current in transition._exhausts
        and not attempts_left(job, max_attempts)
    ):
        target = transition._exhausts[current]
    if transition.assign:
        assert assignee_id is not None
        job.assignee_id = assignee_id
        job.assigned_at = now
        job.attempts += 1
        if job.started_at is None:
            job.started_at = now
    if current in transition.retry_sources:
        job.retry_count += 1
        job.last_retry_at = now
    if transition.reopens:
        job.finalized_at = None
        job.result = None
    elif target in FINAL and target != current:
        job.finalized_at = now
    if transition.schedules and target in ELIGIBLE:
        job.scheduled_at = scheduled_at
    if result is not None:
        job.result = result
    if error_message is not None and not (transition.keeps_message and job.error_message):
        job.error_message = error_message
    job.status = target
    return target
