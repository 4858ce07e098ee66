"""The record-store algorithm that the memory and LevelDB backends share.

Both keep every job as a record plus indexes that they update themselves, in one
process; what differs is only where records and indexes live. So the contract's
algorithm (apply, apply-by-selection, delete, insert, selections, lease renewal and
rescue) is written here once, over a small storage interface each backend provides:

* **read**: :meth:`RecordStore._read` a record (``R``: whatever the backend keeps per
  job, e.g. the job and its enqueue sequence number), :meth:`~RecordStore._job` of a
  record, the id lists of its indexes (assignee, tag, completed);
* **stage**: :meth:`~RecordStore._stage` opens a write (``W``), and moves, inserts,
  removals and lease records are staged into it; the backend updates its indexes
  (eligible, waiting, active, completed, listing, counters) as it stages;
* **commit**: :meth:`~RecordStore._commit` makes one write of all that was staged
  (LevelDB: one ``WriteBatch``; memory: nothing left to do, since staging already
  changed the dicts without an ``await`` in between).

Every algorithm runs as one synchronous function through :meth:`~RecordStore._run`
(LevelDB: in its worker thread; memory: right away), so each call stays one atomic
step, and a failure before the commit leaves the store as it was. Claims stay with
the backends (how they walk their eligible index is what makes them fast); the
interface is per batch or per job, never per index key.
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from .base import (
    ACTIVE,
    COMPLETE,
    LEASE_EXPIRED,
    ApplyOutcome,
    Backend,
    Change,
    CheckedJobs,
    DuplicateJobError,
    InvalidTransitionError,
    Job,
    JobNotFoundError,
    JobPoolError,
    JobsNotFinalError,
    JobStatus,
    Lease,
    LeaseRow,
    Moved,
    Refill,
    Selection,
    SelectOutcome,
    StorageError,
    Transition,
    aggregate,
    plan_rescue,
)
from .base import apply_transition as apply

__all__ = ["LeaseTimes", "RecordStore", "RescueSeen"]

_T = TypeVar("_T")
#: What the backend keeps per job (read from storage: a private copy or the record).
R = TypeVar("R")
#: One staged write.
W = TypeVar("W")
#: What a backend notes of a job before it moves (to update its index entries after).
P = TypeVar("P")

#: A lease record's (first_seen_at, renewed_at, expires_at).
LeaseTimes = tuple[datetime, datetime, datetime]
#: Jobs a rescue read: id, status, assignee and ``assigned_at`` as read (the compare-and-set).
RescueSeen = list[tuple[str, JobStatus, str, datetime | None]]
_NO_IDS: frozenset[str] = frozenset()
_new_object = object.__new__


class RecordStore(Backend, Generic[R, W, P]):
    """A :class:`Backend` over records and indexes kept by this process alone."""

    #: (``Backend._carry_calls``: ``_run`` awaits a worker thread's future, or nothing;
    #: a subclass whose calls await under an ``asyncio.timeout`` sets it False.)
    _carry_calls = True

    # --- the storage interface ------------------------------------------------------

    @abc.abstractmethod
    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` as one atomic step against the store."""

    @abc.abstractmethod
    def _read(self, job_id: str) -> R | None:
        """The record of ``job_id`` (staged moves change it), or ``None``."""

    @abc.abstractmethod
    def _job(self, record: R) -> Job:
        """The job of ``record``."""

    @abc.abstractmethod
    def _snapshot(self, record: R) -> Job:
        """A copy of the job of ``record`` that the caller may keep."""

    @abc.abstractmethod
    def _exists(self, job_id: str) -> bool:
        """Whether ``job_id`` is stored (committed)."""

    @abc.abstractmethod
    def _stage(self) -> W:
        """Open a write."""

    @abc.abstractmethod
    def _commit(self, w: W) -> None:
        """Write everything staged in ``w`` at once (or raise, writing nothing)."""

    @abc.abstractmethod
    def _stage_insert(self, w: W, jobs: Sequence[Job]) -> None:
        """Stage new jobs (ids distinct and not stored), in enqueue order."""

    def _before_move(self, w: W, record: R) -> P:
        """Note what the job's index entries depend on, just before it moves (a hook
        of :meth:`_stage_move`: a backend that overrides that needs neither)."""
        raise NotImplementedError

    def _after_move(self, w: W, record: R, prior: P, transition: Transition) -> None:
        """Stage the job just moved by ``transition``, and its index changes (a hook
        of :meth:`_stage_move`)."""
        raise NotImplementedError

    @abc.abstractmethod
    def _stage_remove(self, w: W, record: R) -> None:
        """Stage the deletion of the job and of all its index entries."""

    @abc.abstractmethod
    def _moved(self, record: R, new: JobStatus) -> Moved:
        """The :class:`Moved` of a job just moved to ``new``."""

    @abc.abstractmethod
    def _claim(self, assignee_id: str, tags: Sequence[str], limit: int, now: datetime) -> list[Job]:
        """:meth:`Backend.claim`, as one atomic step (a write of its own)."""

    @abc.abstractmethod
    def _everything(self, transition: Transition | None) -> list[R]:
        """Every job ``transition`` might move (``None``: every job)."""

    @abc.abstractmethod
    def _assignee_ids(self, assignee_id: str) -> Iterable[str]:
        """Ids of the RUNNING/CANCELLING jobs of ``assignee_id``."""

    @abc.abstractmethod
    def _smallest_tag_ids(self, tags: Sequence[str]) -> Iterable[str]:
        """Ids of every job of the tag among ``tags`` with the fewest jobs."""

    @abc.abstractmethod
    def _completed_ids(self, cutoff: datetime) -> list[str]:
        """Ids of the COMPLETED jobs finalized at or before ``cutoff``."""

    @abc.abstractmethod
    def _kept_counts(self, tags: Sequence[str]) -> tuple[dict[JobStatus, int], int] | None:
        """Counts kept up to date for ``tags`` (at least for no tags), else ``None``."""

    @abc.abstractmethod
    def _lease_rows(self, assignee_id: str | None = None) -> list[LeaseRow]:
        """Every lease record (of ``assignee_id`` only, if given)."""

    @abc.abstractmethod
    def _lease(self, assignee_id: str, holder: str) -> LeaseTimes | None:
        """One lease record's times."""

    @abc.abstractmethod
    def _stage_lease(self, w: W, assignee_id: str, holder: str, times: LeaseTimes | None) -> None:
        """Stage a lease record's new times (``None``: delete it)."""

    @abc.abstractmethod
    def _has_active(self, assignee_id: str, w: W) -> bool:
        """Whether ``assignee_id`` has a RUNNING/CANCELLING job once ``w`` is written."""

    # --- shared pieces --------------------------------------------------------------

    def _existing(self, ids: Iterable[str]) -> Iterator[R]:
        """The records of ``ids``, which an index names: each must exist."""
        read = self._read
        for job_id in ids:
            record = read(job_id)
            if record is None:
                raise StorageError(f"an index names job {job_id!r}, which has no record")
            yield record

    def _read_existing(self, ids: Iterable[str]) -> list[R]:
        return list(self._existing(list(ids)))

    def _with_all_tags(self, tags: Sequence[str]) -> Iterator[R]:
        wanted = set(tags)
        for record in self._existing(self._smallest_tag_ids(tags)):
            if wanted.issubset(self._job(record).tags):
                yield record

    def _select(self, selection: Selection, transition: Transition | None) -> list[R]:
        """The selected records, each once (ids first, in input order)."""
        if selection.everything:
            return self._everything(transition)
        if selection.assignee_id is not None:
            return self._read_existing(self._assignee_ids(selection.assignee_id))
        chosen: dict[str, R] = {}
        for job_id in selection.job_ids:
            if job_id not in chosen:
                record = self._read(job_id)
                if record is not None:
                    chosen[job_id] = record
        if selection.tags:
            for record in self._with_all_tags(selection.tags):
                chosen.setdefault(self._job(record).id, record)
        return list(chosen.values())

    def _stage_move(
        self,
        w: W,
        record: R,
        transition: Transition,
        now: datetime,
        result: bytes | None = None,
        error_message: str | None = None,
        assignee_id: str | None = None,
        scheduled_at: datetime | None = None,
        max_attempts: int | None = None,
    ) -> JobStatus | None:
        """Move the job by ``transition`` (``None``: its status does not allow it).

        (Hot callers pass its arguments by position, and it passes ``apply()`` its by
        position: binding keywords costs a search of the parameter names each, and a
        dictionary lookup for each keyword-only one left out. An override keeps the
        parameters in this order, none keyword-only.)"""
        job = self._job(record)
        if job.status not in transition._targets:  # (``target_of``, without the call)
            return None
        prior = self._before_move(w, record)
        new = apply(
            job,
            transition,
            now,
            result,
            error_message,
            assignee_id,
            scheduled_at,
            max_attempts,
        )
        self._after_move(w, record, prior, transition)
        return new

    def _stage_refill(self, w: W, refill: Refill, limit: int, now: datetime) -> list[Job] | None:
        """Stage the claim for ``refill`` in the apply's write ``w`` (one write for the
        call), returning the jobs claimed; ``None`` if the backend does not (then
        :meth:`_claim_for_refill` claims after the apply is written)."""
        return None

    def _claim_for_refill(self, refill: Refill, limit: int, now: datetime) -> list[Job]:
        """The claim an apply makes for its :class:`Refill` (a backend may soften its
        failures: the apply is written by then)."""
        return self._claim(refill.assignee_id, refill.tags, limit, now)

    # --- the algorithms (each one atomic step, run by ``_run``) -----------------------

    def _insert_jobs(self, jobs: list[Job]) -> None:
        for job in jobs:
            if self._exists(job.id):
                raise DuplicateJobError(job.id)
        self._write_new(jobs)

    def _insert_new_jobs(self, jobs: list[Job]) -> list[str]:
        fresh = [job for job in jobs if not self._exists(job.id)]
        if type(jobs) is CheckedJobs:  # (still the queue's private copies)
            fresh = CheckedJobs(fresh)
        self._write_new(fresh)
        return [job.id for job in fresh]

    def _write_new(self, jobs: list[Job]) -> None:
        if jobs:
            w = self._stage()
            self._stage_insert(w, jobs)
            self._commit(w)

    #: Optional: a job's COMPLETE move staged and its :class:`Moved` made in one call,
    #: ``(w, record, now, result, error_message)``, or ``None`` to take the general
    #: path (:meth:`_stage_move` and :meth:`_moved`) for this job. Every drained job
    #: makes this move: a backend that keeps records in this process can save the
    #: general path's two calls per job.
    _stage_complete: Callable[[W, R, datetime, bytes | None, str | None], Moved | None] | None = (
        None
    )

    def _apply_changes(
        self, changes: Sequence[Change], now: datetime, refill: Refill | None
    ) -> ApplyOutcome:
        # (its fields set on a bare instance: no frame of the dataclass's ``__init__``,
        # whose default factories are three calls more, per call)
        out: ApplyOutcome = _new_object(ApplyOutcome)
        moved: list[Moved] = []
        errors: dict[str, JobPoolError] = {}
        out.moved, out.errors = moved, errors
        read, stage_move, moved_of = self._read, self._stage_move, self._moved
        complete = self._stage_complete
        #: Jobs of the refill's stream, and how many of them left RUNNING/CANCELLING
        #: (``refill_limit``, counted here: no generator per call).
        mine = refill.job_ids if refill is not None else _NO_IDS
        freed = 0
        w = self._stage()
        for change in changes:
            # (one unpacking: a named tuple's field by name is a descriptor call each)
            job_id, transition, result, message, scheduled_at, max_attempts, assigned_at = change
            record = read(job_id)
            if record is None:
                errors[job_id] = JobNotFoundError(job_id)
                continue
            if transition is COMPLETE and complete is not None:
                done = complete(w, record, now, result, message)
                if done is not None:
                    moved.append(done)
                    if job_id in mine:
                        freed += 1
                    continue
            if transition.guarded and self._job(record).assigned_at != assigned_at:
                errors[job_id] = InvalidTransitionError(  # assigned again since
                    job_id, self._job(record).status, transition.target
                )
                continue
            # (by position: per job)
            new = stage_move(
                w, record, transition, now, result, message, None, scheduled_at, max_attempts
            )
            if new is None:  # not moved: the job is as it was
                errors[job_id] = InvalidTransitionError(
                    job_id, self._job(record).status, transition.target
                )
            else:
                moved.append(moved_of(record, new))
                if new not in ACTIVE and job_id in mine:
                    freed += 1
        limit = 0 if refill is None else refill.extra + freed
        claimed = None
        if limit:
            assert refill is not None
            claimed = self._stage_refill(w, refill, limit, now)
        if moved or claimed:  # (a refill's ``extra`` claims even if nothing moved)
            self._commit(w)
        if claimed is not None:
            out.claimed = claimed
        elif limit:
            assert refill is not None
            # A write of its own after the apply's, in the same step (the backend did
            # not stage it in the apply's write, which would have to see its moves).
            out.claimed = self._claim_for_refill(refill, limit, now)
        else:
            out.claimed = []
        return out

    def _apply_selection(
        self,
        transition: Transition,
        selection: Selection,
        now: datetime,
        report_unmatched: bool,
        scheduled_at: datetime | None,
    ) -> SelectOutcome:
        out = SelectOutcome()
        selected = self._select(selection, transition)
        if report_unmatched:
            present = {self._job(record).id for record in selected}
            out.missing = [i for i in dict.fromkeys(selection.job_ids) if i not in present]
            out.unmatched.extend(out.missing)
        w = self._stage()
        stage_move = self._stage_move
        for record in selected:
            new = stage_move(w, record, transition, now, None, None, None, scheduled_at)
            if new is None:
                if report_unmatched:
                    out.unmatched.append(self._job(record).id)
            else:
                out.moved.append(self._moved(record, new))
        if out.moved:
            self._commit(w)
        return out

    def _get_jobs(self, job_ids: list[str]) -> list[Job]:
        out = []
        for job_id in job_ids:
            record = self._read(job_id)
            if record is not None:
                out.append(self._snapshot(record))
        return out

    def _count_by_status(self, tags: list[str]) -> tuple[dict[JobStatus, int], int]:
        kept = self._kept_counts(tags)
        if kept is not None:
            return kept
        counts: Counter[JobStatus] = Counter()
        retries = 0
        for record in self._with_all_tags(tags):
            job = self._job(record)
            counts[job.status] += 1
            retries += job.retry_count
        return dict(counts), retries

    def _delete(self, selection: Selection) -> int:
        selected = self._select(selection, None)
        not_final = [job.id for job in map(self._job, selected) if not job.status.is_final]
        if not_final:
            raise JobsNotFinalError(not_final)
        return self._remove(selected)

    def _delete_completed(self, cutoff: datetime) -> int:
        expired = self._read_existing(self._completed_ids(cutoff))
        for record in expired:
            job = self._job(record)
            if job.status is not JobStatus.COMPLETED:
                raise StorageError(f"completed index names job {job.id!r} out of step")
        return self._remove(expired)

    def _remove(self, records: list[R]) -> int:
        if records:
            w = self._stage()
            for record in records:
                self._stage_remove(w, record)
            self._commit(w)
        return len(records)

    def _renew(
        self, holder: str, renew: list[str], release: list[str], lease: timedelta, now: datetime
    ) -> None:
        w = self._stage()
        expires = now + lease
        for assignee in renew:
            old = self._lease(assignee, holder)
            self._stage_lease(w, assignee, holder, (old[0] if old else now, now, expires))
        for assignee in release:
            self._stage_lease(w, assignee, holder, None)
        self._commit(w)

    def _expired(self, assignee_id: str, now: datetime) -> bool:
        return all(row[4] <= now for row in self._lease_rows(assignee_id))

    def _rescue_read(
        self, now: datetime, forget_after: timedelta
    ) -> tuple[RescueSeen, tuple[tuple[str, str], ...]]:
        plan = plan_rescue(self._lease_rows(), now, forget_after)
        seen: RescueSeen = []
        for assignee in sorted(plan.expired):
            for record in self._read_existing(self._assignee_ids(assignee)):
                job = self._job(record)
                seen.append((job.id, job.status, assignee, job.assigned_at))
        return seen, plan.forget

    def _rescue_write(
        self,
        seen: RescueSeen,
        forget: tuple[tuple[str, str], ...],
        now: datetime,
        cutoff: datetime,
        max_attempts: int | None,
    ) -> list[Moved]:
        """The compare-and-set: only jobs exactly as read, of assignees still expired."""
        w = self._stage()
        moved: list[Moved] = []
        expired: dict[str, bool] = {}
        for job_id, status, assignee, assigned_at in seen:
            if assignee not in expired:
                expired[assignee] = self._expired(assignee, now)
            record = self._read(job_id) if expired[assignee] else None
            if record is None:
                continue
            job = self._job(record)
            if (
                job.status is status
                and job.assignee_id == assignee
                and job.assigned_at == assigned_at
            ):
                new = self._stage_move(w, record, LEASE_EXPIRED, now, max_attempts=max_attempts)
                assert new is not None
                moved.append(self._moved(record, new))
        forgot = False
        for assignee, holder in forget:
            times = self._lease(assignee, holder)
            if times is None or times[2] >= cutoff:
                continue
            if self._expired(assignee, now) and self._has_active(assignee, w):
                continue  # an expired assignee is forgotten only once it has no job
            self._stage_lease(w, assignee, holder, None)
            forgot = True
        if moved or forgot:
            self._commit(w)
        return moved

    # --- the contract ---------------------------------------------------------------

    async def insert(self, jobs: Sequence[Job]) -> None:
        await self._run(self._insert_jobs, _as_list(jobs))

    async def insert_new(self, jobs: Sequence[Job]) -> list[str]:
        return await self._run(self._insert_new_jobs, _as_list(jobs))

    async def claim(
        self, assignee_id: str, tags: Sequence[str], limit: int, now: datetime
    ) -> list[Job]:
        return await self._run(self._claim, assignee_id, list(tags), limit, now)

    def apply(
        self, changes: Sequence[Change], now: datetime, refill: Refill | None = None
    ) -> Coroutine[Any, Any, ApplyOutcome]:
        """:meth:`Backend.apply`: ``_run``'s coroutine itself (no coroutine of its own
        around it, whose frame every step of a call that suspends passes through)."""
        return self._run(self._apply_changes, list(changes), now, refill)

    async def apply_selected(
        self,
        transition: Transition,
        selection: Selection,
        now: datetime,
        *,
        report_unmatched: bool = False,
        scheduled_at: datetime | None = None,
    ) -> SelectOutcome:
        return await self._run(
            self._apply_selection, transition, selection, now, report_unmatched, scheduled_at
        )

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        return await self._run(self._get_jobs, list(job_ids))

    async def count_by_status(self, tags: Sequence[str]) -> tuple[dict[JobStatus, int], int]:
        return await self._run(self._count_by_status, list(tags))

    async def delete(self, selection: Selection) -> int:
        return await self._run(self._delete, selection)

    async def delete_completed_before(self, cutoff: datetime) -> int:
        return await self._run(self._delete_completed, cutoff)

    async def renew_leases(
        self,
        holder: str,
        renew: Sequence[str],
        release: Sequence[str],
        lease: timedelta,
        now: datetime,
    ) -> None:
        await self._run(self._renew, holder, list(renew), list(release), lease, now)

    async def list_leases(self) -> list[Lease]:
        return aggregate(await self._run(self._lease_rows))

    async def rescue_expired(
        self, now: datetime, forget_after: timedelta, max_attempts: int | None = None
    ) -> list[Moved]:
        seen, forget = await self._run(self._rescue_read, now, forget_after)
        if not seen and not forget:
            return []
        await self._after_rescue_read()  # no await at all in memory unless a test set the hook
        return await self._run(
            self._rescue_write, seen, forget, now, now - forget_after, max_attempts
        )


def _as_list(jobs: Sequence[Job]) -> list[Job]:
    """``jobs`` as a list of their own: a queue's :class:`CheckedJobs` as they are (a
    backend may keep those ``Job`` objects: ``_stage_insert`` sees the type), any
    other sequence copied into a new list."""
    if type(jobs) is CheckedJobs:
        return jobs
    return list(jobs)
