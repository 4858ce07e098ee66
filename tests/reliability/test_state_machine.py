"""Randomised sequences of every public ``PoolQueue`` operation against a reference model.

The model below is written from SPEC §2-§4 alone (it deliberately does not import
``jobpool_async._transitions``), so it is an independent check of the transition
table, the side effects, the errors, the stats and the stream slots of each backend.

After every step the whole store is read back and compared with the model: status,
retry count, messages, results, assignee, and every timestamp, which must be unset,
unchanged, or set within the window of the call that set it.

Time (SPEC §8): the queue runs on a :class:`~jobpool_async.testing.FakeClock` that
the machine advances by rules of its own, so schedules, priorities, attempt limits,
retry delays, discards and requeues are checked at exact instants, without sleeping.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from jobpool_async import (
    BatchError,
    DuplicateJobError,
    InvalidTransitionError,
    Job,
    JobNotFoundError,
    JobPoolError,
    JobsNotFinalError,
    JobStatus,
    JobStream,
    PoolQueue,
)
from jobpool_async.testing import FakeClock

from ..backends import BACKENDS
from .conftest import LoopRunner, hypothesis_settings, profile_name, scaled

S = JobStatus
#: The message a stream gives back a never-handed job with (SPEC §4: it says the
#: stream closed), where the job has none of its own.
RELEASE_MESSAGE = "stream closed before the job was handed to its consumer"


# --- the reference model (SPEC §1-§2, written independently) --------------------------

FINAL = frozenset({S.COMPLETED, S.STOPPED, S.UNSCHEDULED, S.UNKNOWN_STOPPED, S.DISCARDED})
ELIGIBLE = frozenset({S.INITIAL_PENDING, S.FAILED_RETRY, S.UNKNOWN_RETRY})
ACTIVE = frozenset({S.RUNNING, S.CANCELLING})


@dataclass(frozen=True)
class LifecycleOp:
    """A lifecycle call: sources, target, whether it counts a retry, what it stores."""

    sources: frozenset[JobStatus]
    target: JobStatus
    retry: bool = False
    stores_message: bool = True


OPS: dict[str, LifecycleOp] = {
    "complete": LifecycleOp(
        frozenset({S.RUNNING, S.CANCELLING, S.UNKNOWN_RETRY, S.UNKNOWN_STOPPED}),
        S.COMPLETED,
        stores_message=False,
    ),
    "fail": LifecycleOp(frozenset({S.RUNNING, S.UNKNOWN_RETRY}), S.FAILED_RETRY, retry=True),
    "stop": LifecycleOp(frozenset({S.RUNNING, S.CANCELLING, S.UNKNOWN_RETRY}), S.STOPPED),
    "stop_with_retry": LifecycleOp(frozenset({S.CANCELLING}), S.STOPPED, retry=True),
    "mark_unknown_stopped": LifecycleOp(
        frozenset({S.RUNNING, S.CANCELLING, S.UNKNOWN_RETRY}), S.UNKNOWN_STOPPED
    ),
    "discard": LifecycleOp(frozenset({S.RUNNING, S.CANCELLING, S.UNKNOWN_RETRY}), S.DISCARDED),
    "ack_executing": LifecycleOp(frozenset({S.CANCELLING}), S.STOPPED, stores_message=False),
    "ack_not_executing": LifecycleOp(
        frozenset({S.CANCELLING}), S.UNKNOWN_STOPPED, stores_message=False
    ),
}

#: ``update_job_status``: the moves SPEC §2 lists (plus any status to itself).
UPDATE_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    S.INITIAL_PENDING: frozenset({S.UNSCHEDULED}),
    S.RUNNING: frozenset(
        {
            S.COMPLETED,
            S.FAILED_RETRY,
            S.STOPPED,
            S.CANCELLING,
            S.UNKNOWN_RETRY,
            S.UNKNOWN_STOPPED,
            S.DISCARDED,
        }
    ),
    S.CANCELLING: frozenset({S.COMPLETED, S.STOPPED, S.UNKNOWN_STOPPED}),
    S.FAILED_RETRY: frozenset({S.STOPPED, S.UNKNOWN_STOPPED}),
    S.UNKNOWN_RETRY: frozenset(
        {S.COMPLETED, S.FAILED_RETRY, S.STOPPED, S.UNKNOWN_STOPPED, S.DISCARDED}
    ),
    S.UNKNOWN_STOPPED: frozenset({S.COMPLETED, S.STOPPED}),
    S.COMPLETED: frozenset(),
    S.STOPPED: frozenset(),
    S.UNSCHEDULED: frozenset(),
    S.DISCARDED: frozenset(),
}

CANCEL_MOVES: dict[JobStatus, JobStatus] = {
    S.INITIAL_PENDING: S.UNSCHEDULED,
    S.RUNNING: S.CANCELLING,
    S.CANCELLING: S.CANCELLING,
    S.FAILED_RETRY: S.STOPPED,
    S.UNKNOWN_RETRY: S.STOPPED,
}
REQUEUE_FROM = frozenset({S.DISCARDED, S.STOPPED, S.UNKNOWN_STOPPED})
WORKER_LOST_MOVES: dict[JobStatus, JobStatus] = {
    S.RUNNING: S.UNKNOWN_RETRY,
    S.CANCELLING: S.UNKNOWN_STOPPED,
}


@dataclass(frozen=True)
class Window:
    """A timestamp set by a call: it must lie between the call's start and end."""

    lo: datetime
    hi: datetime


Stamp = datetime | Window | None
STAMPS = ("started_at", "finalized_at", "last_retry_at", "assigned_at")


@dataclass
class MStream:
    """The model of one open stream."""

    stream: JobStream
    assignee_id: str
    tags: frozenset[str]
    max_assigned: int
    #: Ids a call freeing its slots claimed for it (a refill), not yet handed over.
    ready: list[str] = field(default_factory=list)


@dataclass
class MJob:
    """The model of one stored job."""

    id: str
    job_type: str
    definition: bytes
    tags: list[str]
    created_at: datetime
    seq: int
    status: JobStatus = S.INITIAL_PENDING
    retry_count: int = 0
    error_message: str = ""
    result: bytes | None = None
    assignee_id: str = ""
    stamps: dict[str, Stamp] = field(default_factory=lambda: dict.fromkeys(STAMPS))
    holder: MStream | None = None
    scheduled_at: datetime | None = None
    priority: int = 0
    max_attempts: int | None = None
    attempts: int = 0

    def move(self, target: JobStatus, now: Window, *, retry: bool = False) -> None:
        """Enter ``target`` with the side effects every move shares (SPEC §2)."""
        if target is not self.status and target in FINAL:
            self.stamps["finalized_at"] = now
        if retry:
            self.retry_count += 1
            self.stamps["last_retry_at"] = now
        self.status = target
        if target not in ACTIVE:
            self.holder = None

    def sort_key(self) -> tuple[int, datetime, int]:
        """SPEC §8.2: priority descending, then the due key, then enqueue order."""
        retry = self.stamps["last_retry_at"]
        if isinstance(retry, Window):  # set by this step's call: the clock stood still
            assert retry.lo == retry.hi, "stamps are resolved after every step"
            retry = retry.lo
        due = self.scheduled_at or (retry if retry is not None else self.created_at)
        return (-self.priority, due, self.seq)

    def due(self, now: datetime) -> bool:
        return self.status in ELIGIBLE and (self.scheduled_at is None or self.scheduled_at <= now)


def describe(exc: BaseException | None) -> object:
    """A comparable description of an error (``None`` for success)."""
    if exc is None:
        return None
    if isinstance(exc, InvalidTransitionError):
        return ("invalid", exc.job_id, exc.current, exc.target)
    if isinstance(exc, JobNotFoundError):
        return ("not_found", exc.job_id)
    if isinstance(exc, BatchError):
        return ("batch", {k: describe(v) for k, v in exc.errors.items()})
    if isinstance(exc, JobsNotFinalError):
        return ("not_final", frozenset(exc.job_ids))
    if isinstance(exc, DuplicateJobError):
        return ("duplicate",)
    return ("other", type(exc).__name__, str(exc))


def _lifecycle_error(job: MJob | None, job_id: str, op: LifecycleOp) -> object:
    if job is None:
        return ("not_found", job_id)
    if job.status not in op.sources:
        return ("invalid", job_id, job.status, op.target)
    return None


# --- the machine ----------------------------------------------------------------------

TAGS = ["a", "b", "c"]
ASSIGNEES = ["w1", "w2", "w3"]
BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)
MAX_JOBS = 20
MAX_STREAMS = 3
LIFECYCLE_ONE = frozenset(
    {"complete", "fail", "stop", "stop_with_retry", "mark_unknown_stopped", "discard"}
)
RETRY_IN = [None, None, timedelta(0), timedelta(seconds=5), timedelta(seconds=40)]
LIFECYCLE_BATCH = [*sorted(LIFECYCLE_ONE), "ack"]
ACTS = ["one", "one", "batch", "update", "cancel", "lost", "requeue"]

T = TypeVar("T")
Chooser = Callable[[random.Random], T]


class Draw:
    """The choices of one step, made from one seed that Hypothesis draws.

    Drawing a single seed per step (instead of many small draws) keeps long runs
    within Hypothesis's data buffer; past it, every later draw would be its simplest
    value and the machine would stop exploring. Hypothesis still shrinks the steps.
    """

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def draw(self, chooser: Chooser[T]) -> T:
        return chooser(self._rng)


def sampled_from(items: Iterable[T]) -> Chooser[T]:
    pool = list(items)
    return lambda r: r.choice(pool)


def integers(lo: int, hi: int) -> Chooser[int]:
    return lambda r: r.randint(lo, hi)


def booleans() -> Chooser[bool]:
    return lambda r: r.random() < 0.5


def binary(max_size: int) -> Chooser[bytes]:
    return lambda r: r.randbytes(r.randint(0, max_size))


def subsets(items: Iterable[T], min_size: int, max_size: int) -> Chooser[list[T]]:
    pool = list(items)
    return lambda r: r.sample(pool, r.randint(min(min_size, len(pool)), min(max_size, len(pool))))


def tag_lists(r: random.Random) -> list[str]:
    return [r.choice(TAGS) for _ in range(r.randint(0, 3))]  # duplicates collapse on enqueue


filters = subsets(TAGS, 0, 2)
stream_filters = sampled_from([[], [], ["a"], ["b"], ["a", "b"]])
messages = sampled_from(["", "boom", "err: 'quoted'"])
results = sampled_from([None, None, b"", b"ok", b"\x00\xff"])
created = sampled_from([None, *(BASE_TIME + timedelta(seconds=s) for s in range(4))])
seeds = st.integers(0, 2**32 - 1)


def _op_key(name: str) -> str:
    return "ack_executing" if name == "ack" else name


class QueueMachine(RuleBasedStateMachine):
    """Drives one queue on a fresh store; subclassed per backend by the test below."""

    backend_name = "memory"
    base_dir: Path | None = None

    def __init__(self) -> None:
        super().__init__()
        self.runner = LoopRunner(self.backend_name, self.base_dir)
        self.clock = FakeClock(datetime(2030, 1, 1, tzinfo=UTC))
        self.queue: PoolQueue = self.runner.new_queue(clock=self.clock)
        self.jobs: dict[str, MJob] = {}
        self.gone: set[str] = set()  # ids deleted (may be enqueued again)
        self.streams: list[MStream] = []
        self.next_id = 0
        self.next_seq = 0
        self.focus: str | None = None  # the job a chain of calls is about

    def teardown(self) -> None:
        self.runner.close()

    # -- helpers ---------------------------------------------------------------------

    def call(self, coro: Coroutine[Any, Any, Any]) -> tuple[Any, BaseException | None, Window]:
        """Run one queue call; return its value or error and its time window (one
        instant: the fake clock moves only between steps)."""
        lo = self.clock.now()
        try:
            value, error = self.runner.run(coro), None
        except (JobPoolError, ValueError, TypeError, TimeoutError) as exc:
            value, error = None, exc
        return value, error, Window(lo, self.clock.now())

    def candidates(self) -> list[str]:
        return sorted(self.jobs) + sorted(self.gone - set(self.jobs)) + ["ghost"]

    def pick_id(self, data: Draw, prefer: Iterable[JobStatus] = ()) -> str:
        """Any id, but mostly one the call can move, or one that has been assigned."""
        if self.focus is not None and data.draw(integers(0, 3)) > 0:
            return self.focus
        wanted = frozenset(prefer)
        movable = sorted(i for i, j in self.jobs.items() if j.status in wanted)
        busy = sorted(i for i, j in self.jobs.items() if j.assignee_id)
        roll = data.draw(integers(0, 3))
        if movable and roll >= 2:
            return data.draw(sampled_from(movable))
        if busy and roll == 1:
            return data.draw(sampled_from(busy))
        return data.draw(sampled_from(self.candidates()))

    def pick_ids(
        self, data: Draw, max_size: int = 4, prefer: Iterable[JobStatus] = ()
    ) -> list[str]:
        n = data.draw(integers(1, max_size))
        wanted = frozenset(prefer)
        return list(dict.fromkeys(self.pick_id(data, wanted) for _ in range(n)))

    def matching(self, tags: Iterable[str]) -> list[MJob]:
        wanted = set(tags)
        return [j for j in self.jobs.values() if wanted.issubset(j.tags)]

    def held(self, ms: MStream) -> set[str]:
        return {j.id for j in self.jobs.values() if j.holder is ms and j.status in ACTIVE}

    def expect_error(self, error: BaseException | None, expected: object) -> None:
        assert describe(error) == expected, f"got {describe(error)!r}, model says {expected!r}"

    # -- enqueue -----------------------------------------------------------------------

    def new_job(self, data: Draw) -> Job:
        if data.draw(booleans()) and self.gone - set(self.jobs):
            job_id = data.draw(sampled_from(sorted(self.gone - set(self.jobs))))
        else:
            job_id = f"j{self.next_id}"
            self.next_id += 1
        when = data.draw(created)
        kwargs: dict[str, Any] = {} if when is None else {"created_at": when}
        later = data.draw(sampled_from([None, None, None, -5, 0, 10, 30]))
        if later is not None:
            kwargs["scheduled_at"] = self.clock.now() + timedelta(seconds=later)
        kwargs["priority"] = data.draw(sampled_from([0, 0, 0, -1, 1, 7]))
        kwargs["max_attempts"] = data.draw(sampled_from([None, None, 1, 2, 3]))
        return Job(
            id=job_id,
            job_type=data.draw(sampled_from(["t", "other"])),
            job_definition=data.draw(binary(8)),
            tags=data.draw(tag_lists),
            **kwargs,
        )

    def remember(self, job: Job) -> None:
        self.jobs[job.id] = MJob(
            id=job.id,
            job_type=job.job_type,
            definition=job.job_definition,
            tags=list(dict.fromkeys(job.tags)),
            created_at=job.created_at,
            seq=self.next_seq,
            scheduled_at=job.scheduled_at,
            priority=job.priority,
            max_attempts=job.max_attempts,
        )
        self.next_seq += 1
        self.gone.discard(job.id)

    def enqueue_one(self, data: Draw) -> None:
        job = self.new_job(data)
        value, error, _ = self.call(self.queue.enqueue_job(job))
        self.expect_error(error, None)
        assert value == job.id
        self.remember(job)

    def enqueue_batch(self, data: Draw, n: int, duplicate: str | None) -> None:
        batch: list[Job] = []
        for _ in range(n):
            job = self.new_job(data)
            if job.id not in {j.id for j in batch}:
                batch.append(job)
        if duplicate == "old" and self.jobs:
            old = data.draw(sampled_from(sorted(self.jobs)))
            batch.insert(data.draw(integers(0, len(batch))), Job(id=old, job_type="t"))
        elif duplicate == "twice" and batch:
            batch.append(Job(id=batch[0].id, job_type="t"))
        else:
            duplicate = None
        value, error, _ = self.call(self.queue.enqueue_jobs(batch))
        if duplicate is not None:
            self.expect_error(error, ("duplicate",))  # all or nothing: the model is unchanged
            return
        self.expect_error(error, None)
        assert value == [j.id for j in batch]
        for job in batch:
            self.remember(job)

    # -- streams -----------------------------------------------------------------------

    def open_stream(self, assignee: str, tags: list[str], slots: int) -> None:
        stream = self.queue.stream_jobs(assignee, tags=tags, max_assigned_jobs=slots)
        self.streams.append(MStream(stream, assignee, frozenset(tags), slots))

    def close_stream(self, data: Draw) -> None:
        ms = self.streams.pop(data.draw(integers(0, len(self.streams) - 1)))
        _, error, now = self.call(ms.stream.aclose())
        self.expect_error(error, None)
        assert ms.stream.closed
        self.give_back(ms, now)

    def give_back(self, ms: MStream, now: Window) -> None:
        """A closing stream releases the refilled jobs it still holds (SPEC §4)."""
        for job_id in ms.ready:
            job = self.jobs.get(job_id)
            if job is None or job.holder is not ms or job.status not in ACTIVE:
                continue
            if not job.error_message:
                job.error_message = RELEASE_MESSAGE
            if job.status is S.RUNNING:
                job.move(S.FAILED_RETRY, now, retry=True)  # scheduled_at kept
            else:
                job.move(S.STOPPED, now)
        ms.ready = []

    def assign(self, ms: MStream, job: MJob, now: Window) -> None:
        job.move(S.RUNNING, now)
        job.attempts += 1
        job.assignee_id = ms.assignee_id
        job.stamps["assigned_at"] = now
        if job.stamps["started_at"] is None:
            job.stamps["started_at"] = now
        job.holder = ms

    def holders(self, ids: Iterable[str]) -> list[tuple[str, MStream]]:
        """The open streams holding these jobs before a call (in the call's order)."""
        out = []
        for job_id in ids:
            job = self.jobs.get(job_id)
            if job is not None and job.status in ACTIVE and job.holder in self.streams:
                assert job.holder is not None
                out.append((job_id, job.holder))
        return out

    def refill(self, before: list[tuple[str, MStream]], now: Window, ids: list[str]) -> None:
        """What a call that freed slots claims for the first open stream holding one of
        its jobs: one eligible matching job per free slot of that stream, those it freed
        and those free before. (On PostgreSQL the claim is part of the call's one
        statement, whose snapshot does not show the jobs the call itself moved: it
        takes none of the jobs the call named, moved or not, on every path.)"""
        if not before:
            return
        ms = before[0][1]
        free = ms.max_assigned - len(self.held(ms))
        unseen = set(ids) if self.backend_name == "postgres" else set()
        eligible = sorted(
            (j for j in self.matching(ms.tags) if j.due(self.clock.now()) and j.id not in unseen),
            key=MJob.sort_key,
        )
        for job in eligible[: max(free, 0)]:
            self.assign(ms, job, now)
            ms.ready.append(job.id)

    def claim(self, data: Draw, probe: bool) -> None:
        """One ``__anext__`` on an open stream (opening one first if there is none)."""
        if not self.streams:
            self.open_stream(
                data.draw(sampled_from(ASSIGNEES)),
                data.draw(stream_filters),
                data.draw(integers(1, 3)),
            )
        ms = self.streams[data.draw(integers(0, len(self.streams) - 1))]
        # (a job refilled, moved before its hand-over and refilled again is one job)
        ready = list(
            dict.fromkeys(i for i in ms.ready if self.jobs.get(i) and self.jobs[i].holder is ms)
        )
        ms.ready = []
        if ready:  # refilled jobs are handed over, with no claim
            batch, error, now = self.call(asyncio.wait_for(ms.stream.__anext__(), 10))
            self.expect_error(error, None)
            assert sorted(j.id for j in batch) == sorted(ready), "the refilled jobs, no others"
            return
        free = ms.max_assigned - len(self.held(ms))
        eligible = sorted(
            (j for j in self.matching(ms.tags) if j.due(self.clock.now())), key=MJob.sort_key
        )
        expected = eligible[: max(free, 0)]
        if not expected:
            if not probe:
                return
            # Nothing may be handed out: the stream must keep waiting.
            _, error, _ = self.call(asyncio.wait_for(ms.stream.__anext__(), 0.02))
            assert isinstance(error, TimeoutError), f"expected to wait, got {error!r}"
            return
        batch, error, now = self.call(asyncio.wait_for(ms.stream.__anext__(), 10))
        self.expect_error(error, None)
        assert sorted(j.id for j in batch) == sorted(j.id for j in expected), (
            "stream must take the oldest eligible matching jobs, up to its free slots"
        )
        assert all(j.status is S.RUNNING for j in batch)
        for job in expected:
            self.assign(ms, job, now)

    def claim_and_act(self, data: Draw) -> None:
        """A claim, then a chain of 1-5 random calls focused on one assigned job.

        Reaches deep paths (RUNNING → CANCELLING → STOPPED with retry, UNKNOWN_* and
        back) far more often than independent steps would.
        """
        now = self.clock.now()
        if len(self.jobs) < MAX_JOBS and not any(j.due(now) for j in self.jobs.values()):
            self.enqueue_batch(data, data.draw(integers(1, 3)), None)
        self.claim(data, probe=False)
        busy = sorted(i for i, j in self.jobs.items() if j.assignee_id)
        if not busy:
            return
        self.focus = data.draw(sampled_from(busy))
        try:
            for _ in range(data.draw(integers(1, 5))):
                self.act(data, data.draw(sampled_from(ACTS)))
        finally:
            self.focus = None

    def op_name(self, data: Draw, names: Iterable[str]) -> str:
        """A lifecycle call; while focused on a job, mostly one its status allows."""
        pool = sorted(names)
        job = self.jobs.get(self.focus) if self.focus is not None else None
        if job is not None and data.draw(integers(0, 2)) > 0:
            fitting = [n for n in pool if job.status in OPS[_op_key(n)].sources]
            if fitting:
                return data.draw(sampled_from(fitting))
        return data.draw(sampled_from(pool))

    def act(self, data: Draw, kind: str) -> None:
        if kind == "one":
            name = self.op_name(data, LIFECYCLE_ONE)
            self.lifecycle_one(data, name, data.draw(messages), data.draw(results))
        elif kind == "batch":
            self.lifecycle_batch(data, self.op_name(data, LIFECYCLE_BATCH))
        elif kind == "update":
            self.update_status(data, data.draw(results), data.draw(messages))
        elif kind == "cancel":
            tags = data.draw(filters) if data.draw(integers(0, 3)) == 0 else []
            self.cancel(data, tags, not tags or data.draw(booleans()))
        elif kind == "lost":
            self.mark_worker_unresponsive(data.draw(sampled_from([*ASSIGNEES, "nobody"])))
        elif kind == "requeue":
            self.requeue(data)
        else:
            self.reset_running()

    # -- lifecycle calls ----------------------------------------------------------------

    def model_lifecycle(
        self,
        name: str,
        job_id: str,
        now: Window,
        *,
        message: str = "",
        result: bytes | None,
        retry_in: timedelta | None = None,
    ) -> object:
        op = OPS[name]
        job = self.jobs.get(job_id)
        err = _lifecycle_error(job, job_id, op)
        if err is None:
            assert job is not None
            if name == "fail" and job.max_attempts is not None and job.attempts >= job.max_attempts:
                job.move(S.DISCARDED, now, retry=True)  # SPEC §8.3: no attempts left
            else:
                job.move(op.target, now, retry=op.retry)
                if name == "fail":
                    job.scheduled_at = now.lo + retry_in if retry_in else None
            if op.stores_message:
                job.error_message = message
            if result is not None:
                job.result = result
        return err

    def lifecycle_one(self, data: Draw, name: str, message: str, result: bytes | None) -> None:
        job_id = self.pick_id(data, OPS[name].sources)
        q = self.queue
        if name == "fail":
            message = message or "failed"
        retry_in = data.draw(sampled_from(RETRY_IN))
        calls: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "complete": lambda: q.complete_job(job_id, result),
            "fail": lambda: q.fail_job(job_id, message, retry_in=retry_in),
            "discard": lambda: q.discard_job(job_id, message),
            "stop": lambda: q.stop_job(job_id, message),
            "stop_with_retry": lambda: q.stop_job_with_retry(job_id, message),
            "mark_unknown_stopped": lambda: q.mark_job_unknown_stopped(job_id, message),
        }
        before = self.holders([job_id])
        _, error, now = self.call(calls[name]())
        expected = self.model_lifecycle(
            name,
            job_id,
            now,
            message=message,
            result=result if name == "complete" else None,
            retry_in=retry_in,
        )
        self.expect_error(error, expected)
        self.refill(before, now, [job_id])

    def lifecycle_batch(self, data: Draw, name: str) -> None:
        ids = self.pick_ids(data, prefer=OPS["ack_executing" if name == "ack" else name].sources)
        before = self.holders(ids)
        q = self.queue
        if name == "ack":
            acks = {i: data.draw(booleans()) for i in ids}
            _, error, now = self.call(q.acknowledge_cancellation(acks))
            errors = {
                i: self.model_lifecycle(
                    "ack_executing" if acks[i] else "ack_not_executing", i, now, result=None
                )
                for i in ids
            }
        elif name == "complete":
            res = {i: data.draw(results) for i in ids}
            _, error, now = self.call(q.complete_jobs(res))
            errors = {i: self.model_lifecycle(name, i, now, result=res[i]) for i in ids}
        elif name == "fail":
            delays = {i: data.draw(sampled_from(RETRY_IN)) for i in ids}
            msgs = {i: data.draw(messages) or "failed" for i in ids}
            _, error, now = self.call(q.fail_jobs({i: (msgs[i], delays[i]) for i in ids}))
            errors = {
                i: self.model_lifecycle(
                    name, i, now, message=msgs[i], result=None, retry_in=delays[i]
                )
                for i in ids
            }
        else:
            msgs = {i: data.draw(messages) for i in ids}
            call = {
                "discard": q.discard_jobs,
                "stop": q.stop_jobs,
                "stop_with_retry": q.stop_jobs_with_retry,
                "mark_unknown_stopped": q.mark_jobs_unknown_stopped,
            }[name]
            _, error, now = self.call(call(msgs))
            errors = {
                i: self.model_lifecycle(name, i, now, message=msgs[i], result=None) for i in ids
            }
        failed = {i: e for i, e in errors.items() if e is not None}
        self.expect_error(error, ("batch", failed) if failed else None)
        self.refill(before, now, ids)

    def update_status(self, data: Draw, result: bytes | None, message: str) -> None:
        job_id = self.pick_id(data)
        job = self.jobs.get(job_id)
        if job is not None and UPDATE_ALLOWED[job.status] and data.draw(integers(0, 2)) > 0:
            target = data.draw(sampled_from(sorted(UPDATE_ALLOWED[job.status])))  # a real move
        else:
            target = data.draw(sampled_from(list(S)))
        before = self.holders([job_id])
        _, error, now = self.call(self.queue.update_job_status(job_id, target, result, message))
        job = self.jobs.get(job_id)
        if job is None:
            self.expect_error(error, ("not_found", job_id))
            return
        if target is not job.status and target not in UPDATE_ALLOWED[job.status]:
            self.expect_error(error, ("invalid", job_id, job.status, target))
            self.refill(before, now, [job_id])  # the stream's free slots, as lifecycle calls
            return
        self.expect_error(error, None)
        job.move(target, now)
        if result is not None:
            job.result = result
        if message:
            job.error_message = message
        self.refill(before, now, [job_id])

    # -- selection calls ----------------------------------------------------------------

    def cancel(self, data: Draw, by_tags: list[str], by_ids: bool) -> None:
        if by_tags and data.draw(integers(0, 2)) > 0:
            by_tags = []  # by tags often cancels most jobs: keep it rarer
        ids = self.pick_ids(data) if by_ids else []
        value, error, now = self.call(
            self.queue.cancel_jobs(tags=by_tags or None, job_ids=ids or None)
        )
        if not by_tags and not ids:
            assert isinstance(error, ValueError), error
            return
        self.expect_error(error, None)
        selected = {i: self.jobs.get(i) for i in ids}
        if by_tags:
            selected.update({j.id: j for j in self.matching(by_tags)})
        cancelled = [i for i, j in selected.items() if j is not None and j.status in CANCEL_MOVES]
        unknown = [i for i in selected if i not in cancelled]
        assert len(value.cancelled) == len(set(value.cancelled)), value
        assert len(value.unknown) == len(set(value.unknown)), value
        assert set(value.cancelled) == set(cancelled), (value, cancelled)
        assert set(value.unknown) == set(unknown), (value, unknown)
        for i in cancelled:
            job = self.jobs[i]
            job.move(CANCEL_MOVES[job.status], now)

    def model_worker_lost(self, jobs: Iterable[MJob], now: Window) -> int:
        moved = 0
        for job in list(jobs):
            if job.status in WORKER_LOST_MOVES:
                job.move(WORKER_LOST_MOVES[job.status], now)
                moved += 1
        return moved

    def mark_worker_unresponsive(self, assignee: str) -> None:
        value, error, now = self.call(self.queue.mark_worker_unresponsive(assignee))
        self.expect_error(error, None)
        mine = [j for j in self.jobs.values() if j.assignee_id == assignee]
        assert value == self.model_worker_lost(mine, now)

    def reset_running(self) -> None:
        value, error, now = self.call(self.queue.reset_running_jobs())
        self.expect_error(error, None)
        assert value == self.model_worker_lost(self.jobs.values(), now)

    def delete_ids(self, ids: list[str]) -> None:
        value, error, _ = self.call(self.queue.delete_jobs(job_ids=ids))
        self.expect_error(error, None)
        assert value == len(ids)
        for i in ids:
            del self.jobs[i]
            self.gone.add(i)

    def delete(self, data: Draw, by_tags: list[str], by_ids: bool) -> None:
        ids = self.pick_ids(data) if by_ids else []
        value, error, _ = self.call(
            self.queue.delete_jobs(tags=by_tags or None, job_ids=ids or None)
        )
        if not by_tags and not ids:
            assert isinstance(error, ValueError), error
            return
        selected = {i: self.jobs[i] for i in ids if i in self.jobs}
        if by_tags:
            selected.update({j.id: j for j in self.matching(by_tags)})
        not_final = frozenset(i for i, j in selected.items() if j.status not in FINAL)
        if not_final:
            self.expect_error(error, ("not_final", not_final))
            return
        self.expect_error(error, None)
        assert value == len(selected)
        for i in selected:
            del self.jobs[i]
            self.gone.add(i)

    def cleanup(self, tiny: bool) -> None:
        ttl = timedelta(microseconds=1) if tiny else timedelta(days=1)
        before = set(self.jobs)
        value, error, now = self.call(self.queue.cleanup_expired_jobs(ttl))
        self.expect_error(error, None)
        present = {j.id for j in self.runner.run(self.queue.get_jobs(sorted(before)))}
        vanished = before - present
        sure, maybe = set(), set()
        for job in self.jobs.values():
            fin = job.stamps["finalized_at"]
            if job.status is S.COMPLETED:
                assert isinstance(fin, datetime)
                if fin <= now.lo - ttl:
                    sure.add(job.id)
                elif fin <= now.hi - ttl:
                    maybe.add(job.id)
        assert sure <= vanished <= sure | maybe, (sure, maybe, vanished)
        assert value == len(vanished)
        for i in vanished:
            del self.jobs[i]
            self.gone.add(i)

    # -- reading -----------------------------------------------------------------------

    def get_one(self, data: Draw) -> None:
        job_id = data.draw(sampled_from(self.candidates()))
        value, error, _ = self.call(self.queue.get_job(job_id))
        if job_id not in self.jobs:
            self.expect_error(error, ("not_found", job_id))
        else:
            self.expect_error(error, None)
            self.compare(self.jobs[job_id], value)

    def get_many(self, data: Draw) -> None:
        ids = data.draw(subsets(self.candidates(), 0, 6))
        value, error, _ = self.call(self.queue.get_jobs(ids))
        self.expect_error(error, None)
        assert [j.id for j in value] == [i for i in ids if i in self.jobs], "input order"
        for job in value:
            self.compare(self.jobs[job.id], job)

    def stats(self, tags: list[str]) -> None:
        self.check_stats(tags)

    def list_pages(self, data: Draw) -> None:
        """``list_jobs`` (SPEC §9) walked page by page against the model: exactly the
        jobs every filter keeps, newest first by ``created_at`` then id, each as stored
        (so the listing indexes follow every move: claims, refills, completions...)."""
        statuses = data.draw(
            sampled_from(
                [None, None, [S.RUNNING, S.CANCELLING], sorted(ELIGIBLE), sorted(FINAL)]
                + [[s] for s in S]
            )
        )
        tags = data.draw(filters)
        job_type = data.draw(sampled_from([None, None, "t", "other"]))
        limit = data.draw(integers(1, 7))
        want = [
            j.id
            for j in sorted(self.matching(tags), key=lambda j: (j.created_at, j.id), reverse=True)
            if (statuses is None or j.status in statuses)
            and (job_type is None or j.job_type == job_type)
        ]
        got: list[str] = []
        after: str | None = None
        for _ in range(len(self.jobs) + 2):
            page, error, _ = self.call(
                self.queue.list_jobs(
                    statuses=statuses,
                    tags=tags or None,
                    job_type=job_type,
                    limit=limit,
                    after=after,
                )
            )
            self.expect_error(error, None)
            assert len(page.jobs) <= limit
            for job in page.jobs:
                self.compare(self.jobs[job.id], job)
            got += [j.id for j in page.jobs]
            if page.next_after is None:
                break
            assert len(page.jobs) == limit, "only a full page has a next page"
            after = page.next_after
        assert got == want, (statuses, tags, job_type, limit, got, want)

    # -- persistence and bad input -------------------------------------------------------

    def reopen(self) -> None:
        """Close the queue (ending every stream) and open the same store again."""
        lo = self.clock.now()
        self.runner.close_queue()
        for ms in self.streams:
            self.give_back(ms, Window(lo, self.clock.now()))
        self.streams.clear()
        self.queue = self.runner.new_queue(clock=self.clock)

    def requeue(self, data: Draw) -> None:
        """``requeue_jobs`` by ids and/or tags, due at once or later (SPEC §8.3)."""
        ids = self.pick_ids(data, prefer=(S.DISCARDED, S.STOPPED, S.UNKNOWN_STOPPED))
        tags = data.draw(filters) if data.draw(integers(0, 3)) == 0 else []
        later = data.draw(sampled_from([None, 0, 20]))
        when = None if later is None else self.clock.now() + timedelta(seconds=later)
        value, error, _ = self.call(
            self.queue.requeue_jobs(tags=tags or None, job_ids=ids, scheduled_at=when)
        )
        self.expect_error(error, None)
        selected = {i: self.jobs[i] for i in ids if i in self.jobs}
        if tags:
            selected.update({j.id: j for j in self.matching(tags)})
        moved = [i for i, j in selected.items() if j.status in REQUEUE_FROM]
        assert sorted(value) == sorted(moved), (value, moved)
        for i in moved:
            job = self.jobs[i]
            job.status = S.FAILED_RETRY
            job.stamps["finalized_at"] = None
            job.result = None
            job.scheduled_at = when
            job.holder = None

    def advance(self, data: Draw) -> None:
        """Move the fake clock (fires the queue's timer for jobs that came due)."""
        self.clock.advance(timedelta(seconds=data.draw(sampled_from([1, 5, 10, 30]))))

    def bad_call(self, data: Draw, which: int) -> None:
        """Bad arguments raise ValueError/TypeError and write nothing (checked by invariants)."""
        q = self.queue
        job_id = data.draw(sampled_from(self.candidates()))
        bad: list[Callable[[], Coroutine[Any, Any, object]]] = [
            lambda: q.fail_job(job_id, ""),
            lambda: q.fail_jobs({job_id: ""}),
            lambda: q.complete_job(job_id, "text"),  # type: ignore[arg-type]
            lambda: q.enqueue_jobs(
                [Job(id=f"new{self.next_id}", job_type="t"), Job(id="", job_type="t")]
            ),
            lambda: q.enqueue_job(Job(id="x\x00", job_type="t")),
            lambda: q.enqueue_job(Job(id="naive", job_type="t", created_at=datetime(2024, 1, 1))),
            lambda: q.enqueue_job(Job(id="running", job_type="t", status=S.RUNNING)),
            lambda: q.cancel_jobs(),
            lambda: q.delete_jobs(tags=[], job_ids=[]),
            lambda: q.cleanup_expired_jobs(timedelta(0)),
            lambda: q.update_job_status(job_id, "no-such-status"),  # type: ignore[arg-type]
            lambda: q.acknowledge_cancellation({job_id: "yes"}),  # type: ignore[dict-item]
            lambda: q.fail_job(job_id, "x", retry_in=timedelta(seconds=-1)),
            lambda: q.enqueue_job(Job(id="p", job_type="t", priority=40_000)),
            lambda: q.enqueue_job(Job(id="s", job_type="t", scheduled_at=datetime(2030, 1, 1))),
            lambda: q.enqueue_job(Job(id="m", job_type="t", max_attempts=0)),
            lambda: q.enqueue_jobs([Job(id="i", job_type="t")], if_exists="maybe"),  # type: ignore[arg-type]
        ]
        _, error, _ = self.call(bad[which]())
        assert isinstance(error, ValueError | TypeError), f"call {which}: {error!r}"

    # -- the rules: few, each choosing among related calls (keeps swarm testing useful) --

    @rule(seed=seeds)
    def r_enqueue(self, seed: int) -> None:
        data = Draw(seed)
        kind = data.draw(sampled_from(["one", "batch"]))
        if len(self.jobs) >= MAX_JOBS:  # make room: delete some final jobs by id
            final = sorted(i for i, j in self.jobs.items() if j.status in FINAL)
            if final:
                self.delete_ids(data.draw(subsets(final, 1, 6)))
            return
        if kind == "one":
            self.enqueue_one(data)
        else:
            self.enqueue_batch(
                data,
                data.draw(integers(0, 4)),
                data.draw(sampled_from([None, "old", "twice"])),
            )

    @rule(seed=seeds)
    def r_stream(self, seed: int) -> None:
        data = Draw(seed)
        kind = data.draw(sampled_from(["claim", "claim", "probe", "open", "close"]))
        if kind == "open" and len(self.streams) < MAX_STREAMS:
            self.open_stream(
                data.draw(sampled_from(ASSIGNEES)),
                data.draw(stream_filters),
                data.draw(integers(1, 3)),
            )
        elif kind == "close" and self.streams:
            self.close_stream(data)
        else:
            self.claim(data, probe=kind == "probe")

    @rule(seed=seeds)
    def r_claim_and_act(self, seed: int) -> None:
        self.claim_and_act(Draw(seed))

    @rule(seed=seeds)
    def r_act(self, seed: int) -> None:
        data = Draw(seed)
        self.act(data, data.draw(sampled_from([*ACTS, "reset"])))

    @rule(seed=seeds)
    def r_housekeeping(self, seed: int) -> None:
        data = Draw(seed)
        kind = data.draw(sampled_from(["delete", "cleanup", "reopen", "bad", "advance"]))
        if kind == "delete":
            self.delete(data, data.draw(filters), data.draw(booleans()))
        elif kind == "cleanup":
            self.cleanup(data.draw(booleans()))
        elif kind == "reopen":
            self.reopen()
        elif kind == "advance":
            self.advance(data)
        else:
            self.bad_call(data, data.draw(integers(0, 16)))

    @rule(seed=seeds)
    def r_read(self, seed: int) -> None:
        data = Draw(seed)
        kind = data.draw(sampled_from(["one", "many", "stats", "list"]))
        if kind == "one":
            self.get_one(data)
        elif kind == "many":
            self.get_many(data)
        elif kind == "list":
            self.list_pages(data)
        else:
            self.check_stats(data.draw(filters))

    # -- checks after every step -----------------------------------------------------------

    def compare(self, model: MJob, job: Job) -> None:
        """One stored job against its model; resolves timestamps set by the last call."""
        got = (
            job.id,
            job.job_type,
            job.job_definition,
            sorted(job.tags),
            job.status,
            job.retry_count,
            job.error_message,
            job.result,
            job.assignee_id,
            job.created_at,
            job.scheduled_at,
            job.priority,
            job.max_attempts,
            job.attempts,
        )
        want = (
            model.id,
            model.job_type,
            model.definition,
            sorted(model.tags),
            model.status,
            model.retry_count,
            model.error_message,
            model.result,
            model.assignee_id,
            model.created_at,
            model.scheduled_at,
            model.priority,
            model.max_attempts,
            model.attempts,
        )
        assert got == want, f"job {model.id}: stored {got!r}, model {want!r}"
        for name in STAMPS:
            actual = getattr(job, name)
            expected = model.stamps[name]
            if actual is not None:
                assert actual.utcoffset() == timedelta(0), f"{name} not UTC: {actual!r}"
            if isinstance(expected, Window):
                assert actual is not None and expected.lo <= actual <= expected.hi, (
                    f"job {model.id}: {name}={actual!r} not within the call {expected!r}"
                )
                model.stamps[name] = actual
            else:
                assert actual == expected, f"job {model.id}: {name}={actual!r}, model {expected!r}"

    def check_stats(self, tags: list[str]) -> None:
        stats = self.runner.run(self.queue.get_job_stats(tags))
        jobs = self.matching(tags)
        by = {s: sum(1 for j in jobs if j.status is s) for s in S}
        assert stats.by_status == by, (tags, stats.by_status, by)
        assert stats.total_jobs == len(jobs)
        assert stats.pending_jobs == by[S.INITIAL_PENDING]
        assert stats.running_jobs == by[S.RUNNING] + by[S.CANCELLING]
        assert stats.completed_jobs == by[S.COMPLETED]
        assert stats.stopped_jobs == by[S.STOPPED] + by[S.UNSCHEDULED] + by[S.UNKNOWN_STOPPED]
        assert stats.failed_jobs == by[S.FAILED_RETRY] + by[S.UNKNOWN_RETRY]
        assert stats.total_retries == sum(j.retry_count for j in jobs)
        assert stats.discarded_jobs == by[S.DISCARDED]
        assert sorted(stats.tags) == sorted(tags)

    @invariant()
    def store_matches_model(self) -> None:
        ids = self.candidates()
        stored = self.runner.run(self.queue.get_jobs(ids))
        assert [j.id for j in stored] == sorted(self.jobs), "exactly the model's jobs exist"
        for job in stored:
            self.compare(self.jobs[job.id], job)
        self.check_stats([])

    @invariant()
    def stream_slots_match_model(self) -> None:
        for ms in self.streams:
            held = set(ms.stream.assigned_job_ids)
            assert held == self.held(ms), (ms.assignee_id, held, self.held(ms))
            assert len(held) <= ms.max_assigned


#: Examples per backend in the ``ci`` profile (the ``long`` profile runs 500 on each).
CI_EXAMPLES = {"memory": 150, "sqlite": 40, "leveldb": 40, "postgres": 30}


# (a guard against a hang, not a speed limit: a run takes 10-70 s, up to several
# minutes on a loaded 2-core machine)
@pytest.mark.timeout(scaled(600, 7200))
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_queue_state_machine(backend_name: str, tmp_path: Path) -> None:
    """Random operation sequences on each backend agree with the reference model."""
    machine = type(
        f"QueueMachine_{backend_name}",
        (QueueMachine,),
        {"backend_name": backend_name, "base_dir": tmp_path},
    )
    LoopRunner(backend_name, tmp_path).close()  # skip/fail early if the backend is unavailable
    # In CI the in-memory store, which is cheap, gets more examples: it explores the core
    # state machine (the one transition table every backend applies) more deeply.
    extra = {"max_examples": CI_EXAMPLES[backend_name]} if profile_name() == "ci" else {}
    run_state_machine_as_test(machine, settings=hypothesis_settings(**extra))
