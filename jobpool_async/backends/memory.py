"""In-process backend: plain dicts and sorted indexes, for tests and demos.

Every method runs without awaiting, so each call is atomic on the event loop.
Indexes kept in step with the records:

* due eligible jobs in selection order ``(-priority, sort_key, seq)``, globally
  and per tag, so a claim reads only eligible jobs (never finished ones, never
  ones scheduled for later);
* eligible jobs waiting for their ``scheduled_at``, by that time: a claim first
  promotes those that have come due into the index above;
* all job ids per tag (stats, cancel and delete by tags);
* active jobs per assignee (``mark_worker_unresponsive``);
* completed jobs by ``finalized_at`` (TTL cleanup);
* counts per status and the retry sum (stats without tags in O(1));
* every job by ``(created_at, id)``, globally, per status, per type and per tag,
  for :meth:`list_jobs` pages.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta

from sortedcontainers import SortedList

from .base import (
    ACTIVE,
    ASSIGN,
    ELIGIBLE,
    LEASE_EXPIRED,
    ApplyOutcome,
    Backend,
    Change,
    DuplicateJobError,
    InvalidTransitionError,
    Job,
    JobNotFoundError,
    JobsNotFinalError,
    JobState,
    JobStatus,
    Lease,
    LeaseRow,
    ListQuery,
    Moved,
    Refill,
    Selection,
    SelectOutcome,
    Transition,
    aggregate,
    plan_rescue,
    refill_limit,
)
from .base import (
    apply_transition as apply,
)

__all__ = ["MemoryBackend"]

_Key = tuple[int, datetime, int, str]
_WaitKey = tuple[datetime, int, str]
_Listed = tuple[datetime, str]


class MemoryBackend(Backend):
    """Jobs kept in this process's memory; gone when the process ends."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._seq: dict[str, int] = {}
        self._next_seq = 0
        self._eligible: SortedList[_Key] = SortedList()
        self._eligible_by_tag: dict[str, SortedList[_Key]] = {}
        self._ids_by_tag: dict[str, set[str]] = {}
        self._active_by_assignee: dict[str, set[str]] = {}
        self._completed: SortedList[_WaitKey] = SortedList()
        #: Eligible jobs not yet due: by due time, and each one's due time.
        self._waiting: SortedList[_WaitKey] = SortedList()
        self._wait_until: dict[str, datetime] = {}
        self._counts: Counter[JobStatus] = Counter()
        self._retries = 0
        self._listed: SortedList[_Listed] = SortedList()
        self._listed_by_status: dict[JobStatus, SortedList[_Listed]] = {
            s: SortedList() for s in JobStatus
        }
        self._listed_by_type: dict[str, SortedList[_Listed]] = {}
        self._listed_by_tag: dict[str, SortedList[_Listed]] = {}
        #: Lease records: (assignee, holder) -> (first_seen_at, renewed_at, expires_at).
        self._leases: dict[tuple[str, str], tuple[datetime, datetime, datetime]] = {}

    def __repr__(self) -> str:
        return f"MemoryBackend(jobs={len(self._jobs)}, id={id(self):#x})"

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    # --- index maintenance --------------------------------------------------------

    def _key(self, job: Job) -> _Key:
        return (-job.priority, job.sort_key, self._seq[job.id], job.id)

    def next_due(self) -> datetime | None:
        return self._waiting[0][0] if self._waiting else None

    def _promote(self, now: datetime) -> None:
        """Move the waiting jobs due at ``now`` into the eligible indexes."""
        waiting = self._waiting
        while waiting and waiting[0][0] <= now:
            _, _, job_id = waiting[0]
            job = self._jobs[job_id]
            self._unindex(job)
            del self._wait_until[job_id]
            self._index(job)

    def _unindex(self, job: Job) -> None:
        self._counts[job.status] -= 1
        self._listed_by_status[job.status].remove((job.created_at, job.id))
        self._retries -= job.retry_count
        if job.status in ELIGIBLE:
            wait = self._wait_until.get(job.id)
            if wait is not None:
                self._waiting.remove((wait, self._seq[job.id], job.id))
                return
            key = self._key(job)
            self._eligible.remove(key)
            for tag in job.tags:
                self._eligible_by_tag[tag].remove(key)
        elif job.status in ACTIVE:
            self._active_by_assignee[job.assignee_id].discard(job.id)
        elif job.status is JobStatus.COMPLETED:
            assert job.finalized_at is not None
            self._completed.remove((job.finalized_at, self._seq[job.id], job.id))

    def _index(self, job: Job) -> None:
        self._counts[job.status] += 1
        self._listed_by_status[job.status].add((job.created_at, job.id))
        self._retries += job.retry_count
        if job.status in ELIGIBLE:
            wait = self._wait_until.get(job.id)
            if wait is not None:
                self._waiting.add((wait, self._seq[job.id], job.id))
                return
            key = self._key(job)
            self._eligible.add(key)
            for tag in job.tags:
                self._eligible_by_tag.setdefault(tag, SortedList()).add(key)
        elif job.status in ACTIVE:
            self._active_by_assignee.setdefault(job.assignee_id, set()).add(job.id)
        elif job.status is JobStatus.COMPLETED:
            assert job.finalized_at is not None
            self._completed.add((job.finalized_at, self._seq[job.id], job.id))

    def _move(
        self,
        job: Job,
        transition: Transition,
        now: datetime,
        *,
        result: bytes | None = None,
        error_message: str | None = None,
        assignee_id: str | None = None,
        scheduled_at: datetime | None = None,
        max_attempts: int | None = None,
    ) -> JobStatus | None:
        if transition.target_of(job.status) is None:
            return None
        self._unindex(job)
        new = apply(
            job,
            transition,
            now,
            result=result,
            error_message=error_message,
            assignee_id=assignee_id,
            scheduled_at=scheduled_at,
            max_attempts=max_attempts,
        )
        if new not in ELIGIBLE:
            self._wait_until.pop(job.id, None)
        elif transition.schedules:
            if job.scheduled_at is None:
                self._wait_until.pop(job.id, None)
            else:
                self._wait_until[job.id] = job.scheduled_at
        self._index(job)
        return new

    def _moved(self, job: Job, new: JobStatus) -> Moved:
        return Moved(job.id, new, job.assigned_at, tuple(job.tags), self._wait_until.get(job.id))

    def _with_all_tags(self, tags: Sequence[str]) -> Iterator[Job]:
        sets = [self._ids_by_tag.get(t, set()) for t in tags]
        smallest = min(sets, key=len)
        wanted = set(tags)
        for job_id in smallest:
            job = self._jobs[job_id]
            if wanted.issubset(job.tags):
                yield job

    def _select(self, selection: Selection) -> Iterable[Job]:
        if selection.everything:
            return list(self._jobs.values())
        if selection.assignee_id is not None:
            ids = self._active_by_assignee.get(selection.assignee_id, set())
            return [self._jobs[i] for i in ids]
        chosen: dict[str, Job] = {}
        for job_id in selection.job_ids:
            if job_id in self._jobs:
                chosen[job_id] = self._jobs[job_id]
        if selection.tags:
            for job in self._with_all_tags(selection.tags):
                chosen.setdefault(job.id, job)
        return list(chosen.values())

    # --- the contract -------------------------------------------------------------

    async def insert(self, jobs: Sequence[Job]) -> None:
        seen: set[str] = set()
        for job in jobs:
            if job.id in self._jobs or job.id in seen:
                raise DuplicateJobError(job.id)
            seen.add(job.id)
        for job in jobs:
            stored = job.copy()
            self._jobs[stored.id] = stored
            self._seq[stored.id] = self._next_seq
            self._next_seq += 1
            listed = (stored.created_at, stored.id)
            self._listed.add(listed)
            self._listed_by_type.setdefault(stored.job_type, SortedList()).add(listed)
            if stored.scheduled_at is not None:
                self._wait_until[stored.id] = stored.scheduled_at
            for tag in stored.tags:
                self._ids_by_tag.setdefault(tag, set()).add(stored.id)
                self._listed_by_tag.setdefault(tag, SortedList()).add(listed)
            self._index(stored)

    async def insert_new(self, jobs: Sequence[Job]) -> list[str]:
        fresh: dict[str, Job] = {}
        for job in jobs:
            if job.id not in self._jobs and job.id not in fresh:
                fresh[job.id] = job
        await self.insert(list(fresh.values()))
        return list(fresh)

    async def claim(
        self, assignee_id: str, tags: Sequence[str], limit: int, now: datetime
    ) -> list[Job]:
        if self._waiting and self._waiting[0][0] <= now:
            self._promote(now)
        if tags:
            index = min((self._eligible_by_tag.get(t) or SortedList() for t in tags), key=len)
            wanted = set(tags)
        else:
            index, wanted = self._eligible, set()
        picked: list[Job] = []
        for _, _, _, job_id in index:
            job = self._jobs[job_id]
            if wanted.issubset(job.tags):
                picked.append(job)
                if len(picked) >= limit:
                    break
        for job in picked:
            self._move(job, ASSIGN, now, assignee_id=assignee_id)
        return [job.copy() for job in picked]

    async def apply(
        self, changes: Sequence[Change], now: datetime, refill: Refill | None = None
    ) -> ApplyOutcome:
        out = ApplyOutcome()
        for change in changes:
            job = self._jobs.get(change.job_id)
            if job is None:
                out.errors[change.job_id] = JobNotFoundError(change.job_id)
                continue
            current = job.status
            new = self._move(
                job,
                change.transition,
                now,
                result=change.result,
                error_message=change.error_message,
                scheduled_at=change.scheduled_at,
                max_attempts=change.max_attempts,
            )
            if new is None:
                out.errors[change.job_id] = InvalidTransitionError(
                    change.job_id, current, change.transition.target
                )
            else:
                out.moved.append(self._moved(job, new))
        if refill is not None:
            limit = refill_limit(refill, out.moved)
            if limit:  # no await in between: one atomic step on the event loop
                out.claimed = await self.claim(refill.assignee_id, refill.tags, limit, now)
        return out

    async def apply_selected(
        self,
        transition: Transition,
        selection: Selection,
        now: datetime,
        *,
        report_unmatched: bool = False,
        scheduled_at: datetime | None = None,
    ) -> SelectOutcome:
        out = SelectOutcome()
        if report_unmatched:
            out.missing = [i for i in dict.fromkeys(selection.job_ids) if i not in self._jobs]
            out.unmatched.extend(out.missing)
        for job in self._select(selection):
            new = self._move(job, transition, now, scheduled_at=scheduled_at)
            if new is None:
                if report_unmatched:
                    out.unmatched.append(job.id)
            else:
                out.moved.append(self._moved(job, new))
        return out

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        return [self._jobs[i].copy() for i in job_ids if i in self._jobs]

    async def job_states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        out: dict[str, JobState] = {}
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is not None:
                out[job_id] = JobState(job.status, job.assigned_at)
        return out

    async def count_by_status(self, tags: Sequence[str]) -> tuple[dict[JobStatus, int], int]:
        if not tags:
            return {s: n for s, n in self._counts.items() if n}, self._retries
        counts: Counter[JobStatus] = Counter()
        retries = 0
        for job in self._with_all_tags(tags):
            counts[job.status] += 1
            retries += job.retry_count
        return dict(counts), retries

    def _remove(self, job: Job) -> None:
        self._unindex(job)
        listed = (job.created_at, job.id)
        self._listed.remove(listed)
        by_type = self._listed_by_type[job.job_type]
        by_type.remove(listed)
        if not by_type:
            del self._listed_by_type[job.job_type]
        for tag in job.tags:
            ids = self._ids_by_tag[tag]
            ids.discard(job.id)
            self._listed_by_tag[tag].remove(listed)
            if not ids:
                del self._ids_by_tag[tag]
                del self._listed_by_tag[tag]
                self._eligible_by_tag.pop(tag, None)
        del self._jobs[job.id]
        del self._seq[job.id]

    async def delete(self, selection: Selection) -> int:
        selected = list(self._select(selection))
        not_final = [job.id for job in selected if not job.status.is_final]
        if not_final:
            raise JobsNotFinalError(not_final)
        for job in selected:
            self._remove(job)
        return len(selected)

    async def delete_completed_before(self, cutoff: datetime) -> int:
        end = self._completed.bisect_right((cutoff, float("inf"), ""))  # type: ignore[arg-type]
        expired = [self._jobs[job_id] for _, _, job_id in self._completed[:end]]
        for job in expired:
            self._remove(job)
        return len(expired)

    async def list_jobs(self, query: ListQuery) -> list[Job]:
        def newest_first(index: SortedList[_Listed]) -> Iterator[_Listed]:
            end = len(index) if query.before is None else index.bisect_left(query.before)
            return index.islice(0, end, reverse=True)

        keys: Iterable[_Listed]
        if query.tags:  # the tag with the fewest jobs
            index = min((self._listed_by_tag.get(t) or SortedList() for t in query.tags), key=len)
            keys = newest_first(index)
        elif query.statuses:
            keys = heapq.merge(
                *(newest_first(self._listed_by_status[s]) for s in query.statuses), reverse=True
            )
        elif query.job_type is not None:
            keys = newest_first(self._listed_by_type.get(query.job_type) or SortedList())
        else:
            keys = newest_first(self._listed)
        jobs = (self._jobs[job_id] for _, job_id in keys)
        return [job.copy() for job in itertools.islice(filter(query.matches, jobs), query.limit)]

    async def oldest_created(self, statuses: frozenset[JobStatus]) -> datetime | None:
        firsts = [self._listed_by_status[s][0][0] for s in statuses if self._listed_by_status[s]]
        return min(firsts, default=None)

    # --- leases ---------------------------------------------------------------------

    def _lease_rows(self) -> list[LeaseRow]:
        return [(a, h, *times) for (a, h), times in self._leases.items()]

    async def renew_leases(
        self,
        holder: str,
        renew: Sequence[str],
        release: Sequence[str],
        lease: timedelta,
        now: datetime,
    ) -> None:
        for assignee in renew:
            old = self._leases.get((assignee, holder))
            self._leases[(assignee, holder)] = (old[0] if old else now, now, now + lease)
        for assignee in release:
            self._leases.pop((assignee, holder), None)

    async def list_leases(self) -> list[Lease]:
        return aggregate(self._lease_rows())

    def _expired(self, assignee: str, at: datetime) -> bool:
        return all(t[2] <= at for (a, _), t in self._leases.items() if a == assignee)

    async def rescue_expired(
        self, now: datetime, forget_after: timedelta, max_attempts: int | None = None
    ) -> list[Moved]:
        plan = plan_rescue(self._lease_rows(), now, forget_after)
        seen = [
            (job, job.status, job.assignee_id, job.assigned_at)
            for assignee in plan.expired
            for job in (self._jobs[i] for i in self._active_by_assignee.get(assignee, ()))
        ]
        if not seen and not plan.forget:
            return []
        await self._after_rescue_read()  # no await at all unless a test set the hook
        moved: list[Moved] = []
        for job, status, assignee, assigned_at in seen:
            if (
                self._jobs.get(job.id) is job
                and job.status is status
                and job.assignee_id == assignee
                and job.assigned_at == assigned_at
                and self._expired(assignee, now)
            ):
                new = self._move(job, LEASE_EXPIRED, now, max_attempts=max_attempts)
                assert new is not None
                moved.append(self._moved(job, new))
        cutoff = now - forget_after
        for key in plan.forget:
            times = self._leases.get(key)
            if times is None or times[2] >= cutoff:
                continue
            assignee = key[0]
            if self._expired(assignee, now) and self._active_by_assignee.get(assignee):
                continue  # an expired assignee is forgotten only once it has no job
            del self._leases[key]
        return moved
