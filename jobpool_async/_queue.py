"""``PoolQueue`` (the manager logic) and ``JobStream`` (assignment to a consumer).

The queue validates input, asks its backend to make each move in one call, and
reads the :class:`~jobpool_async.backends.base.Moved` records that come back to
free stream slots and wake the streams that can now take a job. It never decides
a move itself: that is the transition table's job, applied by the backend.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import operator
import warnings
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

from ._clock import Clock, SystemClock, TimerHandle
from ._eager import carry, note_handed, start
from ._errors import (
    BatchError,
    DuplicateJobError,
    JobNotFoundError,
    QueueClosedError,
    StorageError,
)
from ._leases import DEFAULT_LEASE, Lease, LeaseKeeper, check_lease
from ._listing import JobPage, ListQuery, encode_cursor
from ._models import (
    ACTIVE,
    ELIGIBLE,
    FINAL,
    CancelResult,
    CheckedJobs,
    Job,
    JobStats,
    JobStatus,
    check_aware,
    check_bytes,
    check_delay,
    check_id,
    check_ids,
    check_message,
    check_new_job,
    check_seconds,
    check_tags,
    check_ttl,
    noted_schedules,
    noted_tags,
)
from ._notifier import Notifier, Subscription
from ._retry import RetryPolicy
from ._tracing import traced_enqueue
from ._transitions import (
    ACK_EXECUTING,
    ACK_NOT_EXECUTING,
    CANCEL,
    COMPLETE,
    DISCARD,
    FAIL,
    MARK_UNKNOWN_STOPPED,
    RELEASE,
    REQUEUE,
    STOP,
    STOP_WITH_RETRY,
    UPDATE_TO,
    WORKER_LOST,
    Transition,
)
from .backends.base import (
    ApplyOutcome,
    Backend,
    Change,
    Moved,
    Refill,
    Selection,
    SelectOutcome,
)

__all__ = ["JobStream", "PoolQueue"]

logger = logging.getLogger("jobpool_async")

RELEASE_MESSAGE = "stream closed before the job was handed to its consumer"

CancelListener = Callable[[str], None]
_NOT_HELD = object()
_new_tuple = tuple.__new__
#: ``JobStatus.X`` is a slow class-attribute lookup on Python 3.11: hot paths use this.
_CANCELLING = JobStatus.CANCELLING
_Outcome = TypeVar("_Outcome", ApplyOutcome, SelectOutcome)
_VALIDATE_CHUNK = 2000
_id = operator.attrgetter("id")
_tags = operator.attrgetter("tags")
_scheduled_at = operator.attrgetter("scheduled_at")


class PoolQueue:
    """The job queue: submit jobs, stream them to workers, move them through their life.

    Owns its backend: ``close()`` closes it. All methods are safe to call
    concurrently from many tasks.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        poll_interval: float | None = None,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
        lease: timedelta | float | None = DEFAULT_LEASE,
    ) -> None:
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy or None, got {type(retry).__name__}")
        if clock is not None and not (
            callable(getattr(clock, "now", None)) and callable(getattr(clock, "call_at", None))
        ):
            raise TypeError(f"clock must have now() and call_at(), got {type(clock).__name__}")
        if not isinstance(backend, Backend):
            raise TypeError(f"backend must be a Backend, got {type(backend).__name__}")
        self._backend = backend
        self._poll_interval = (
            check_seconds(poll_interval, "poll_interval")
            if poll_interval is not None
            else backend.default_poll_interval
        )
        self._notifier = Notifier()
        self._holders: dict[str, JobStream] = {}
        self._streams: set[JobStream] = set()
        #: Streams waiting in ``__anext__`` with a free slot (their last claim found none).
        self._hungry = 0
        self._opened = False
        self._open_lock = asyncio.Lock()
        self._closed = False
        self._close_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._retry = retry
        self._clock: Clock = clock if clock is not None else SystemClock()
        #: The time now: for the system clock, ``datetime.now(UTC)`` itself (no frames
        #: of ``SystemClock.now`` and ``utcnow`` in each call: one or two per batch).
        self._now: Callable[[], datetime] = (
            functools.partial(datetime.now, UTC)
            if type(self._clock) is SystemClock
            else self._clock.now
        )
        #: The one timer: set for the earliest time a waiting job comes due.
        self._timer: TimerHandle | None = None
        self._timer_at: datetime | None = None
        #: The event loop the queue was opened in; every call must come from it.
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Warns (ResourceWarning) if the queue is dropped or the interpreter exits
        #: while it is open; detached by ``close()``.
        self._unclosed: weakref.finalize[Any, Any] | None = None
        #: ``wait_for`` callers by job id: set when that job may have moved or gone.
        self._waiters: dict[str, set[asyncio.Event]] = {}
        clean_lease = check_lease(lease)
        #: The memory backend's ``apply``, which finishes without suspending, if it is
        #: the backend's (else a function no ``apply`` is): while the backend's
        #: ``apply`` is it (not replaced since, as a test's fault injection does), it is
        #: awaited as it is, not run by ``start`` (whose ``send`` of a call that
        #: finishes raises StopIteration: an exception made and caught per batch), as
        #: nothing can come between its start and its end.
        self._at_once: object = _apply_at_once(backend)
        #: Whether a backend call that suspends runs on in a task of its own (else in
        #: its caller's: ``_eager.carry``), as a call awaiting under a timeout of its
        #: own must (an ``asyncio.timeout`` cancels the task it was entered in): unless
        #: the backend says its calls await plain futures only (``Backend._carry_calls``).
        self._in_task = not backend._carry_calls
        #: Keeps this queue's leases and rescues expired ones (None: leases off).
        self._leases = (
            LeaseKeeper(self, clean_lease)
            if clean_lease is not None and backend.supports_leases
            else None
        )

    def __repr__(self) -> str:
        return f"PoolQueue({self._backend!r})"

    # --- lifecycle ----------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def poll_interval(self) -> float | None:
        """Seconds between looks at shared storage; ``None``: never polls."""
        return self._poll_interval

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def retry(self) -> RetryPolicy | None:
        """The policy deciding a failed job's delay when ``fail_job`` gets none."""
        return self._retry

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def lease(self) -> timedelta | None:
        """The lease this queue keeps on the assignees it streams for; ``None``: off."""
        return self._leases.lease if self._leases is not None else None

    async def open(self) -> None:
        """Open the backend. Called for you on first use or by ``async with``."""
        await self._ready()

    async def _ready(self) -> None:
        if self._closed:
            raise QueueClosedError("the queue is closed")
        if self._opened:
            if asyncio.get_running_loop() is not self._loop:
                self._wrong_loop()
            return
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop  # claimed before the first await: one loop opens it
        elif loop is not self._loop:
            self._wrong_loop()
        async with self._open_lock:
            if self._closed:
                raise QueueClosedError("the queue is closed")
            if not self._opened:
                try:
                    await self._backend.open()
                except BaseException:
                    self._loop = None  # nothing was opened: any loop may try again
                    raise
                self._backend.set_listener(self._on_backend_event)
                self._opened = True
                self._unclosed = weakref.finalize(self, _warn_unclosed, repr(self))

    def _check_loop(self) -> None:
        """Raise ``RuntimeError`` unless called from the loop the queue was opened in."""
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            self._wrong_loop()

    def _wrong_loop(self) -> None:
        here = asyncio.get_running_loop()
        raise RuntimeError(
            f"{self!r} belongs to the event loop {self._loop!r} (id {id(self._loop):#x}), "
            f"where it was opened, and cannot be used from another one ({here!r}, id "
            f"{id(here):#x}): its connections, threads' futures and wake-ups are bound to "
            "that loop. Open one queue per event loop (e.g. in the app's lifespan or a "
            "test fixture with the same loop scope as the test)."
        )

    async def __aenter__(self) -> Self:
        await self._ready()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """End every stream (giving back jobs not yet handed over) and close the backend."""
        self._check_loop()
        if self._unclosed is not None:
            self._unclosed.detach()
        if self._close_task is None:
            self._closed = True
            self._wake_waiters(None)
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        try:
            while self._streams:
                await asyncio.gather(
                    *(s.aclose() for s in list(self._streams)), return_exceptions=True
                )
        finally:
            self._cancel_timer()
            try:
                if self._leases is not None:
                    await self._leases.close()
            finally:
                # Streams still recorded as holding jobs (handed over, never finished)
                # refer to the queue: no cycle is left to keep it and its store alive.
                self._holders.clear()
                self._backend.set_listener(None)
                await self._backend.close()

    # --- waking -------------------------------------------------------------------

    def _wake_waiters(self, job_ids: Iterable[str] | None) -> None:
        """Tell ``wait_for`` callers of these jobs (of every job: ``None``) to look again."""
        waiters = self._waiters
        if not waiters:
            return
        if job_ids is None:
            events: Iterable[set[asyncio.Event]] = list(waiters.values())
        else:
            events = [w for w in map(waiters.get, job_ids) if w is not None]
        for group in events:
            for event in group:
                event.set()

    def _arm(self) -> None:
        """Set the queue's one timer for the earliest time a waiting job comes due.

        When it fires, every stream looks (its claim promotes the due jobs); then the
        next claim re-arms it for the next due time. No per-job timers, no polling."""
        due = self._backend.next_due()
        if due == self._timer_at or self._closed:
            return
        self._cancel_timer()
        if due is not None:
            self._timer_at = due
            self._timer = self._clock.call_at(due, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        if not self._closed:
            self._notifier.publish_soon(everyone=True)

    def _on_backend_event(self, moved: Sequence[Moved] | None) -> None:
        """Changes pushed by another process (e.g. PostgreSQL ``NOTIFY``)."""
        if self._closed:
            return
        self._arm()
        if moved is None:
            self._wake_waiters(None)
            for stream in list(self._streams):
                stream._recheck = True
            self._notifier.publish_soon(everyone=True)
            return
        task = asyncio.get_running_loop().create_task(self._observe(moved))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _observe(self, moved: Iterable[Moved]) -> None:
        """Free the slots of jobs that left RUNNING/CANCELLING; wake who can act now."""
        tagsets, freed = self._note(moved)
        if tagsets or freed:
            await self._notifier.publish(tagsets=tagsets, subs=freed)

    async def _observed(self, call: Coroutine[Any, Any, _Outcome]) -> _Outcome:
        """Run a backend call that moves jobs; its moves are noted when it finishes,
        before its caller resumes, and also if the caller was cancelled meanwhile
        (else a completed job would keep its stream's slot for ever). A call that
        finishes without suspending (memory) is noted at once, with no task."""
        started = start(call)
        if not started.done:
            try:
                outcome = await carry(started, self._in_task)
            except BaseException as exc:
                if started.task is not None:  # its caller gave up: it goes on in a task
                    started.task.add_done_callback(self._moves_done)
                    note_handed(exc, started.task)  # (a ``Worker``'s write: see ``_flush``)
                raise
        else:
            outcome = started.result()
        self._moves_seen(outcome)
        return outcome

    def _moves_done(
        self, task: asyncio.Future[ApplyOutcome] | asyncio.Future[SelectOutcome]
    ) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        self._moves_seen(task.result())

    def _moves_seen(self, outcome: ApplyOutcome | SelectOutcome) -> None:
        tagsets, freed = self._note(outcome.moved)
        self._notifier.publish_soon(tagsets=tagsets, subs=freed)

    def _note(self, moved: Iterable[Moved]) -> tuple[list[tuple[str, ...]], list[Subscription]]:
        """Free slots and tell cancel listeners (no await); return whom to wake.

        A move counts for a stream only if it is of that stream's assignment (the
        same ``assigned_at``): a move that a call made before another stream claimed
        the job again is seen late, and must not touch the new holder."""
        tagsets: list[tuple[str, ...]] = []
        freed: list[Subscription] = []
        if self._waiters:
            moved = list(moved)
            self._wake_waiters(m.job_id for m in moved)
        later = False
        holders = self._holders
        for job_id, status, assigned_at, tags, due_at in moved:
            stream = holders.get(job_id)  # (``_holder`` and ``_unhold``, inline: per job)
            if stream is not None and (
                (held_at := stream._held.get(job_id, _NOT_HELD)) is assigned_at
                or held_at == assigned_at  # (the same object, usually: no compare)
            ):
                if status not in ACTIVE:
                    del holders[job_id]
                    del stream._held[job_id]
                    if not freed or freed[-1] is not stream._sub:
                        freed.append(stream._sub)
                        if stream._ready:  # (once per stream and call: a flag)
                            stream._stale = True
                elif status is _CANCELLING:
                    stream._cancel_requested(job_id, assigned_at)
            if status in ELIGIBLE:
                if due_at is None:
                    tagsets.append(tags)
                else:  # wakes nobody now: the timer does when it comes due
                    later = True
        if later:
            self._arm()
        return tagsets, freed

    # --- who holds which assignment ------------------------------------------------

    def _holder(self, job_id: str, assigned_at: datetime | None) -> JobStream | None:
        """The stream holding this assignment of ``job_id`` (not just the id), if any."""
        stream = self._holders.get(job_id)
        if stream is not None and stream._held.get(job_id, _NOT_HELD) == assigned_at:
            return stream
        return None

    def _hold(self, stream: JobStream, job: Job) -> Subscription | None:
        """Record that ``stream`` was assigned ``job``. A claim ends every earlier
        assignment of the job (the store made it eligible first), so a stream still
        recorded as holding it loses it; returns that stream's subscription to wake."""
        previous = self._holders.get(job.id)
        self._holders[job.id] = stream
        stream._held[job.id] = job.assigned_at
        if stream._ready:  # (an assignment of a job waiting there may have ended)
            stream._stale = True
        if previous is None or previous is stream:
            return None
        previous._held.pop(job.id, None)
        if previous._ready:
            previous._stale = True
        return previous._sub

    def _unhold(self, stream: JobStream, job_id: str) -> None:
        del self._holders[job_id]
        del stream._held[job_id]
        if stream._ready:
            stream._stale = True

    def _drop(self, stream: JobStream, job_id: str, assigned_at: datetime | None) -> None:
        """Forget that ``stream`` holds this assignment of ``job_id`` (if it still does)."""
        if self._holder(job_id, assigned_at) is stream:
            self._unhold(stream, job_id)

    # --- submitting ---------------------------------------------------------------

    async def enqueue_job(self, job: Job, *, connection: object | None = None) -> str:
        """Store one new job; wake a stream that can take it. Returns its id."""
        return (await self.enqueue_jobs([job], connection=connection))[0]

    @traced_enqueue
    async def enqueue_jobs(
        self,
        jobs: Sequence[Job],
        *,
        connection: object | None = None,
        if_exists: Literal["error", "ignore"] = "error",
    ) -> list[str]:
        """Store new jobs all or nothing, in one transaction. Returns ids in input order.

        ``connection`` (PostgreSQL only; ``TypeError`` elsewhere): the caller's own
        asyncpg connection. The jobs are inserted inside the caller's transaction on
        it, so they exist if and only if that transaction commits, and streams in
        every process wake when it does (``NOTIFY`` is transactional).

        ``if_exists="ignore"`` skips jobs whose id exists (stored, or earlier in the
        batch) and returns only the ids it inserted.
        """
        if if_exists not in ("error", "ignore"):
            raise ValueError(f"if_exists must be 'error' or 'ignore', got {if_exists!r}")
        if connection is not None:
            self._backend.check_connection(connection)
        if isinstance(jobs, Job) or not isinstance(jobs, Iterable):
            raise TypeError(f"jobs must be a sequence of Job, got {type(jobs).__name__}")
        clean: list[Job] = CheckedJobs()  # (a backend may keep these copies as they are)
        given = iter(jobs)
        listed = itertools.repeat(not self._backend._takes_no_tags)  # (check_new_job's)
        schedules_mark, tags_mark = next(noted_schedules), next(noted_tags)
        while True:  # (chunks checked by ``map``: no loop of our own per job)
            chunk = list(map(check_new_job, itertools.islice(given, _VALIDATE_CHUNK), listed))
            clean += chunk
            if len(chunk) < _VALIDATE_CHUNK:
                break
            await asyncio.sleep(0)  # keep the event loop responsive for huge batches
        # (None counted since the mark: no job has one.)
        scheduled = next(noted_schedules) != schedules_mark + 1
        tagged = next(noted_tags) != tags_mark + 1
        distinct: list[str] | None = None  # (the ids, checked distinct: also returned)
        if if_exists == "error":  # backends take distinct ids: input arrives validated
            distinct = list(map(_id, clean))
            _check_distinct(clean, distinct)
        await self._ready()
        if not clean:
            return []
        ignore = if_exists == "ignore"
        if ignore:  # the first of each id, at its place; the backend skips those stored
            first: dict[str, Job] = {}
            for job in clean:
                first.setdefault(job.id, job)
            clean = CheckedJobs(first.values())
        if connection is not None:
            # Nobody may wake before the commit: the notification it sends does that.
            ids = set(await self._backend.insert_in(clean, connection, ignore=ignore))
            return [job.id for job in clean if job.id in ids]
        try:
            if ignore:
                ids = set(await self._backend.insert_new(clean))
                clean = [job for job in clean if job.id in ids]
            else:
                await self._backend.insert(clean)
        except DuplicateJobError:
            raise  # (all or nothing: none was written)
        except BaseException:
            # The write may have happened all the same: the caller cancelled at the
            # call's last suspension, or while a storage thread wrote, or the store
            # failed after its commit. Every stream looks (and the timer is set for a
            # schedule), as the publish below would have made the ones that match:
            # a look for nothing if nothing was written.
            if not self._closed:
                self._arm()
                self._notifier.publish_soon(everyone=True)
            raise
        tagsets: set[tuple[str, ...]]
        # (a datetime is true: some job has a schedule)
        if scheduled and any(map(_scheduled_at, clean)):
            now = self._now()
            tagsets = {
                tuple(job.tags)
                for job in clean
                if job.scheduled_at is None or job.scheduled_at <= now
            }
            self._arm()
        elif tagged and any(map(_tags, clean)):  # (no loop of our own per job)
            tagsets = set(map(tuple, map(_tags, clean)))
        else:  # (no tags at all: no tuple per job either)
            tagsets = {()}
        await self._notifier.publish(tagsets=tagsets)
        return distinct if distinct is not None else list(map(_id, clean))

    # --- streaming ----------------------------------------------------------------

    def stream_jobs(
        self, assignee_id: str, tags: Sequence[str] | None = None, max_assigned_jobs: int = 1
    ) -> JobStream:
        """A stream that assigns matching jobs to ``assignee_id``, at most
        ``max_assigned_jobs`` in RUNNING/CANCELLING at once."""
        check_id(assignee_id, "assignee_id")
        clean_tags = check_tags(tags)
        if isinstance(max_assigned_jobs, bool) or not isinstance(max_assigned_jobs, int):
            raise TypeError(
                f"max_assigned_jobs must be int, got {type(max_assigned_jobs).__name__}"
            )
        if max_assigned_jobs < 1:
            raise ValueError(f"max_assigned_jobs must be at least 1, got {max_assigned_jobs}")
        if self._closed:
            raise QueueClosedError("the queue is closed")
        stream = JobStream(self, assignee_id, clean_tags, max_assigned_jobs)
        self._streams.add(stream)
        if self._leases is not None:
            self._leases.add_stream(stream)
        return stream

    async def _assign(self, stream: JobStream, limit: int) -> list[Job]:
        await self._ready()
        jobs = await self._backend.claim(stream.assignee_id, stream.tags, limit, self._now())
        self._held_by(stream, jobs)
        if self._waiters:
            self._wake_waiters(job.id for job in jobs)
        if self._backend.next_due() != self._timer_at:
            self._arm()
        return jobs

    def _held_by(self, stream: JobStream, jobs: Sequence[Job]) -> None:
        """Record a claim's jobs for ``stream``; wake streams that lost a stale record."""
        lost = [sub for sub in (self._hold(stream, job) for job in jobs) if sub is not None]
        if lost:
            self._notifier.publish_soon(subs=lost)

    async def _release(self, stream: JobStream, jobs: Sequence[Job]) -> None:
        """Give back jobs assigned to ``stream`` but never handed to its caller.

        A job that already has an error message (the real error of an earlier run, or
        one set while the stream held it) keeps it: RELEASE writes its message only
        where the store has none, decided in the write, not from this stream's copy.
        """
        # Only assignments the stream still holds: one that ended meanwhile (moved by
        # another call, maybe claimed again by another stream) is no longer its to
        # give back. A re-claim by another process that this one has not seen yet is
        # caught by the store: RELEASE is guarded, a compare-and-set on ``assigned_at``.
        jobs = [job for job in jobs if self._holder(job.id, job.assigned_at) is stream]
        if not jobs:
            return
        changes = [
            Change(
                job.id,
                RELEASE,
                error_message=RELEASE_MESSAGE,
                assigned_at=job.assigned_at,
            )
            for job in jobs
        ]
        await self._observed(self._backend.apply(changes, self._now()))
        for job in jobs:  # moved elsewhere meanwhile: that assignment is over too
            self._drop(stream, job.id, job.assigned_at)
        logger.debug("stream %s released %d unhanded job(s)", stream.assignee_id, len(jobs))

    async def _refresh(self, stream: JobStream) -> None:
        """Shared storage: drop held jobs another process moved; see its cancellations."""
        held = dict(stream._held)
        if not held:
            return
        states = await self._backend.job_states(list(held))
        for job_id, assigned_at in held.items():
            state = states.get(job_id)
            if state is None or state.status not in ACTIVE or state.assigned_at != assigned_at:
                self._drop(stream, job_id, assigned_at)
            elif (
                state.status is JobStatus.CANCELLING and self._holder(job_id, assigned_at) is stream
            ):
                stream._cancel_requested(job_id, assigned_at)

    def _forget(self, stream: JobStream) -> None:
        self._streams.discard(stream)
        if self._leases is not None:
            self._leases.discard(stream)

    # --- lifecycle calls ----------------------------------------------------------

    async def _apply_one(self, change: Change) -> None:
        await self._ready()
        outcome = await self._apply([change])
        if outcome.errors:
            raise next(iter(outcome.errors.values()))

    async def _apply_many(self, changes: list[Change]) -> None:
        """Apply ``changes``; ``BatchError`` names those that could not move.

        Also called by a ``Worker`` with the COMPLETE changes it builds from checked
        values (ids from the store, results checked when recorded): no checks per job
        here."""
        if self._closed or not self._opened or asyncio.get_running_loop() is not self._loop:
            await self._ready()  # (its checks, inline above: no coroutine per call if open)
        if not changes:
            return
        outcome = await self._apply(changes)
        if outcome.errors:
            raise BatchError(outcome.errors)

    #: ``complete_jobs`` of COMPLETE changes a ``Worker`` built (see ``_apply_many``).
    _complete_checked = _apply_many

    async def _apply(self, changes: list[Change]) -> ApplyOutcome:
        """Apply ``changes`` and observe the moves.

        Where they free slots of an open stream, the backend claims that stream's next
        jobs in the same call (a :class:`Refill`), whether or not the stream is waiting
        in ``__anext__`` yet: the jobs wait in the stream (in the slots just freed) for
        its next ``__anext__``, which then needs no round trip of its own. So a loop
        that completes each batch before asking for the next costs one storage call
        per batch, as a ``Worker`` does. Of several streams, one waiting wins.
        """
        stream: JobStream | None = None
        ids: list[str] = []
        holders = self._holders
        for change in changes:
            job_id = change[0]  # (``job_id``, by index: per job)
            holder = holders.get(job_id)
            if holder is stream:  # (the usual case: checked already, as the first)
                if holder is not None:
                    ids.append(job_id)
            elif (
                holder is not None
                and holder._refills
                and not holder._closed
                and (stream is None or (holder._waiting and not stream._waiting))
            ):
                stream = holder
                ids = [job_id]
        if stream is None or (self._hungry and not stream._waiting):
            # (A stream waiting with a free slot gets the jobs freed or made eligible
            # first: it wakes and claims them, rather than a stream not yet asking.)
            apply = self._backend.apply
            if getattr(apply, "__func__", None) is self._at_once:  # (as ``_observed``'s
                outcome = await apply(changes, self._now())  # call that finished at once)
                self._moves_seen(outcome)
                return outcome
            return await self._observed(self._backend.apply(changes, self._now()))
        # Slots free already are the refill's too (a stream given fewer jobs than its
        # slots would otherwise stay at that batch size), unless the stream is in a
        # claim of its own for them: ``__anext__`` holds its lock while not waiting.
        extra = 0
        if stream._waiting or not stream._lock.locked():
            extra = max(0, stream.max_assigned_jobs - stream._used())
        # (``tuple.__new__``: no frame for the named tuple's ``__new__``, per batch)
        refill = _new_tuple(Refill, (stream.assignee_id, stream.tags, frozenset(ids), extra))
        apply = self._backend.apply
        if getattr(apply, "__func__", None) is self._at_once:  # (as a call that finished
            try:  # at once, below)
                outcome = await apply(changes, self._now(), refill)
            finally:
                if extra:
                    self._notifier.publish_soon(subs=[stream._sub])
            self._refilled(stream, outcome)
            return outcome
        started = start(self._backend.apply(changes, self._now(), refill))
        if started.done:  # (memory) no task: nothing came between the call and this,
            # so no reservation was needed (none could be seen): as ``_refill_ended``
            # with reservations that held no slot
            if extra:
                self._notifier.publish_soon(subs=[stream._sub])
            outcome = started.result()
            self._refilled(stream, outcome)
            return outcome
        # The slots of these assignments are the refill's until it is seen, even if
        # the stream learns sooner that they ended: else it could fill them twice.
        # (Made once the call's first step ran, before any other task can run.)
        reserved = list(zip(ids, map(stream._held.__getitem__, ids), strict=True))  # (no loop
        stream._reserve(reserved)  # of our own per job)
        stream._extra += extra
        stream._carrying += 1  # aclose() waits for it, so its jobs are never stranded
        try:
            outcome = await carry(started, self._in_task)
        except BaseException as exc:
            task = started.task
            if task is None:  # the call failed: its slots are the stream's again
                self._refill_ended(stream, reserved, extra)
            else:  # its caller gave up: it goes on in a task, which aclose() waits for
                stream._tasks.add(task)
                task.add_done_callback(
                    functools.partial(self._refill_done, stream, reserved, extra)
                )
                note_handed(exc, task)
            raise
        else:
            self._refill_ended(stream, reserved, extra)
            self._refilled(stream, outcome)
        finally:
            stream._carrying -= 1
            if stream._carried is not None and not stream._carrying:
                stream._carried_all()
        return outcome

    def _refill_done(
        self,
        stream: JobStream,
        reserved: list[tuple[str, datetime | None]],
        extra: int,
        task: asyncio.Task[ApplyOutcome],
    ) -> None:
        """Done callback of a refilling apply (runs even if its caller was cancelled)."""
        stream._tasks.discard(task)  # (``JobStream._track``'s, in the same callback)
        self._refill_ended(stream, reserved, extra)
        if not task.cancelled() and task.exception() is None:
            self._refilled(stream, task.result())

    def _refill_ended(
        self, stream: JobStream, reserved: list[tuple[str, datetime | None]], extra: int
    ) -> None:
        """A refilling apply ended (whether or not it was written): its slots are the
        stream's again."""
        stream._extra -= extra
        if stream._unreserve(reserved) or extra:  # slots that ended meanwhile are free now
            self._notifier.publish_soon(subs=[stream._sub])

    def _refilled(self, stream: JobStream, outcome: ApplyOutcome) -> None:
        """Observe a refilling apply's moves and hand its claimed jobs to the stream,
        or give them back."""
        # Moves first: a job the apply made eligible may be among those claimed.
        tagsets, freed = self._note(outcome.moved)
        holders, held = self._holders, stream._held
        for job in outcome.claimed:  # (``_hold``, inline: per job)
            job_id = job.id
            previous = holders.get(job_id)
            holders[job_id] = stream
            held[job_id] = job.assigned_at
            if previous is not None and previous is not stream:
                previous._held.pop(job_id, None)
                freed.append(previous._sub)
                if previous._ready:
                    previous._stale = True
        if self._backend.next_due() != self._timer_at:
            self._arm()
        if outcome.claimed:
            if self._waiters:
                self._wake_waiters(job.id for job in outcome.claimed)
            if stream._closed:
                stream._track(asyncio.ensure_future(self._release(stream, outcome.claimed)))
            elif stream._ready or stream._handoff is None or not stream._handoff(outcome.claimed):
                if stream._ready:  # a job moved and claimed again before its hand-over:
                    again = {job.id for job in outcome.claimed}  # the later claim is it
                    stream._ready = [job for job in stream._ready if job.id not in again]
                stream._ready.extend(outcome.claimed)
                freed.append(stream._sub)
        if (
            freed
            and not stream._ready
            and stream._used() >= stream.max_assigned_jobs
            and stream._sub in freed
        ):
            # Its slots that the moves freed are full again (the jobs handed over, as
            # to a ``Worker``): woken, the stream would find nothing to do and wait
            # again (a task wake-up and a notifier wait per batch, for nothing).
            freed = [sub for sub in freed if sub is not stream._sub]
            if stream._hungry:  # it waits with no free slot now: not as one hungry
                stream._hungry = False  # (as it would wait again, had it woken)
                self._hungry -= 1
        self._notifier.publish_soon(tagsets=tagsets, subs=freed)

    @staticmethod
    def _mapping(value: object, what: str) -> Mapping[object, object]:
        if type(value) is not dict and not isinstance(value, Mapping):
            raise TypeError(
                f"{what} must be a mapping of job id to value, got {type(value).__name__}"
            )
        return value

    def _changes(
        self,
        mapping: object,
        transition: Transition,
        what: str,
        *,
        message_required: bool = False,
    ) -> list[Change]:
        out = []
        for job_id, message in self._mapping(mapping, what).items():
            key = check_id(job_id)
            msg = check_message(
                message, f"error_message for job {job_id!r}", required=message_required
            )
            out.append(Change(key, transition, error_message=msg))
        return out

    async def complete_job(self, job_id: str, result: bytes | None) -> None:
        """RUNNING/CANCELLING/UNKNOWN_* → COMPLETED, storing ``result``."""
        check_id(job_id)
        res = check_bytes(result, "result", optional=True)
        await self._apply_one(Change(job_id, COMPLETE, result=res))

    async def complete_jobs(self, results: Mapping[str, bytes | None]) -> None:
        """Complete many jobs in one transaction; ``BatchError`` lists those that could not."""
        changes = []
        holders = self._holders
        for job_id, result in self._mapping(results, "results").items():
            if type(job_id) is str and (
                job_id in holders  # (held by a stream: a stored id, valid; one lookup
                # costs less than the text's checks, per job)
                or (job_id and job_id.isascii() and "\x00" not in job_id)
            ):
                key = job_id  # (``check_id``'s common case, inline: per job)
            else:
                key = check_id(job_id)
            if result is None or type(result) is bytes:
                res: bytes | None = result
            else:  # a bytes subclass, or an error naming the job (formatted only here)
                res = check_bytes(result, f"result for job {job_id!r}")
            # (``tuple.__new__``: no frame for the named tuple's ``__new__``, per job)
            changes.append(_new_tuple(Change, (key, COMPLETE, res, None, None, None, None)))
        await self._apply_many(changes)

    async def fail_job(
        self, job_id: str, error_message: str, *, retry_in: timedelta | None = None
    ) -> None:
        """RUNNING/UNKNOWN_RETRY → FAILED_RETRY (a retry, due after ``retry_in``, else
        after the queue's ``RetryPolicy`` delay), or DISCARDED when the job has no
        attempts left; the message must not be empty."""
        check_id(job_id)
        msg = check_message(error_message, required=True)
        delay = None if retry_in is None else check_delay(retry_in)
        await self._ready()
        changes = await self._fail_changes([(job_id, msg, delay)])
        await self._apply_one(changes[0])

    async def fail_jobs(self, errors: Mapping[str, str | tuple[str, timedelta | None]]) -> None:
        """Fail many jobs in one transaction: ``{id: message}`` or
        ``{id: (message, retry_in)}``."""
        items: list[tuple[str, str, timedelta | None]] = []
        for job_id, value in self._mapping(errors, "errors").items():
            key = check_id(job_id)
            what = f"error_message for job {job_id!r}"
            if isinstance(value, tuple):
                if len(value) != 2:
                    raise TypeError(f"errors[{job_id!r}] must be (message, retry_in)")
                message, retry_in = value
                delay = None if retry_in is None else check_delay(retry_in, f"retry_in of {key!r}")
            else:
                message, delay = value, None
            items.append((key, check_message(message, what, required=True), delay))
        await self._ready()
        await self._apply_many(await self._fail_changes(items))

    async def _fail_with(
        self, errors: Mapping[str, tuple[str, timedelta | None]], policy: RetryPolicy
    ) -> None:
        """``fail_jobs`` (already validated) with ``policy`` instead of the queue's:
        the Worker's, whose ``Config.retry`` decides."""
        await self._ready()
        items = [(job_id, message, delay) for job_id, (message, delay) in errors.items()]
        await self._apply_many(await self._fail_changes(items, policy))

    async def _fail_changes(
        self,
        items: Sequence[tuple[str, str, timedelta | None]],
        policy: RetryPolicy | None = None,
        attempts: Mapping[str, int] | None = None,
    ) -> list[Change]:
        """The FAIL changes: each job's next due time from its own delay or ``policy``
        (the queue's by default; it needs the job's attempts: read here if not given)."""
        policy = policy or self._retry
        if policy is not None and attempts is None and any(d is None for _, _, d in items):
            ids = [job_id for job_id, _, d in items if d is None]
            attempts = {job.id: job.attempts for job in await self._backend.get_jobs(ids)}
        now = self._now()
        limit = policy.max_attempts if policy is not None else None
        out = []
        for job_id, message, delay in items:
            if delay is None and policy is not None:
                delay = policy.delay((attempts or {}).get(job_id, 1))
            due = now + delay if delay else None
            out.append(
                Change(job_id, FAIL, error_message=message, scheduled_at=due, max_attempts=limit)
            )
        return out

    async def discard_job(self, job_id: str, error_message: str = "") -> None:
        """RUNNING/CANCELLING/UNKNOWN_RETRY → DISCARDED: give up on the job now."""
        check_id(job_id)
        msg = check_message(error_message)
        await self._apply_one(Change(job_id, DISCARD, error_message=msg))

    async def discard_jobs(self, errors: Mapping[str, str]) -> None:
        await self._apply_many(self._changes(errors, DISCARD, "errors"))

    async def requeue_jobs(
        self,
        tags: Sequence[str] | None = None,
        job_ids: Sequence[str] | None = None,
        *,
        scheduled_at: datetime | None = None,
    ) -> list[str]:
        """DISCARDED/STOPPED/UNKNOWN_STOPPED → FAILED_RETRY for the union of the jobs
        with all ``tags`` and those in ``job_ids`` (due at ``scheduled_at``, or at
        once); counters are kept, ``result`` and ``finalized_at`` cleared. Returns the
        ids moved; jobs in other statuses and missing ids are skipped."""
        selection = self._selection(tags, job_ids, "requeue_jobs")
        when = check_aware(scheduled_at, "scheduled_at")
        await self._ready()
        outcome = await self._observed(
            self._backend.apply_selected(REQUEUE, selection, self._now(), scheduled_at=when)
        )
        return [m.job_id for m in outcome.moved]

    async def stop_job(self, job_id: str, error_message: str = "") -> None:
        """RUNNING/CANCELLING/UNKNOWN_RETRY → STOPPED."""
        check_id(job_id)
        msg = check_message(error_message)
        await self._apply_one(Change(job_id, STOP, error_message=msg))

    async def stop_jobs(self, errors: Mapping[str, str]) -> None:
        await self._apply_many(self._changes(errors, STOP, "errors"))

    async def stop_job_with_retry(self, job_id: str, error_message: str) -> None:
        """CANCELLING → STOPPED, counting a retry."""
        check_id(job_id)
        msg = check_message(error_message)
        await self._apply_one(Change(job_id, STOP_WITH_RETRY, error_message=msg))

    async def stop_jobs_with_retry(self, errors: Mapping[str, str]) -> None:
        await self._apply_many(self._changes(errors, STOP_WITH_RETRY, "errors"))

    async def mark_job_unknown_stopped(self, job_id: str, error_message: str) -> None:
        """RUNNING/CANCELLING/UNKNOWN_RETRY → UNKNOWN_STOPPED."""
        check_id(job_id)
        msg = check_message(error_message)
        await self._apply_one(Change(job_id, MARK_UNKNOWN_STOPPED, error_message=msg))

    async def mark_jobs_unknown_stopped(self, errors: Mapping[str, str]) -> None:
        await self._apply_many(self._changes(errors, MARK_UNKNOWN_STOPPED, "errors"))

    async def update_job_status(
        self,
        job_id: str,
        status: JobStatus,
        result: bytes | None = None,
        error_message: str = "",
    ) -> None:
        """The escape hatch: the moves SPEC §2 allows, or any status to itself."""
        check_id(job_id)
        try:
            target = JobStatus(status)
        except ValueError:
            raise ValueError(f"unknown job status: {status!r}") from None
        res = check_bytes(result, "result", optional=True)
        msg = check_message(error_message)
        await self._apply_one(
            Change(job_id, UPDATE_TO[target], result=res, error_message=msg or None)
        )

    async def acknowledge_cancellation(self, acks: Mapping[str, bool]) -> None:
        """CANCELLING → STOPPED (was executing) or UNKNOWN_STOPPED (was not)."""
        changes = []
        for job_id, was_executing in self._mapping(acks, "acks").items():
            key = check_id(job_id)
            if not isinstance(was_executing, bool):
                raise TypeError(
                    f"was_executing for job {job_id!r} must be bool, "
                    f"got {type(was_executing).__name__}"
                )
            changes.append(Change(key, ACK_EXECUTING if was_executing else ACK_NOT_EXECUTING))
        await self._apply_many(changes)

    async def cancel_jobs(
        self, tags: Sequence[str] | None = None, job_ids: Sequence[str] | None = None
    ) -> CancelResult:
        """Cancel the union of the jobs with all ``tags`` and those in ``job_ids``."""
        selection = self._selection(tags, job_ids, "cancel_jobs")
        await self._ready()
        outcome = await self._observed(
            self._backend.apply_selected(CANCEL, selection, self._now(), report_unmatched=True)
        )
        return CancelResult(
            cancelled=[m.job_id for m in outcome.moved],
            unknown=list(outcome.unmatched),
            missing=list(outcome.missing),
        )

    async def mark_worker_unresponsive(self, assignee_id: str) -> int:
        """The jobs of ``assignee_id``: RUNNING → UNKNOWN_RETRY, CANCELLING → UNKNOWN_STOPPED."""
        check_id(assignee_id, "assignee_id")
        return await self._apply_selected(WORKER_LOST, Selection(assignee_id=assignee_id))

    async def reset_running_jobs(self) -> int:
        """For start-up after a crash: every RUNNING/CANCELLING job as if its worker vanished."""
        return await self._apply_selected(WORKER_LOST, Selection(everything=True))

    async def _apply_selected(self, transition: Transition, selection: Selection) -> int:
        await self._ready()
        outcome = await self._observed(
            self._backend.apply_selected(transition, selection, self._now())
        )
        return len(outcome.moved)

    # --- leases (SPEC §8.4) ---------------------------------------------------------

    async def list_workers(self) -> list[Lease]:
        """Every lease in the store, live or expired (until forgotten), by assignee."""
        await self._ready()
        if not self._backend.supports_leases:
            return []
        return await self._backend.list_leases()

    async def rescue_expired(self) -> int:
        """Rescue the jobs of assignees whose lease expired, now; returns how many moved.

        Queues with streams do this by themselves every ``lease / 2`` or less; this
        is for a process that only manages (or a test). Works with leases off too
        (it then forgets records after ten default leases).
        """
        await self._ready()
        if not self._backend.supports_leases:
            return 0
        keeper = self._leases
        if keeper is None:
            keeper = LeaseKeeper(self, DEFAULT_LEASE)
        return await keeper.rescue()

    # --- reading and housekeeping -------------------------------------------------

    async def get_job(self, job_id: str) -> Job:
        """A snapshot of one job; ``JobNotFoundError`` if there is none."""
        check_id(job_id)
        await self._ready()
        jobs = await self._backend.get_jobs([job_id])
        if not jobs:
            raise JobNotFoundError(job_id)
        return jobs[0]

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        """Snapshots in input order; missing ids are skipped."""
        ids = check_ids(job_ids)
        await self._ready()
        if not ids:
            return []
        return await self._backend.get_jobs(ids)

    async def get_job_stats(self, tags: Sequence[str] | None = None) -> JobStats:
        """Counts over the jobs carrying every tag in ``tags`` (all jobs if none)."""
        clean = check_tags(tags)
        await self._ready()
        counts, retries = await self._backend.count_by_status(clean)
        return JobStats.from_counts(clean, counts, retries)

    async def cleanup_expired_jobs(self, ttl: timedelta) -> int:
        """Delete COMPLETED jobs finalized at or before now - ``ttl``."""
        check_ttl(ttl)
        await self._ready()
        cutoff: datetime = self._now() - ttl
        deleted = await self._backend.delete_completed_before(cutoff)
        if deleted:
            self._wake_waiters(None)
        return deleted

    async def delete_jobs(
        self, tags: Sequence[str] | None = None, job_ids: Sequence[str] | None = None
    ) -> int:
        """Delete the selected jobs, all final, or nothing (``JobsNotFinalError``)."""
        selection = self._selection(tags, job_ids, "delete_jobs")
        await self._ready()
        deleted = await self._backend.delete(selection)
        if deleted:
            self._wake_waiters(None if selection.tags else selection.job_ids)
        return deleted

    async def list_jobs(
        self,
        *,
        statuses: Iterable[JobStatus] | None = None,
        tags: Sequence[str] | None = None,
        job_type: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> JobPage:
        """A page of jobs, newest first (``created_at``, then id), with every filter
        given: status among ``statuses``, all of ``tags``, ``job_type``.

        ``after`` is the ``next_after`` of the previous page (an opaque cursor); a page
        is read from an index, so it costs the same however many jobs are stored.
        """
        query = ListQuery.build(
            statuses=statuses, tags=tags, job_type=job_type, limit=limit, after=after
        )
        await self._ready()
        jobs = await self._backend.list_jobs(
            ListQuery(query.limit + 1, query.statuses, query.tags, query.job_type, query.before)
        )
        if len(jobs) > query.limit:
            del jobs[query.limit :]
            return JobPage(jobs, encode_cursor(jobs[-1]))
        return JobPage(jobs, None)

    async def wait_for(
        self,
        job_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - part of the documented API
        statuses: Iterable[JobStatus] = FINAL,
    ) -> Job:
        """The job, once it is in one of ``statuses`` (default: any final status).

        Woken by this queue's own moves and by those the backend pushes (PostgreSQL
        ``NOTIFY``); where storage is shared, it also looks every ``poll_interval``.
        ``TimeoutError`` after ``timeout`` seconds; ``JobNotFoundError`` if the job does
        not exist or is deleted meanwhile.
        """
        check_id(job_id)
        try:
            wanted = (
                frozenset({JobStatus(statuses)})
                if isinstance(statuses, str)
                else frozenset(JobStatus(s) for s in statuses)
            )
        except ValueError as exc:
            raise ValueError(f"statuses: {exc}") from None
        if not wanted:
            raise ValueError("statuses must name at least one JobStatus")
        if timeout is not None:
            timeout = check_seconds(timeout, "timeout", zero=True)
        await self._ready()
        event = asyncio.Event()
        group = self._waiters.setdefault(job_id, set())
        group.add(event)
        last: Job | None = None
        try:
            async with asyncio.timeout(timeout):
                if len(group) == 1:  # the first here: ask other processes to push its moves
                    await self._watch(job_id, True)
                while True:
                    event.clear()  # before reading: a move during the read sets it again
                    if self._closed:
                        raise QueueClosedError("the queue is closed")
                    jobs = await self._backend.get_jobs([job_id])
                    if not jobs:
                        raise JobNotFoundError(job_id)
                    last = jobs[0]
                    if last.status in wanted:
                        return last
                    # on a poll timeout, look again: another process may have moved it
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), self._poll_interval)
        except TimeoutError:
            names = " or ".join(sorted(s.name for s in wanted))
            now = f"; it is {last.status.name}" if last is not None else ""
            raise TimeoutError(
                f"job {job_id!r} was not {names} within {timeout:g} s{now}"
            ) from None
        finally:
            group.discard(event)
            if not group and self._waiters.get(job_id) is group:
                del self._waiters[job_id]
                if not self._closed:
                    task = asyncio.ensure_future(self._watch(job_id, False))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)

    async def _watch(self, job_id: str, waiting: bool) -> None:
        """Best effort (a waiter polls anyway): a failure is logged, not raised."""
        try:
            await self._backend.watch(job_id, waiting)
        except StorageError as exc:
            logger.debug("could not announce the wait for job %r: %s", job_id, exc)

    @staticmethod
    def _selection(
        tags: Sequence[str] | None, job_ids: Sequence[str] | None, what: str
    ) -> Selection:
        clean_tags = check_tags(tags)
        ids = check_ids(job_ids) if job_ids is not None else []
        if not clean_tags and not ids:
            raise ValueError(f"{what} needs tags or job_ids (both were empty)")
        return Selection(job_ids=tuple(dict.fromkeys(ids)), tags=tuple(clean_tags))


def _apply_at_once(backend: Backend) -> object:
    """The memory backend's ``apply`` function if ``backend`` is one, else a new object."""
    from .backends.memory import MemoryBackend  # (no import cycle at module load)

    return MemoryBackend.apply if isinstance(backend, MemoryBackend) else object()


def _check_distinct(jobs: list[Job], ids: list[str]) -> None:
    """Raise :class:`DuplicateJobError` for an id that stands twice in one batch
    (``ids``: the jobs' ids)."""
    if len(set(ids)) == len(ids):
        return
    seen: set[str] = set()
    for job in jobs:
        if job.id in seen:
            raise DuplicateJobError(job.id, f"job id {job.id!r} appears twice in one batch")
        seen.add(job.id)


def _warn_unclosed(name: str) -> None:
    """``weakref.finalize`` callback of an open queue: dropped, or still open at exit."""
    warnings.warn(
        f"{name} was not closed: call 'await queue.close()' or use 'async with queue' "
        "(its store's connections and threads are released only then)",
        ResourceWarning,
        stacklevel=1,
    )


class _StreamLock(asyncio.Lock):
    """An :class:`asyncio.Lock` whose state ``JobStream.__anext__`` reads and sets
    itself when nobody waits for it (``acquire``'s and ``release``'s uncontended
    paths, inline: two coroutines and three calls fewer per batch); a contended
    acquire or release goes through the lock's own methods."""

    _locked: bool
    _waiters: collections.deque[asyncio.Future[bool]] | None


class JobStream:
    """Assigns jobs to one consumer, at most ``max_assigned_jobs`` at a time.

    ``async for batch in stream`` yields non-empty lists of RUNNING jobs. Use it as
    an async context manager (or call :meth:`aclose`) so jobs assigned but not yet
    handed over are given back (to FAILED_RETRY) when it ends.
    """

    def __init__(
        self, queue: PoolQueue, assignee_id: str, tags: list[str], max_assigned_jobs: int
    ) -> None:
        self._queue = queue
        self.assignee_id = assignee_id
        self.tags: tuple[str, ...] = tuple(tags)
        self.max_assigned_jobs = max_assigned_jobs
        self._held: dict[str, datetime | None] = {}
        self._sub = queue._notifier.subscribe(frozenset(tags))
        self._sub.flag = True  # take waiting jobs at once
        self._closed = False
        self._lock = _StreamLock()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Jobs claimed for this stream by a refilling apply, not yet handed over.
        self._ready: list[Job] = []
        #: Whether an assignment of a job in ``_ready`` may have ended since it was put
        #: there (set where ``_held`` loses or changes an entry while ``_ready`` has
        #: jobs): if not, every one is still held, and ``_take_ready`` checks none.
        self._stale = False
        #: Its consumer's hook (a ``Worker``'s) that takes a refill's jobs at once,
        #: handed over with no ``__anext__``; False: refused, they wait in ``_ready``.
        self._handoff: Callable[[list[Job]], bool] | None = None
        #: In ``__anext__``, waiting to be woken (a refill for it is preferred).
        self._waiting = False
        #: Waiting with a free slot that its last claim found no job for (counted in
        #: ``PoolQueue._hungry`` while so).
        self._hungry = False
        #: Whether calls freeing its slots claim its next jobs (off: its consumer
        #: takes no more, e.g. a stopping ``Worker``; they would only be given back).
        self._refills = True
        self._cancel_listeners: list[CancelListener] = []
        self._cancels_seen: set[tuple[str, datetime | None]] = set()
        #: Assignments whose slots in-flight refills may fill (see ``PoolQueue._apply``),
        #: one list per refill.
        self._reserved: list[list[tuple[str, datetime | None]]] = []
        #: Free slots that in-flight refills may fill (their ``Refill.extra``).
        self._extra = 0
        #: Refilling applies in flight that their callers' tasks drive (``carry``), and
        #: the future aclose() waits on for them to end (``None``: nobody waits).
        self._carrying = 0
        self._carried: asyncio.Future[None] | None = None
        self._recheck = False
        #: Whether this stream's assignee has its lease record (or leases are off).
        self._leased = queue._leases is None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def assigned_job_ids(self) -> list[str]:
        """Ids of this stream's jobs currently RUNNING or CANCELLING (as far as it knows)."""
        return list(self._held)

    def add_cancel_listener(self, listener: CancelListener) -> None:
        """Call ``listener(job_id)`` when one of this stream's jobs moves to CANCELLING.

        In-process cancellations arrive at once; those made by other processes
        sharing the storage arrive within ``poll_interval`` (or by push, where the
        backend supports it).
        """
        self._cancel_listeners.append(listener)

    def _used(self) -> int:
        """Slots in use: held jobs, and reserved slots of assignments that ended."""
        if not self._reserved:
            return len(self._held) + self._extra
        held = self._held.items()  # (``(id, assigned_at) in held``: still held)
        ended = {key for keys in self._reserved for key in keys if key not in held}
        return len(self._held) + len(ended) + self._extra

    def _reserve(self, keys: list[tuple[str, datetime | None]]) -> None:
        """Reserve the slots of a refill's assignments (one list per refill: nothing
        per job here)."""
        self._reserved.append(keys)

    def _unreserve(self, keys: list[tuple[str, datetime | None]]) -> bool:
        """Release a refill's reservations; True if one of them held a slot (its
        assignment ended, and no other refill reserves it)."""
        reserved = self._reserved
        reserved.remove(keys)  # (this very list, or an equal one: the same reservations)
        held = self._held.items()
        if all(map(held.__contains__, keys)):  # (the usual case: all still held)
            return False
        others = {key for other in reserved for key in other}
        return any(key not in held and key not in others for key in keys)

    def _cancel_requested(self, job_id: str, assigned_at: datetime | None) -> None:
        # Keyed by assignment, not id: a later job reusing the id is a new job.
        key = (job_id, assigned_at)
        if key in self._cancels_seen:
            return
        self._cancels_seen.add(key)
        if len(self._cancels_seen) > 4 * self.max_assigned_jobs + 64:
            self._cancels_seen = {
                k for k in self._cancels_seen if k[0] in self._held and self._held[k[0]] == k[1]
            }
        for listener in self._cancel_listeners:
            try:
                listener(job_id)
            except Exception:  # a listener's bug must not break the queue
                logger.exception("cancel listener failed for job %r", job_id)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> list[Job]:
        queue = self._queue
        if queue._loop is not None and asyncio.get_running_loop() is not queue._loop:
            queue._wrong_loop()  # (``_check_loop``, inline: per batch)
        if queue._closed and not self._closed:
            await self.aclose()
        lock = self._lock
        if not lock._locked and not lock._waiters:  # (``acquire``, uncontended: inline)
            if self._ready and self._leased and not self._closed:
                # Jobs a refill claimed wait here (a hand loop's every batch): handed
                # over at once, with no await in between (``_next``'s first step,
                # inline: no lock or coroutine of its own needed).
                jobs = self._take_ready()
                if jobs:
                    return jobs
            lock._locked = True
        else:
            await lock.acquire()
        try:
            return await self._next()
        except asyncio.CancelledError:
            self._give_back_ready()  # the awaiting task was cancelled: not handed over
            raise
        finally:
            if lock._waiters:
                lock.release()
            else:  # (``release`` with nobody waiting: inline)
                lock._locked = False

    async def _next(self) -> list[Job]:
        poll = self._queue._poll_interval
        if not self._leased and not self._closed:
            # Once per stream: no job is assigned to an assignee without a lease.
            assert self._queue._leases is not None
            await self._queue._ready()
            await self._queue._leases.ensure(self.assignee_id)
            self._leased = True
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._ready:
                jobs = self._take_ready()
                if jobs:
                    return jobs
                continue
            if self._recheck and self._held:
                self._recheck = False
                await self._queue._refresh(self)
                continue
            free = self.max_assigned_jobs - self._used()
            self._sub.flag = False
            if free > 0:
                jobs = await self._claim(free)
                if jobs:
                    # A refill may have filled other freed slots during the claim.
                    return jobs + self._take_ready() if self._ready else jobs
                if self._closed:
                    raise StopAsyncIteration
                if self._sub.flag:
                    continue
            self._waiting = True
            if free > 0:  # it found no job for a free slot
                self._hungry = True
                self._queue._hungry += 1
            try:
                woke = await self._queue._notifier.wait(self._sub, poll)
            finally:
                self._waiting = False
                if self._hungry:  # (unless a refill filled its slots meanwhile)
                    self._hungry = False
                    self._queue._hungry -= 1
            if not woke and self._held:
                await self._queue._refresh(self)

    def _take_ready(self) -> list[Job]:
        """The refilled jobs this stream still holds (any that left it meanwhile dropped)."""
        jobs = self._ready
        self._ready = []
        if not self._stale:  # (the usual case: every one still held, none to check)
            return jobs
        self._stale = False
        held = self._held
        return [
            job
            for job in jobs
            if (held_at := held.get(job.id, _NOT_HELD)) is job.assigned_at
            or held_at == job.assigned_at  # (the same object, usually: no compare)
        ]

    async def _claim(self, limit: int) -> list[Job]:
        started = start(self._queue._assign(self, limit))
        try:
            if started.done:  # (memory) no task: nothing can come between
                jobs = started.result()
            else:  # (in ``__anext__``, under the stream's lock: aclose() waits for it)
                try:
                    jobs = await carry(started, self._queue._in_task)
                except BaseException:
                    task = started.task
                    if task is not None:  # cancelled: the claim goes on in a task, its
                        self._track(task)  # jobs given back (aclose() waits for it)
                        task.add_done_callback(self._release_abandoned)
                    raise
        except QueueClosedError:
            raise StopAsyncIteration from None  # the queue closed before the claim began
        if self._closed and jobs:
            await self._release_tracked(jobs)
            raise StopAsyncIteration
        return jobs

    def _give_back_ready(self) -> None:
        """Release refilled jobs that will not be handed over (cancelled or closing)."""
        if self._ready:
            jobs, self._ready = self._ready, []
            self._track(asyncio.ensure_future(self._queue._release(self, jobs)))

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release_abandoned(self, task: asyncio.Task[list[Job]]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        jobs = task.result()
        if jobs:
            self._track(asyncio.ensure_future(self._queue._release(self, jobs)))

    async def _release_tracked(self, jobs: list[Job]) -> None:
        task = asyncio.ensure_future(self._queue._release(self, jobs))
        self._track(task)
        await asyncio.shield(task)

    async def aclose(self) -> None:
        """End the stream; jobs assigned but not handed over go back to FAILED_RETRY.

        Jobs already handed to the caller stay RUNNING: the caller owns them.
        """
        self._queue._check_loop()
        if not self._closed:
            self._closed = True
            self._queue._notifier.unsubscribe(self._sub)
            await self._queue._notifier.notify()
        async with self._lock:  # a pending __anext__ in another task ends first
            pass
        self._give_back_ready()
        while self._tasks or self._carrying:
            if self._carrying:  # refilling applies its callers' tasks drive (``_apply``)
                if self._carried is None or self._carried.done():
                    self._carried = asyncio.get_running_loop().create_future()
                # (shielded: a cancelled aclose() must not cancel another one's wait)
                await asyncio.shield(self._carried)
            else:
                # asyncio.wait, unlike gather, never cancels the give-backs if we are
                # cancelled.
                await asyncio.wait(list(self._tasks))
            self._give_back_ready()
        self._queue._forget(self)

    def _carried_all(self) -> None:
        """The last refilling apply that its caller drove ended: aclose() goes on."""
        carried, self._carried = self._carried, None
        if carried is not None and not carried.done():
            carried.set_result(None)

    async def __aenter__(self) -> Self:
        """Enter even if the queue closed since ``stream_jobs``: the stream then just
        ends (its first ``__anext__`` stops the iteration), as one pending at the
        close does; only ``stream_jobs`` on a closed queue raises."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
