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
  for :meth:`list_jobs` pages (RUNNING and CANCELLING jobs, few and moving twice
  in every job's life, are sorted from the active index when asked).

A bulk insert adds its entries to each index in one ``SortedList.update``. The
listings of every job, per status and per type, and the completed index, read only
by listings, stats pages and TTL cleanups but changed by every job's insert or
moves, are :class:`_Lazy`: an insert or a move only notes its change (by job id: no
tuple), and a read applies them all.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, Generic, TypeVar

from sortedcontainers import SortedList

from ._records import LeaseTimes, RecordStore
from .base import (
    ACTIVE,
    ASSIGN,
    ELIGIBLE,
    ApplyOutcome,
    Change,
    CheckedJobs,
    DuplicateJobError,
    Job,
    JobState,
    JobStatus,
    LeaseRow,
    ListQuery,
    Moved,
    Refill,
    Transition,
)

__all__ = ["MemoryBackend"]

_T = TypeVar("_T")
_new_tuple = tuple.__new__
#: Module constants: ``JobStatus.X`` is a slow class-attribute lookup on Python 3.11.
_COMPLETED = JobStatus.COMPLETED
_RUNNING = JobStatus.RUNNING
_INITIAL_PENDING = JobStatus.INITIAL_PENDING
_new_object = object.__new__
_key_id = operator.itemgetter(3)
_ABSENT = object()
#: Whether a claim may make ASSIGN's move itself (inline, per job): it moves every
#: eligible status to RUNNING, setting the assignment and counting an attempt, and
#: nothing else (no retry counted, no exhaustion, no schedule, result or message).
_ASSIGN_INLINE = (
    ASSIGN.assign
    and ASSIGN._targets == dict.fromkeys(ELIGIBLE, _RUNNING)
    and not ASSIGN._exhausts
    and not ASSIGN.retry_sources
    and not ASSIGN.reopens
    and not ASSIGN.schedules
    and not ASSIGN.keeps_message
)
if not _ASSIGN_INLINE:
    raise ImportError("MemoryBackend's inline ASSIGN no longer matches the table")
_Key = tuple[int, datetime, int, str]
_WaitKey = tuple[datetime, int, str]
_Listed = tuple[datetime, str]


#: How an index entry is added: at once (:func:`_add_now`) or by :class:`_Additions`.
_Add = Callable[[Any, Any], None]


def _add_now(index: SortedList[Any] | _Taken[Any], value: Any) -> None:
    index.add(value)


class _Additions:
    """Index entries collected per index, then added with one ``SortedList.update``
    each: for a batch that is large next to the index, one sort instead of an
    insertion per entry (a bulk enqueue's cost)."""

    __slots__ = ("_by_index",)

    def __init__(self) -> None:
        self._by_index: dict[int, tuple[SortedList[Any] | _Taken[Any], list[Any]]] = {}

    def add(self, index: SortedList[Any] | _Taken[Any], value: Any) -> None:
        self.adder(index)(value)

    def adder(self, index: SortedList[Any] | _Taken[Any]) -> Callable[[Any], None]:
        """What adds an entry to ``index`` (a list's ``append``: no frame per entry)."""
        entry = self._by_index.get(id(index))
        if entry is None:
            entry = self._by_index[id(index)] = (index, [])
        return entry[1].append

    def update(self) -> None:
        for index, values in self._by_index.values():
            index.update(values)


def _sorted_adder(index: SortedList[Any] | _Taken[Any]) -> Callable[[Any], None]:
    return index.add


_E = TypeVar("_E", bound=tuple[Any, ...])


class _Taken(Generic[_E]):
    """A :class:`SortedList` of distinct entries whose first ``_taken`` entries were
    taken from its head (claimed) but not yet deleted: deleting a claim's entries
    one by one costs two Python calls each (``SortedList._pos`` and ``_delete``), so
    a claim only moves the mark, and the taken entries go together once they are an
    eighth of the list (one rebuild, ``SortedList.__delitem__``'s rule for a large
    slice). Every entry not taken is greater than every taken one (an addition that
    would land among them deletes them first), so the entries are those after the
    mark, in order."""

    __slots__ = ("_sorted", "_taken")

    def __init__(self) -> None:
        self._sorted: SortedList[_E] = SortedList()
        self._taken = 0

    def __len__(self) -> int:
        return len(self._sorted) - self._taken

    def __iter__(self) -> Iterator[_E]:
        return self._sorted.islice(self._taken)

    def add(self, value: _E) -> None:
        if self._taken and value <= self._sorted[self._taken - 1]:
            self._drop_taken()
        self._sorted.add(value)

    def update(self, values: Iterable[_E]) -> None:
        values = list(values)
        if self._taken and values and min(values) <= self._sorted[self._taken - 1]:
            self._drop_taken()
        self._sorted.update(values)

    def remove(self, value: _E) -> None:
        """Remove an entry (not a taken one: those are no entries any more)."""
        self._sorted.remove(value)

    def take(self, limit: int) -> list[_E]:
        """Take the first ``limit`` entries (fewer if there are fewer)."""
        taken = self._taken
        values = self._sorted[taken : taken + limit]
        taken += len(values)
        if 2 * taken >= len(self._sorted):
            # (one rebuild, or a clear: at half, not at SortedList's own eighth, as a
            # rebuild sorts what is left: taking a list's entries costs one rebuild's
            # comparisons in all, not seven)
            del self._sorted[:taken]
            taken = 0
        self._taken = taken
        return values

    def _drop_taken(self) -> None:
        del self._sorted[: self._taken]
        self._taken = 0


class _Lazy(Generic[_E]):
    """A :class:`SortedList` of entries, at most one per job id, whose additions and
    removals wait in two dicts by job id until it is read (:meth:`sorted`): an index
    that every job's moves change but few calls read costs a dict operation per
    move, not a sorted insertion (a drained job moves through three such entries).

    An addition keeps only the entry's value (the ``entry`` function makes the entry
    of an id and its value when it is read: no tuple per move); a removal keeps the
    whole entry (its job may be gone by the read). A job's pending addition is its
    current entry, as a job leaves an index before it enters it again."""

    __slots__ = ("_adds", "_entry", "_removes", "_sorted")

    def __init__(self, entry: Callable[[str, Any], _E]) -> None:
        self._sorted: SortedList[_E] = SortedList()
        self._entry = entry
        self._adds: dict[str, Any] = {}
        self._removes: dict[str, _E] = {}

    def __len__(self) -> int:
        # (every removal noted is of an entry in the list; no addition noted is)
        return len(self._sorted) + len(self._adds) - len(self._removes)

    def add(self, job_id: str, value: Any) -> None:
        removes = self._removes
        if removes and removes.get(job_id) == self._entry(job_id, value):
            del removes[job_id]  # removed, not yet applied: it stays
        else:
            self._adds[job_id] = value

    def add_all(self, values: dict[str, Any]) -> None:
        if self._removes:
            for job_id, value in values.items():
                self.add(job_id, value)
        else:
            self._adds.update(values)

    def remove(self, job_id: str, entry: _E) -> None:
        if self._adds.pop(job_id, _ABSENT) is _ABSENT:  # (added, not yet applied: never was)
            self._removes[job_id] = entry

    def sorted(self) -> SortedList[_E]:
        """The entries, with every noted change applied."""
        current = self._sorted
        removes = self._removes
        if removes:
            if 8 * len(removes) < len(current):
                for value in removes.values():
                    current.remove(value)
            else:  # one pass instead of many removals
                gone = set(removes.values())
                current = self._sorted = SortedList(v for v in current if v not in gone)
            self._removes = {}
        if self._adds:
            entry = self._entry
            current.update([entry(job_id, value) for job_id, value in self._adds.items()])
            self._adds = {}
        return current


def _completed_entry(seqs: dict[str, int], job_id: str, finalized_at: datetime) -> _WaitKey:
    """The completed index's entry: ``(finalized_at, enqueue sequence, id)``."""
    return (finalized_at, seqs[job_id], job_id)


def _listed_entry(job_id: str, created_at: datetime) -> _Listed:
    """A listing's entry: ``(created_at, id)``."""
    return (created_at, job_id)


def _records_of(jobs: Sequence[Job]) -> list[Job]:
    """The records to store for new ``jobs``: a queue's checked copies as they are
    (nothing else refers to them), else a copy of each (a caller's own objects must
    not become records: changing one would change the store)."""
    if type(jobs) is CheckedJobs:
        return jobs
    return [job.copy() for job in jobs]


class MemoryBackend(RecordStore[Job, None, None]):
    """Jobs kept in this process's memory; gone when the process ends.

    The records are the stored jobs themselves; staging changes them and their
    indexes at once (no ``await`` until the call returns), so commit has nothing left
    to do."""

    #: (Its records are the checked copies; each claim or read hands out a copy.)
    _takes_no_tags = True

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        #: ``_read`` is the dict's own ``get``: no Python call per job read.
        self._read = self._jobs.get  # type: ignore[method-assign, assignment]
        self._seq: dict[str, int] = {}
        self._next_seq = 0
        self._eligible: _Taken[_Key] = _Taken()
        self._eligible_by_tag: dict[str, SortedList[_Key]] = {}
        self._ids_by_tag: dict[str, set[str]] = {}
        self._active_by_assignee: dict[str, set[str]] = {}
        #: (Its additions keep ``finalized_at``: the entry is made with the job's
        #: enqueue sequence number, when read.)
        self._completed: _Lazy[_WaitKey] = _Lazy(functools.partial(_completed_entry, self._seq))
        #: Eligible jobs not yet due: by due time, and each one's due time.
        self._waiting: SortedList[_WaitKey] = SortedList()
        self._wait_until: dict[str, datetime] = {}
        #: A plain dict, every status in it (a ``Counter``'s item reads and writes, a
        #: subclass's, are not the interpreter's specialized ones: four per drained job).
        self._counts: dict[JobStatus, int] = dict.fromkeys(JobStatus, 0)
        self._retries = 0
        self._listed: _Lazy[_Listed] = _Lazy(_listed_entry)
        #: Every job by ``(created_at, id)`` per status, but RUNNING and CANCELLING.
        self._listed_by_status: dict[JobStatus, _Lazy[_Listed]] = {
            s: _Lazy(_listed_entry) for s in JobStatus if s not in ACTIVE
        }
        self._listed_by_type: dict[str, _Lazy[_Listed]] = {}
        self._listed_by_tag: dict[str, SortedList[_Listed]] = {}
        #: Lease records: (assignee, holder) -> (first_seen_at, renewed_at, expires_at).
        self._leases: dict[tuple[str, str], LeaseTimes] = {}

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
        # (Every waiting entry's job is in ``_wait_until``: an empty dict says no entry
        # waits with no ``SortedList.__len__`` call, once or twice per batch.)
        if not self._wait_until:
            return None
        return self._waiting[0][0] if self._waiting else None

    def _promote(self, now: datetime) -> None:
        """Move the waiting jobs due at ``now`` into the eligible indexes (nothing else
        changes: status, counts and listing entries stay)."""
        waiting = self._waiting
        end = waiting.bisect_right((now, float("inf"), ""))  # type: ignore[arg-type]
        due = list(waiting.islice(0, end))
        del waiting[:end]
        new = _Additions()
        for _, _, job_id in due:
            del self._wait_until[job_id]
            self._index_eligible(self._jobs[job_id], new.add)
        new.update()

    def _index_eligible(self, job: Job, add: _Add) -> None:
        key = self._key(job)
        add(self._eligible, key)
        for tag in job.tags:
            by_tag = self._eligible_by_tag.get(tag)
            if by_tag is None:
                by_tag = self._eligible_by_tag[tag] = SortedList()
            add(by_tag, key)

    def _before_move(self, w: None, record: Job) -> None:
        """Take the job out of the indexes of its status (before it moves, or goes)."""
        job = record
        status = job.status
        self._counts[status] -= 1
        self._retries -= job.retry_count
        if status in ACTIVE:  # listed from the active index when asked (see _listed_in)
            self._active_by_assignee[job.assignee_id].discard(job.id)
            return
        self._listed_by_status[status].remove(job.id, (job.created_at, job.id))
        if status in ELIGIBLE:
            wait = self._wait_until.get(job.id)
            if wait is not None:
                self._waiting.remove((wait, self._seq[job.id], job.id))
                return
            key = self._key(job)
            self._eligible.remove(key)
            for tag in job.tags:
                self._eligible_by_tag[tag].remove(key)
        elif status is _COMPLETED:
            assert job.finalized_at is not None
            self._completed.remove(job.id, (job.finalized_at, self._seq[job.id], job.id))

    def _after_move(
        self,
        w: None,
        record: Job,
        prior: None = None,
        transition: Transition | None = None,
        add: _Add = _add_now,
    ) -> None:
        """Put the job in the indexes of its status: just moved by ``transition``, or
        new (``None``: its due time is set already; entries added by ``add``)."""
        job = record
        status = job.status
        if transition is not None:
            if status not in ELIGIBLE:
                if self._wait_until:
                    self._wait_until.pop(job.id, None)
            elif transition.schedules:
                if job.scheduled_at is None:
                    self._wait_until.pop(job.id, None)
                else:
                    self._wait_until[job.id] = job.scheduled_at
        self._counts[status] += 1
        self._retries += job.retry_count
        if status in ACTIVE:
            active = self._active_by_assignee.get(job.assignee_id)
            if active is None:
                active = self._active_by_assignee[job.assignee_id] = set()
            active.add(job.id)
            return
        # (``_Lazy.add``, inline here and below: per job)
        job_id = job.id
        lazy = self._listed_by_status[status]
        removes = lazy._removes
        if removes and removes.get(job_id) == (job.created_at, job_id):
            del removes[job_id]
        else:
            lazy._adds[job_id] = job.created_at
        if status in ELIGIBLE:
            wait = self._wait_until.get(job_id)
            if wait is not None:
                add(self._waiting, (wait, self._seq[job_id], job_id))
                return
            self._index_eligible(job, add)
        elif status is _COMPLETED:
            finalized = job.finalized_at
            assert finalized is not None
            gone = self._completed._removes
            if gone and gone.get(job_id) == (finalized, self._seq[job_id], job_id):
                del gone[job_id]
            else:
                self._completed._adds[job_id] = finalized

    def _stage_complete(
        self,
        w: None,
        record: Job,
        now: datetime,
        result: bytes | None,
        error_message: str | None,
    ) -> Moved | None:
        """:attr:`RecordStore._stage_complete`: a RUNNING job's COMPLETE move (that of
        every drained job) and its :class:`Moved`, in one frame (``_before_move``,
        ``apply``, ``_after_move`` and ``_moved`` of COMPLETE from RUNNING, inline: it
        counts no retry and touches no eligible or waiting index); ``None`` for a job
        in another status."""
        job = record
        if job.status is not _RUNNING:
            return None
        job_id = job.id
        self._active_by_assignee[job.assignee_id].discard(job_id)
        job.finalized_at = now
        if result is not None:
            job.result = result
        if error_message is not None:
            job.error_message = error_message
        job.status = _COMPLETED
        counts = self._counts
        counts[_RUNNING] -= 1
        counts[_COMPLETED] += 1
        if self._wait_until:
            self._wait_until.pop(job_id, None)
        # (``_Lazy.add``, inline, as in ``_after_move``)
        lazy = self._listed_by_status[_COMPLETED]
        removes = lazy._removes
        if removes and removes.get(job_id) == (job.created_at, job_id):
            del removes[job_id]
        else:
            lazy._adds[job_id] = job.created_at
        gone = self._completed._removes
        if gone and gone.get(job_id) == (now, self._seq[job_id], job_id):
            del gone[job_id]
        else:
            self._completed._adds[job_id] = now
        # (``tuple.__new__``: no frame for the named tuple's ``__new__``)
        return _new_tuple(Moved, (job_id, _COMPLETED, job.assigned_at, (), None))

    def _listed_in(self, status: JobStatus) -> SortedList[_Listed]:
        """The ``(created_at, id)`` of every job in ``status``. RUNNING and CANCELLING
        jobs are few (each held in a stream's slot, or by a caller it handed them to)
        and move twice in every job's life: they are sorted when asked, not kept sorted
        (two index updates fewer per job)."""
        if status not in ACTIVE:
            return self._listed_by_status[status].sorted()
        jobs = self._jobs
        return SortedList(
            (job.created_at, job.id)
            for ids in self._active_by_assignee.values()
            for job in map(jobs.__getitem__, ids)
            if job.status is status
        )

    # --- the record store (see _records) --------------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return fn(*args)  # never awaits: one atomic step on the event loop

    def _read(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)  # (replaced per instance by ``_jobs.get`` itself)

    def _job(self, record: Job) -> Job:
        return record

    def _snapshot(self, record: Job) -> Job:
        return record.copy()

    def _exists(self, job_id: str) -> bool:
        return job_id in self._jobs

    def _stage(self) -> None:
        return None

    def _commit(self, w: None) -> None:
        return None

    def _stage_insert(self, w: None, jobs: Sequence[Job]) -> None:
        # A batch large next to the store: one SortedList.update per index instead of
        # an insertion per entry (smaller ones: the insertions are cheaper).
        new = _Additions() if 4 * len(jobs) >= len(self._jobs) else None
        add = _add_now if new is None else new.add
        # What adds to an index, looked up once per batch, not per job.
        adder: Callable[[SortedList[Any] | _Taken[Any]], Callable[[Any], None]] = (
            _sorted_adder if new is None else new.adder
        )
        add_eligible = adder(self._eligible)
        jobs_by_id, seqs, wait_until = self._jobs, self._seq, self._wait_until
        #: The new entries of the listings (lazy: by id), every job's and each type's.
        listed_new: dict[str, datetime] = {}
        typed_new: dict[str, dict[str, datetime]] = {}
        pending: dict[str, datetime] = {}
        retries = 0
        seq = self._next_seq
        for stored in jobs:  # (the records: copies made by ``insert``/``insert_new``)
            job_id = stored.id
            jobs_by_id[job_id] = stored
            seqs[job_id] = seq
            created = stored.created_at
            listed_new[job_id] = created
            typed = typed_new.get(stored.job_type)
            if typed is None:
                typed = typed_new[stored.job_type] = {}
            typed[job_id] = created
            if stored.scheduled_at is not None:
                wait_until[job_id] = stored.scheduled_at
            listed = (created, job_id)
            for tag in stored.tags:
                self._ids_by_tag.setdefault(tag, set()).add(job_id)
                by_tag = self._listed_by_tag.get(tag)
                if by_tag is None:
                    by_tag = self._listed_by_tag[tag] = SortedList()
                add(by_tag, listed)
            if stored.status is not _INITIAL_PENDING or stored.tags or stored.scheduled_at:
                self._after_move(None, stored, None, None, add)
            else:  # (``_after_move``'s indexing of a new job, inline: the common case)
                pending[job_id] = stored.created_at
                retries += stored.retry_count
                due = stored.last_retry_at  # (``sort_key``, inline: no schedule here)
                if due is None:
                    due = stored.created_at
                add_eligible((-stored.priority, due, seq, job_id))
            seq += 1
        self._next_seq = seq
        self._counts[_INITIAL_PENDING] += len(pending)
        self._retries += retries
        self._listed_by_status[_INITIAL_PENDING].add_all(pending)
        self._listed.add_all(listed_new)
        for job_type, typed in typed_new.items():
            by_type = self._listed_by_type.get(job_type)
            if by_type is None:
                by_type = self._listed_by_type[job_type] = _Lazy(_listed_entry)
            by_type.add_all(typed)
        if new is not None:
            new.update()

    async def claim(
        self, assignee_id: str, tags: Sequence[str], limit: int, now: datetime
    ) -> list[Job]:
        # (``RecordStore.claim`` with ``_run``'s call, inline: no coroutine of its own)
        return self._claim(assignee_id, list(tags), limit, now)

    async def apply(
        self, changes: Sequence[Change], now: datetime, refill: Refill | None = None
    ) -> ApplyOutcome:
        # (``RecordStore.apply``, as ``claim``; nothing can change ``changes`` meanwhile:
        # no copy of them either)
        return self._apply_changes(changes, now, refill)

    async def insert(self, jobs: Sequence[Job]) -> None:
        # (``RecordStore.insert``, run at once, with ``_exists`` inline: per job)
        records = _records_of(jobs)
        stored = self._jobs
        for job in records:
            if job.id in stored:
                raise DuplicateJobError(job.id)
        self._write_new(records)

    async def insert_new(self, jobs: Sequence[Job]) -> list[str]:
        return self._insert_new_jobs(_records_of(jobs))

    def _stage_remove(self, w: None, record: Job) -> None:
        job = record
        self._before_move(w, job)
        listed = (job.created_at, job.id)
        self._listed.remove(job.id, listed)
        by_type = self._listed_by_type[job.job_type]
        by_type.remove(job.id, listed)
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

    def _moved(self, record: Job, new: JobStatus) -> Moved:
        job = record
        if new not in ELIGIBLE:  # tags and due time matter only to wake streams
            # (``tuple.__new__``: no frame for the named tuple's ``__new__``, per job)
            return _new_tuple(Moved, (job.id, new, job.assigned_at, (), None))
        return Moved(job.id, new, job.assigned_at, tuple(job.tags), self._wait_until.get(job.id))

    def _everything(self, transition: Transition | None) -> list[Job]:
        if transition is not None and transition.sources <= ACTIVE:
            return [self._jobs[i] for ids in self._active_by_assignee.values() for i in ids]
        return list(self._jobs.values())

    def _assignee_ids(self, assignee_id: str) -> Iterable[str]:
        return self._active_by_assignee.get(assignee_id, ())

    def _smallest_tag_ids(self, tags: Sequence[str]) -> Iterable[str]:
        return min((self._ids_by_tag.get(t, set()) for t in tags), key=len)

    def _completed_ids(self, cutoff: datetime) -> list[str]:
        completed = self._completed.sorted()
        end = completed.bisect_right((cutoff, float("inf"), ""))  # type: ignore[arg-type]
        return [job_id for _, _, job_id in completed[:end]]

    def _kept_counts(self, tags: Sequence[str]) -> tuple[dict[JobStatus, int], int] | None:
        if tags:
            return None
        return {s: n for s, n in self._counts.items() if n}, self._retries

    def _claim(self, assignee_id: str, tags: Sequence[str], limit: int, now: datetime) -> list[Job]:
        if self._wait_until and self._waiting and self._waiting[0][0] <= now:
            self._promote(now)
        jobs = self._jobs
        eligible = self._eligible
        if tags:
            index = min((self._eligible_by_tag.get(t) or SortedList() for t in tags), key=len)
            wanted = set(tags)
            picked: list[Job] = []
            keys: list[_Key] = []
            for key in index:
                job = jobs[key[3]]
                if wanted.issubset(job.tags):
                    picked.append(job)
                    keys.append(key)
                    if len(picked) >= limit:
                        break
            for key in keys:
                eligible.remove(key)
        else:  # the head of the eligible index (taken from it at once)
            keys = eligible.take(limit)
            picked = list(map(jobs.__getitem__, map(_key_id, keys)))
        if not picked:
            return []
        # The move of ASSIGN, with the index changes of each job made here at once: the
        # picked jobs are due and eligible (in no waiting index).
        counts, listed, active = (
            self._counts,
            self._listed_by_status,
            self._active_by_assignee,
        )
        mine = active.get(assignee_id)
        if mine is None:
            mine = active[assignee_id] = set()
        by_tag = self._eligible_by_tag
        out: list[Job] = []
        for job, key in zip(picked, keys):  # noqa: B905 (as many; a keyword is parsed per call)
            status = job.status
            job_id = job.id
            # (``_Lazy.remove``, inline: per job)
            lazy = listed[status]
            if lazy._adds.pop(job_id, None) is None:
                lazy._removes[job_id] = (job.created_at, job_id)
            tags = job.tags
            for tag in tags:
                by_tag[tag].remove(key)
            # The move of ASSIGN (``apply``, inline: per job; checked at import against
            # the table, see ``_ASSIGN_INLINE``). It counts no retry.
            job.assignee_id = assignee_id
            job.assigned_at = now
            job.attempts += 1
            if job.started_at is None:
                job.started_at = now
            job.status = _RUNNING
            counts[status] -= 1
            counts[_RUNNING] += 1
            mine.add(job_id)
            # (``Job.copy``, inline: per job; ``test_a_claim_hands_out_copies_of_every_field``)
            copy: Job = _new_object(Job)
            copy.id = job_id
            copy.job_type = job.job_type
            copy.job_definition = job.job_definition
            copy.tags = [*tags]  # (no call of ``list``: per job)
            copy.status = job.status
            copy.created_at = job.created_at
            copy.started_at = job.started_at
            copy.finalized_at = job.finalized_at
            copy.error_message = job.error_message
            copy.result = job.result
            copy.retry_count = job.retry_count
            copy.last_retry_at = job.last_retry_at
            copy.assignee_id = job.assignee_id
            copy.assigned_at = job.assigned_at
            copy.scheduled_at = job.scheduled_at
            copy.priority = job.priority
            copy.max_attempts = job.max_attempts
            copy.attempts = job.attempts
            out.append(copy)
        return out

    async def job_states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        out: dict[str, JobState] = {}
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is not None:
                out[job_id] = JobState(job.status, job.assigned_at)
        return out

    async def list_jobs(self, query: ListQuery) -> list[Job]:
        def newest_first(index: SortedList[_Listed]) -> Iterator[_Listed]:
            end = len(index) if query.before is None else index.bisect_left(query.before)
            return index.islice(0, end, reverse=True)

        keys: Iterable[_Listed]
        if query.tags:  # the tag with the fewest jobs
            index = min(
                (self._listed_by_tag.get(t) or SortedList() for t in query.tags),
                key=len,
            )
            keys = newest_first(index)
        elif query.statuses:
            keys = heapq.merge(
                *(newest_first(self._listed_in(s)) for s in query.statuses),
                reverse=True,
            )
        elif query.job_type is not None:
            by_type = self._listed_by_type.get(query.job_type)
            keys = newest_first(by_type.sorted() if by_type is not None else SortedList())
        else:
            keys = newest_first(self._listed.sorted())
        jobs = (self._jobs[job_id] for _, job_id in keys)
        return [job.copy() for job in itertools.islice(filter(query.matches, jobs), query.limit)]

    async def oldest_created(self, statuses: frozenset[JobStatus]) -> datetime | None:
        lists = [self._listed_in(s) for s in statuses]
        firsts = [listed[0][0] for listed in lists if listed]
        return min(firsts, default=None)

    # --- leases ---------------------------------------------------------------------

    def _lease_rows(self, assignee_id: str | None = None) -> list[LeaseRow]:
        return [
            (a, h, *times)
            for (a, h), times in self._leases.items()
            if assignee_id is None or a == assignee_id
        ]

    def _lease(self, assignee_id: str, holder: str) -> LeaseTimes | None:
        return self._leases.get((assignee_id, holder))

    def _stage_lease(
        self, w: None, assignee_id: str, holder: str, times: LeaseTimes | None
    ) -> None:
        if times is None:
            self._leases.pop((assignee_id, holder), None)
        else:
            self._leases[(assignee_id, holder)] = times

    def _has_active(self, assignee_id: str, w: None) -> bool:
        return bool(self._active_by_assignee.get(assignee_id))
