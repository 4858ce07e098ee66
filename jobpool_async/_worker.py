"""``Worker``: runs a processor coroutine for each job a stream assigns to it.

Design, in short:

* one :class:`~jobpool_async.JobStream` with ``config.concurrency`` slots feeds a
  consumer task, which queues each job for the *runners*: long-lived tasks that
  take queued jobs in turn. A runner steps a job's processor (in a context of
  its own) up to its first suspension; a processor that finishes without
  suspending costs no task of its own, and one that suspends keeps that runner
  while the jobs still queued go to others (woken, or made if none is parked),
  all in the next loop iteration, so up to ``concurrency`` processors run at
  once, each in a task of its own;
* a finished job only *records* its outcome; a flusher task writes the
  outcomes that finished close together in one ``complete_jobs`` / ``fail_jobs`` /
  ``acknowledge_cancellation`` call each, a couple of milliseconds after the first;
* cancellations arrive through the stream's cancel listener; the worker checks
  which assignment of the job was cancelled (running jobs are keyed by
  ``(job id, assigned_at)``): a job not started yet is taken off the runners'
  queue, and the runner of a started one is cancelled (the ``CancelledError``
  reaches the processor at its current ``await``) and retires after recording
  the job, so no cancellation can reach another job. The acknowledgement goes
  through the flusher, never through the stream, so it needs no free slot;
* shutdown stops the consumer, waits up to the grace period, cancels what still
  runs and records every such job (``FAILED_RETRY``, so it runs again), writes
  all outcomes, and only then closes the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import operator
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import CoroutineType, TracebackType
from typing import Any, Literal, NamedTuple, Self

from ._config import Config
from ._eager import handed_to
from ._errors import BatchError, InvalidTransitionError, JobNotFoundError, QueueClosedError
from ._leases import unique_id
from ._models import Job, JobStatus, check_id, check_seconds, check_tags
from ._periodic import Periodic, run_periodic
from ._queue import JobStream, PoolQueue
from ._retry import Discard, Retry
from ._tracing import _configured, trace, traced_processor
from ._transitions import COMPLETE
from .backends.base import ApplyOutcome, Change

__all__ = ["Processor", "Worker"]

logger = logging.getLogger("jobpool_async.worker")

#: ``async def processor(job: Job) -> bytes``; ``None`` completes with no result.
Processor = Callable[[Job], Awaitable[bytes | None]]

_Key = tuple[str, datetime | None]
_Reason = Literal["cancelled", "shutdown"]

_FLUSH_DELAY = 0.002  # seconds an outcome may wait for others finishing close by
_RETRY_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)  # storage errors, consumer and flusher
_FINAL_FLUSH_ATTEMPTS = 5
_MAX_EARLY_CANCELS = 1024
_new_tuple = tuple.__new__
_Coroutine = CoroutineType
_first = operator.itemgetter(0)
#: A runner that goes on with the jobs its writes refill yields to the event loop
#: after this many writes in a row (jobs that never suspend would hold it otherwise).
_YIELD_EVERY = 16


@dataclass(slots=True, eq=False)
class _Runner:
    """A task that runs queued jobs one after another (see the module docstring)."""

    task: asyncio.Task[None] | None = None
    #: The key of the job it runs now (``None`` between jobs).
    key: _Key | None = None
    #: Counted in ``Worker._pullers``: awake (or being woken) to take queued jobs.
    pulling: bool = True
    #: Set while parked: its result wakes the runner.
    wake: asyncio.Future[None] | None = None
    #: Cancelled for its job: ends once that job is recorded, takes no other.
    retired: bool = False
    #: What its last job's coroutine returned, or raised (see :func:`_stepper`).
    value: Any = None
    error: BaseException | None = None


@types.coroutine
def _stepper(runner: _Runner) -> Generator[Any, Any, None]:
    """A runner's driver of its jobs' coroutines, one after another: ``send(coro)``
    runs ``coro`` up to its first suspension (what it awaits comes out of ``send``;
    later ``send``/``throw`` calls go on with it) or to its end, when ``send`` returns
    ``runner`` itself, with the coroutine's return value in ``runner.value`` or what
    it raised in ``runner.error``.

    ``yield from`` takes a finished coroutine's value with no exception, where
    ``coro.send`` raises ``StopIteration`` (an exception made, raised, caught and
    freed per job: about 1.8k instructions, measured); one generator per runner."""
    coro = yield
    while True:
        try:
            runner.value = yield from coro
        except GeneratorExit:  # closed (see ``_drive_on``): the job's coroutine too
            raise
        except BaseException as exc:
            runner.error = exc
        coro = yield runner


@types.coroutine
def _drive_on(
    stepper: Generator[Any, Any, None], runner: _Runner, value: Any, run: Callable[..., Any]
) -> Generator[Any, Any, None]:
    """Drive ``runner``'s job on from a suspension at which it yielded ``value``
    (``yield from`` by hand, as its task would), every step in ``run`` (its context's
    ``run``), until ``stepper`` hands back the runner: the job ended."""
    while value is not runner:
        try:
            sent = yield value
        except GeneratorExit:
            stepper.close()
            raise
        except BaseException as exc:  # CancelledError above all: it goes to the job
            value = run(stepper.throw, exc)
        else:
            value = run(stepper.send, sent)


class _Outcome(NamedTuple):
    """What a job's run came to, waiting to be written (a tuple: one per job)."""

    kind: Literal["complete", "fail", "discard", "ack"]
    result: bytes | None = None
    message: str = ""
    #: For "fail": when the job runs again (from ``Config.retry`` or a ``Retry``).
    retry_in: timedelta | None = None


#: A recorded outcome waiting to be written: a completion is its result itself
#: (``bytes`` or ``None``: no tuple per job), anything else an :class:`_Outcome`.
_Pending = _Outcome | bytes | None


def _as_outcome(pending: _Pending) -> _Outcome:
    return pending if isinstance(pending, _Outcome) else _Outcome("complete", pending)


class _Event(asyncio.Event):
    """An :class:`asyncio.Event` whose state the runners' per-batch path reads and
    sets itself when nobody waits (``set``/``clear`` inline: a call fewer each); with
    waiters it goes through ``set``, which wakes them."""

    _value: bool
    _waiters: deque[asyncio.Future[bool]]


class _TimedOut(Exception):
    """A processor ran longer than ``Config.job_timeout`` (raised by ``Worker._timed``)."""


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    """A processor's awaitable that is no coroutine, awaited by one."""
    return await awaitable


def _clean_message(text: str) -> str:
    """Error text as stored: NUL is not storable everywhere (PostgreSQL text)."""
    return text.replace("\x00", "\\x00")


class Worker:
    """Runs ``processor(job)`` for each job assigned to ``assignee_id``.

    ``async with Worker(...)`` runs it in the background until the block ends;
    ``await worker.run()`` runs it in the foreground until :meth:`stop` is called
    (or the queue closes). See ``docs/worker.md`` for the exact semantics.

    ``assignee_id`` names this worker in the jobs it runs and in its lease; when not
    given it is ``host:pid:random``, unique to this Worker. Give one only if it is
    unique among live processes: two processes sharing an assignee share one lease,
    so the jobs of one that dies are not rescued while the other lives.

    ``recover_on_start`` calls :meth:`PoolQueue.reset_running_jobs` before taking
    jobs. With leases on (the default) it is not needed: a dead worker's jobs come
    back by themselves within 1.5 leases. It is for queues with ``lease=None``, or
    to take back at once the jobs of a crashed predecessor whose lease has not yet
    expired. It moves *every* RUNNING job in the store, including those of other
    live workers sharing it; enable it only when this worker is the only one using
    the store (e.g. a single-process service).
    ``grace`` is the default grace period (seconds) used by :meth:`stop` and by
    leaving ``async with``.
    """

    def __init__(
        self,
        queue: PoolQueue,
        processor: Processor,
        *,
        assignee_id: str | None = None,
        config: Config | None = None,
        tags: Sequence[str] | None = None,
        recover_on_start: bool = False,
        grace: float | timedelta = 10.0,
        periodics: Sequence[Periodic] = (),
    ) -> None:
        if not isinstance(queue, PoolQueue):
            raise TypeError(f"queue must be a PoolQueue, got {type(queue).__name__}")
        if not callable(processor):
            raise TypeError(f"processor must be an async callable, got {processor!r}")
        if assignee_id is None:
            assignee_id = unique_id()
        check_id(assignee_id, "assignee_id")
        if config is None:
            config = Config()
        elif not isinstance(config, Config):
            raise TypeError(f"config must be a Config, got {type(config).__name__}")
        self._queue = queue
        self._plain: Processor = processor
        self._traced = traced_processor(processor, assignee_id)  # as is without OTel
        #: What runs each job: ``_traced`` while a tracer provider is set, else ``_plain``
        #: (looked up per batch, not per job: the lookup reads ``os.environ``).
        self._processor = processor
        #: Whether ``_processor`` is an ``async def`` (calling it runs none of its code);
        #: and, of each choice, looked up once.
        self._direct = self._direct_plain = inspect.iscoroutinefunction(processor)
        self._direct_traced = inspect.iscoroutinefunction(self._traced)
        self.assignee_id = assignee_id
        self.config = config
        self.tags: list[str] = check_tags(tags)
        self._recover = bool(recover_on_start)
        self._grace = _seconds(grace, "grace")
        self._state: Literal["new", "running", "stopping", "stopped"] = "new"
        self._stream: JobStream | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._cleaner: asyncio.Task[None] | None = None
        self.periodics: list[Periodic] = list(periodics)
        for p in self.periodics:
            if not isinstance(p, Periodic):
                raise TypeError(f"periodics must be Periodic objects, got {type(p).__name__}")
        self._periodic: asyncio.Task[None] | None = None
        self._bg: asyncio.Task[None] | None = None
        self._helpers: set[asyncio.Task[Any]] = set()
        #: The jobs handed to the worker (queued or started), until their outcomes are
        #: recorded (no object of ours per job: a started one's runner has its key).
        self._running: dict[_Key, Job] = {}
        #: The keys of the jobs handed over and not started yet, in order; runners take them.
        self._queued: deque[_Key] = deque()
        #: Why a job was interrupted (see :meth:`_interrupt`), until its outcome is recorded.
        self._reasons: dict[_Key, _Reason] = {}
        self._runners: set[_Runner] = set()
        #: Each runner by its task (for the runner stepping a job now: the current task).
        self._by_task: dict[asyncio.Task[None], _Runner] = {}
        #: The runners of started jobs that suspended, by key (an interrupt's lookup).
        self._suspended: dict[_Key, _Runner] = {}
        self._parked: list[_Runner] = []
        #: Runners awake (or woken) to take queued jobs: none means wake one.
        self._pullers = 0
        #: Each job runs in a copy of this (the context the worker was started in).
        self._context: contextvars.Context | None = None
        self._pending: dict[_Key, _Pending] = {}
        self._early_cancels: dict[_Key, None] = {}
        self._wake = asyncio.Event()
        #: A write of outcomes is under way (the flusher's or a runner's): one at a time.
        self._writing = False
        #: Set while no runner writes outcomes (shutdown waits for such a write).
        self._runner_write_done = _Event()
        self._runner_write_done.set()
        self._idle = _Event()  # set while no processor runs
        self._closing_flusher = False
        self._started = asyncio.Event()
        self._finished = asyncio.Event()
        self._stop_grace: float | None = None
        self._start_error: BaseException | None = None

    # --- public API -----------------------------------------------------------------

    @property
    def running_jobs(self) -> list[Job]:
        """Snapshots of the jobs whose processor is running now."""
        return [job.copy() for job in self._running.values()]

    @property
    def stopped(self) -> bool:
        return self._state == "stopped"

    async def run(self) -> None:
        """Take and run jobs until :meth:`stop` is called or the queue closes.

        Cancelling the task that runs this stops the worker at once (no grace
        period): running processors are cancelled and their jobs recorded as
        ``FAILED_RETRY`` before the ``CancelledError`` propagates.
        """
        if self._state != "new":
            raise RuntimeError(f"this Worker is {self._state}; a Worker runs once")
        self._state = "running"
        try:
            await self._run()
        finally:
            self._state = "stopped"
            self._started.set()
            self._finished.set()
            # Its tasks are done; a cancelled one keeps its CancelledError, whose
            # traceback's frames refer to this worker: a cycle (worker, task, frames)
            # that would keep the worker, its stream and the queue's store alive
            # until the cyclic garbage collector runs.
            self._consumer = self._flusher = self._cleaner = self._periodic = None

    async def stop(self, grace: float | timedelta | None = None) -> None:
        """Take no new jobs; let running ones finish within ``grace`` seconds; then
        cancel the rest and record them as ``FAILED_RETRY`` so they run again.

        Returns when every outcome is written and the stream is closed. Calling it
        again (or concurrently) waits for the same shutdown.
        """
        seconds = self._grace if grace is None else _seconds(grace, "grace")
        if self._state == "new":
            self._state = "stopped"
            self._finished.set()
            return
        if self._state == "running":
            self._state = "stopping"
            self._stop_grace = seconds
            if self._consumer is not None:
                self._consumer.cancel()
        await self._finished.wait()
        if self._bg is not None and self._bg.done() and not self._bg.cancelled():
            exc = self._bg.exception()
            if exc is not None and not isinstance(exc, QueueClosedError):
                raise exc

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError(f"this Worker is {self._state}; a Worker runs once")
        self._bg = asyncio.get_running_loop().create_task(
            self.run(), name=f"jobpool worker {self.assignee_id}"
        )
        started = asyncio.ensure_future(self._started.wait())
        try:
            await asyncio.wait({self._bg, started}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
        if self._bg.done():
            self._bg.result()  # raises why it could not start
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- main loop --------------------------------------------------------------------

    async def _run(self) -> None:
        await self._queue.open()  # fails at once from a wrong event loop or a closed queue
        if self._recover:
            moved = await self._queue.reset_running_jobs()
            logger.info("worker %s: recovered %d job(s) left running", self.assignee_id, moved)
        stream = self._queue.stream_jobs(
            self.assignee_id, self.tags or None, max_assigned_jobs=self.config.concurrency
        )
        stream.add_cancel_listener(self._on_cancel)
        stream._handoff = self._handed
        self._stream = stream
        self._context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        self._flusher = loop.create_task(self._flush_loop())
        self._cleaner = loop.create_task(self._cleanup_loop())
        if self.periodics:
            self._periodic = loop.create_task(run_periodic(self._queue, self.periodics))
        self._consumer = loop.create_task(self._consume(stream))
        if self._state == "stopping":  # stop() came before the consumer existed
            self._consumer.cancel()
        self._started.set()
        logger.info(
            "worker %s started (concurrency=%d, tags=%s)",
            self.assignee_id,
            self.config.concurrency,
            self.tags,
        )
        interrupted = False
        try:
            await asyncio.wait({self._consumer})
        except asyncio.CancelledError:
            interrupted = True
        grace = 0.0 if interrupted else (self._stop_grace or 0.0)
        if self._state == "running":  # the stream ended by itself (queue closed)
            self._state = "stopping"
        shutdown = loop.create_task(self._shutdown(grace))
        while not shutdown.done():
            try:
                await asyncio.shield(shutdown)
            except asyncio.CancelledError:
                interrupted = True
        logger.info("worker %s stopped", self.assignee_id)
        if interrupted:
            raise asyncio.CancelledError
        if not self._consumer.cancelled():
            exc = self._consumer.exception()
            if exc is not None:
                raise exc
        shutdown.result()

    async def _consume(self, stream: JobStream) -> None:
        """Hand each assigned job to its own task; back off on storage errors."""
        try:
            await self._take(stream)
        finally:
            # No more jobs are taken: the last outcomes' writes must not claim jobs
            # for the stream (the close would give them back, a retry counted).
            stream._refills = False

    async def _take(self, stream: JobStream) -> None:
        failures = 0
        while True:
            try:
                batch = await stream.__anext__()
            except StopAsyncIteration:
                return
            except QueueClosedError:
                return
            except Exception:
                delay = _RETRY_DELAYS[min(failures, len(_RETRY_DELAYS) - 1)]
                failures += 1
                logger.exception(
                    "worker %s: taking jobs failed; retrying in %.2f s", self.assignee_id, delay
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            self._accept(batch)

    def _accept(self, batch: list[Job]) -> None:
        """Queue each job of ``batch`` for the runners (inline: per job)."""
        traced = self._traced
        if traced is not self._plain:
            if _configured(trace):
                self._processor, self._direct = traced, self._direct_traced
            else:
                self._processor, self._direct = self._plain, self._direct_plain
        early, running, queued = self._early_cancels, self._running, self._queued
        for job in batch:
            key: _Key = (job.id, job.assigned_at)
            if early and key in early:  # cancelled between assignment and hand-over
                del early[key]
                self._record(key, _Outcome("ack"))
                continue
            if not running:  # (set only while none runs: cleared once, not per job)
                self._idle._value = False  # (``clear``, inline)
            running[key] = job
            queued.append(key)
        if queued and not self._pullers:
            self._add_puller()

    def _handed(self, batch: list[Job]) -> bool:
        """The stream's hand-off hook: jobs that a write of this worker's outcomes
        claimed for its freed slots (the refill) go straight to the runners, with no
        wake-up of the consumer waiting in ``__anext__``: the runner that wrote takes
        them. Refused (False) once the worker stops: the stream keeps them, and its
        close gives them back."""
        if self._state != "running":
            return False
        self._accept(batch)
        return True

    # --- runners ----------------------------------------------------------------------

    def _add_puller(self) -> None:
        """Wake a parked runner to take the queued jobs, or start a new one."""
        self._pullers += 1
        if self._parked:
            runner = self._parked.pop()
            runner.pulling = True
            assert runner.wake is not None
            runner.wake.set_result(None)
            return
        runner = _Runner()
        self._runners.add(runner)
        runner.task = asyncio.get_running_loop().create_task(
            self._run_jobs(runner), name=f"jobpool runner {self.assignee_id}"
        )
        self._by_task[runner.task] = runner

    async def _run_jobs(self, runner: _Runner) -> None:
        """A runner: take queued jobs until none is left, then park until woken.

        Each job's processor is called and stepped here, in a context of its own, up
        to its first suspension (no coroutine of the worker's around it: a job that
        never suspends costs its processor's coroutine alone); one that suspends
        keeps this runner (another takes the queue meanwhile) and is driven on by
        :meth:`_finish`. The steps go through the runner's :func:`_stepper`."""
        queued = self._queued
        running = self._running
        task = runner.task
        assert task is not None and self._context is not None
        base = self._context
        timed = self._timed if self.config.job_timeout is not None else None
        written = 0
        stepper = _stepper(runner)
        stepper.send(None)
        step = stepper.send
        outcome: _Pending
        try:
            while True:
                while queued:
                    key = queued.popleft()
                    job = running[key]
                    runner.key = key
                    # (``ctx.run(...)`` below, not a bound ``run`` kept: no method object
                    # made per job; the rare paths bind it)
                    ctx = base.copy()
                    coro: Coroutine[Any, Any, Any]
                    try:
                        if timed is not None:  # (its body calls the processor, in ``run``)
                            coro = timed(job)
                        elif self._direct:  # an ``async def``: the call runs none of its code
                            coro = self._processor(job)  # type: ignore[assignment]
                        else:  # any other callable runs in the job's context too
                            made = ctx.run(self._processor, job)
                            coro = made if type(made) is _Coroutine else _awaited(made)
                    except BaseException as exc:  # the call failed: as if its run had
                        outcome = self._error_outcome(key, job, exc)
                    else:
                        try:
                            first = ctx.run(step, coro)
                        except BaseException as exc:  # (the stepper's own GeneratorExit)
                            outcome = self._error_outcome(key, job, exc)
                        else:
                            if first is runner:  # it finished without suspending
                                error = runner.error
                                if error is not None:
                                    runner.error = None
                                    outcome = self._error_outcome(key, job, error)
                                else:
                                    result = runner.value
                                    if result is None or type(result) is bytes:
                                        outcome = result  # (a completion: see ``_Pending``)
                                    else:
                                        outcome = self._result_outcome(job, result)
                            else:
                                runner.pulling = False  # busy with this job: others take
                                self._pullers -= 1  # the queue
                                while self._pullers < len(queued):  # (their jobs may
                                    self._add_puller()  # suspend too: all start next turn)
                                if self._pending:  # recorded outcomes must not wait for it
                                    self._wake.set()
                                self._suspended[key] = runner
                                try:
                                    await self._finish(key, job, runner, stepper, first, ctx.run)
                                finally:
                                    del self._suspended[key]
                                runner.key = None
                                if runner.retired or task.cancelling():
                                    return  # a cancellation was meant for that job: end too
                                runner.pulling = True
                                self._pullers += 1
                                continue
                    # (``_record`` by a runner, inline: per job) No flusher wake-up: the
                    # runner writes, or wakes it when it suspends, parks or ends with
                    # outcomes recorded.
                    runner.key = None
                    try:  # noqa: SIM105 (``pop(key, None)`` by a statement, not a call: per job)
                        del running[key]
                    except KeyError:
                        pass
                    self._pending[key] = outcome
                    if not running:
                        idle = self._idle
                        if idle._waiters:
                            idle.set()
                        else:  # (``set`` with nobody waiting, inline)
                            idle._value = True
                # It finished the last job: it writes the outcomes itself (no flusher
                # wake-up) and, still a puller, runs the jobs the write's refill hands
                # over (no consumer or runner wake-up either). Not while another write
                # is under way, nor once the worker stops (the flusher writes the last
                # outcomes); if its write fails, the flusher retries, with its delays.
                # (Inline: no coroutine of its own per batch.)
                if self._pending and not running and not self._writing and self._state == "running":
                    done = self._runner_write_done  # (shutdown waits for this write)
                    done._value = False  # (``clear``, inline)
                    wrote = False
                    try:
                        await self._flush()
                        wrote = True
                    except QueueClosedError:
                        pass
                    except Exception:
                        logger.exception(
                            "worker %s: writing job outcomes failed; the flusher retries",
                            self.assignee_id,
                        )
                    finally:
                        if self._writing:  # cancelled, its write goes on in a task: set
                            pass  # when that ends (``_carried_write_done``)
                        elif done._waiters:
                            done.set()
                        else:  # (``set`` with nobody waiting, inline)
                            done._value = True
                    if wrote:
                        written += 1
                        if written % _YIELD_EVERY == 0:
                            await asyncio.sleep(0)  # let the loop's other tasks run
                        continue
                if self._pending:  # (others still run, or it could not write)
                    self._wake.set()
                runner.pulling = False
                self._pullers -= 1
                runner.wake = asyncio.get_running_loop().create_future()
                self._parked.append(runner)
                await runner.wake
                runner.wake = None
        finally:
            # (A cancelled runner's task keeps its CancelledError, whose traceback
            # keeps this frame: it must not refer back to the task, a cycle.)
            self._by_task.pop(task, None)
            del task
            runner.task = None
            stepper.close()
            self._runners.discard(runner)
            if runner.wake is not None:
                with contextlib.suppress(ValueError):
                    self._parked.remove(runner)
            if runner.pulling:
                self._pullers -= 1
            if queued and not self._pullers:
                self._add_puller()  # not left stranded by a runner that ended
            if self._pending:
                self._wake.set()  # outcomes it recorded and did not write

    async def _finish(
        self,
        key: _Key,
        job: Job,
        runner: _Runner,
        stepper: Generator[Any, Any, None],
        first: Any,
        run: Callable[..., Any],
    ) -> None:
        """Drive on a processor that suspended at its first step (every step in its
        job's context) and record its outcome."""
        outcome: _Pending
        try:
            await _drive_on(stepper, runner, first, run)
        except BaseException as exc:  # (the stepper's own GeneratorExit)
            outcome = self._error_outcome(key, job, exc)
        else:
            error = runner.error
            if error is not None:
                runner.error = None
                outcome = self._error_outcome(key, job, error)
            else:
                outcome = self._result_outcome(job, runner.value)
        if self._reasons:  # interrupted, and it finished anyway
            self._reasons.pop(key, None)
        running = self._running
        running.pop(key, None)
        self._pending[key] = outcome
        if not running:
            self._idle.set()

    async def _timed(self, job: Job) -> Any:
        """The processor under ``Config.job_timeout``: its expiry raises ``_TimedOut``."""
        limit = self.config.job_timeout
        assert limit is not None
        timeout = asyncio.timeout(limit.total_seconds())
        try:
            async with timeout:
                return await self._processor(job)
        except TimeoutError:
            if timeout.expired():
                raise _TimedOut from None
            raise  # the processor's own

    def _result_outcome(self, job: Job, result: object) -> _Outcome:
        """What a processor's return value comes to."""
        if result is None or isinstance(result, bytes):
            return _new_tuple(_Outcome, ("complete", result, "", None))
        if isinstance(result, bytearray | memoryview):
            return _Outcome("complete", result=bytes(result))
        return self._fail_outcome(
            job, f"the processor returned {type(result).__name__}, expected bytes"
        )

    def _error_outcome(self, key: _Key, job: Job, exc: BaseException) -> _Outcome:
        """What an exception out of a processor comes to. One that is no ``Exception``
        but a ``CancelledError`` (KeyboardInterrupt, SystemExit) is recorded as a
        failure here, then raised again."""
        if isinstance(exc, asyncio.CancelledError):
            return self._cancel_outcome(key)
        if isinstance(exc, Retry):
            logger.info(
                "worker %s: job %r (%s) asked to run again in %s",
                self.assignee_id,
                job.id,
                job.job_type,
                exc.in_,
            )
            return _Outcome("fail", message=_clean_message(exc.message), retry_in=exc.in_)
        if isinstance(exc, Discard):
            logger.error(
                "worker %s: job %r (%s) discarded by its processor: %s",
                self.assignee_id,
                job.id,
                job.job_type,
                exc.message,
            )
            return _Outcome("discard", message=_clean_message(exc.message))
        if isinstance(exc, _TimedOut):
            message = (
                f"the job ran longer than Config.job_timeout ({self.config.job_timeout}) "
                "and was cancelled"
            )
            logger.warning(
                "worker %s: job %r (%s): %s", self.assignee_id, job.id, job.job_type, message
            )
            return self._fail_outcome(job, message)
        if isinstance(exc, Exception):
            return self._failed(job, exc)
        self._record(key, _Outcome("fail", message=type(exc).__name__))
        raise exc

    def _failed(self, job: Job, exc: Exception) -> _Outcome:
        logger.warning(
            "worker %s: job %r (%s) failed: %r",
            self.assignee_id,
            job.id,
            job.job_type,
            exc,
            exc_info=exc,  # (caught by the stepper: no exception is being handled here)
        )
        return self._fail_outcome(job, _clean_message(str(exc) or type(exc).__name__))

    def _fail_outcome(self, job: Job, message: str) -> _Outcome:
        """A failure, due again after ``Config.retry``'s delay for the job's attempt;
        one that used the job's last attempt is discarded (said at ERROR)."""
        policy = self.config.retry
        limit = job.max_attempts if job.max_attempts is not None else policy.max_attempts
        if limit is not None and job.attempts >= limit:
            logger.error(
                "worker %s: job %r (%s) failed on its last attempt (%d of %d): discarded",
                self.assignee_id,
                job.id,
                job.job_type,
                job.attempts,
                limit,
            )
        return _Outcome("fail", message=message, retry_in=policy.delay(job.attempts))

    def _runner_of(self, key: _Key) -> _Runner | None:
        """The runner running the job of ``key`` now, if it started: one whose job
        suspended, or (called from the job's own code, between two of its
        suspensions) the runner of the current task."""
        runner = self._suspended.get(key)
        if runner is None:
            task = asyncio.current_task()
            runner = self._by_task.get(task) if task is not None else None
        return runner if runner is not None and runner.key == key else None

    def _interrupt(self, key: _Key, reason: _Reason) -> None:
        """Stop the job of ``key`` for ``reason``: a queued job is recorded without
        running; a started one has its runner cancelled (its processor sees
        ``CancelledError``)."""
        self._reasons.setdefault(key, reason)
        if key in self._queued:
            self._queued.remove(key)
            self._record(key, self._cancel_outcome(key))
            return
        runner = self._runner_of(key)
        if runner is None:
            return
        runner.retired = True
        if runner.task is not None:
            runner.task.cancel()

    def _end_grace(self) -> None:
        """Stop every job now, as the end of the grace period does (``jobpool worker``
        on a second signal): their jobs go back to ``FAILED_RETRY``."""
        for key in list(self._running):
            self._interrupt(key, "shutdown")

    def _cancel_outcome(self, key: _Key) -> _Outcome:
        reason = self._reasons.pop(key, None)
        if reason == "cancelled":
            return _Outcome("ack")
        if reason == "shutdown":
            return _Outcome(
                "fail",
                message=f"worker {self.assignee_id!r} shut down before the job finished "
                "(grace period over); it will run again",
                retry_in=timedelta(0),  # not its fault: at once, for another worker
            )
        return _Outcome(
            "fail",
            message="the job's task was cancelled (not by a cancellation of the job "
            "or a worker shutdown)",
            retry_in=timedelta(0),
        )

    def _record(self, key: _Key, outcome: _Outcome) -> None:
        """Note a job's outcome for the next write, and wake the flusher for it."""
        running = self._running
        running.pop(key, None)
        self._pending[key] = outcome
        if not running:
            self._idle.set()
        self._wake.set()

    # --- cancellation -----------------------------------------------------------------

    def _on_cancel(self, job_id: str) -> None:
        """Stream listener: one of our jobs moved to CANCELLING."""
        self._spawn(self._handle_cancel(job_id))

    async def _handle_cancel(self, job_id: str) -> None:
        try:
            job = await self._queue.get_job(job_id)
        except (JobNotFoundError, QueueClosedError):
            return
        except Exception:
            logger.exception("worker %s: could not read cancelled job %r", self.assignee_id, job_id)
            return
        if job.status is not JobStatus.CANCELLING or job.assignee_id != self.assignee_id:
            return  # already finished (its result won), or no longer ours
        key: _Key = (job_id, job.assigned_at)
        if key not in self._running:
            if key not in self._pending:
                # Assigned to our stream but not handed to us yet: never start it.
                self._early_cancels[key] = None
                while len(self._early_cancels) > _MAX_EARLY_CANCELS:
                    del self._early_cancels[next(iter(self._early_cancels))]
            return
        self._interrupt(key, "cancelled")
        logger.debug("worker %s: cancelling job %r", self.assignee_id, job_id)

    # --- writing outcomes ---------------------------------------------------------------

    async def _flush_loop(self) -> None:
        failures = 0
        while True:
            if not self._pending:
                if self._closing_flusher:
                    return
                await self._wake.wait()
                self._wake.clear()
                await self._gather_more()
                if not self._pending:
                    continue  # a runner wrote them
            if self._writing:  # a runner's write: this one waits for it
                await self._runner_write_done.wait()
                continue
            try:
                await self._flush()
            except QueueClosedError:
                self._drop_pending("the queue is closed")
                failures = 0
            except Exception:
                failures += 1
                if self._closing_flusher and failures >= _FINAL_FLUSH_ATTEMPTS:
                    logger.exception(
                        "worker %s: giving up writing job outcomes at shutdown", self.assignee_id
                    )
                    self._drop_pending("storage kept failing")
                    return
                delay = _RETRY_DELAYS[min(failures - 1, len(_RETRY_DELAYS) - 1)]
                logger.exception(
                    "worker %s: writing job outcomes failed; retrying in %.2f s",
                    self.assignee_id,
                    delay,
                )
                await asyncio.sleep(delay)
            else:
                failures = 0

    async def _gather_more(self) -> None:
        """Let outcomes finishing close together join one write: while some processor
        still runs, wait a loop iteration, then up to ``_FLUSH_DELAY`` for the rest.
        With none running no other outcome can come (new jobs wait for this write's
        freed slots), so write at once."""
        if not self._running:
            return
        await asyncio.sleep(0)
        if self._running and not self._closing_flusher:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_FLUSH_DELAY):
                    await self._idle.wait()

    def _drop_pending(self, why: str) -> None:
        if self._pending:
            ids = sorted(key[0] for key in self._pending)
            logger.error(
                "worker %s: %s; outcomes of %d job(s) not written, they stay RUNNING "
                "until mark_worker_unresponsive/reset_running_jobs: %s",
                self.assignee_id,
                why,
                len(ids),
                ids[:20],
            )
            self._pending.clear()

    async def _flush(self) -> None:
        """Write every recorded outcome: one call per kind. On a storage error the
        outcomes not yet written stay pending (a newer one for the same job wins).

        All completions (the usual case) are written here, in one call of the queue's
        with the changes built here (no ``complete_jobs`` checks per job, and no
        coroutine of ours between: one per call costs a frame per batch)."""
        self._writing = True
        handed: asyncio.Future[Any] | None = None  # (see below)
        try:
            pending, self._pending = self._pending, {}
            ids = set(map(_first, pending))  # (``map``: no loop of our own per job)
            if len(ids) < len(pending) or not ids.isdisjoint(map(_first, self._running)):
                pending = self._latest_only(pending)
            if _Outcome in map(type, pending.values()):  # other outcomes too
                await self._flush_mixed(pending)
                return
            try:
                await self._queue._complete_checked(
                    [
                        _new_tuple(Change, (key[0], COMPLETE, result, None, None, None, None))
                        for key, result in pending.items()
                    ]
                )
            except BatchError as exc:
                self._report("complete", dict(exc.errors))
            except BaseException as exc:
                # Cancelled while the write was under way (at shutdown, say), the write
                # goes on in a task: its own outcome decides (written twice, the second
                # would be rejected, an error logged), and until then this is writing.
                if handed_to(exc) is not None:
                    self._left_to(exc, pending, "complete")
                else:
                    self._pend_again(pending)
                raise
        except BaseException as exc:
            handed = handed_to(exc)  # (the write goes on: still writing until it ends)
            raise
        finally:
            if handed is None:
                self._writing = False

    def _left_to(self, exc: BaseException, pending: dict[_Key, _Pending], what: str) -> None:
        """The outcomes of ``pending`` are left to the write that goes on in the task
        marked on ``exc`` (its writer was cancelled): see ``_carried_write_done``."""
        handed = handed_to(exc)
        assert handed is not None
        self._runner_write_done.clear()  # (shutdown and the flusher wait for it)
        handed.add_done_callback(functools.partial(self._carried_write_done, pending, what))

    def _pend_again(self, pending: dict[_Key, _Pending]) -> None:
        """Outcomes a write did not write are pending again (a newer one for the same
        job wins)."""
        newer = {k[0] for k in self._pending}
        for key, result in pending.items():
            if key[0] not in newer:
                self._pending[key] = result

    def _carried_write_done(
        self, pending: dict[_Key, _Pending], what: str, task: asyncio.Future[ApplyOutcome]
    ) -> None:
        """Done callback of a write of outcomes (``what``: their kind) whose writer (a
        runner, the flusher) was cancelled while it was under way (at shutdown, say):
        it went on in a task. Written, its outcomes are done (not written again: the
        store would reject the second write, an error logged for a normal shutdown; a
        second FAIL could even fail a later run of the job); failed, they are pending
        again, for the flusher."""
        self._writing = False
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                logger.error(
                    "worker %s: writing job outcomes failed; the flusher retries",
                    self.assignee_id,
                    exc_info=task.exception(),
                )
            self._pend_again(pending)
        else:
            errors: dict[str, Exception] = dict(task.result().errors)
            if what == "fail":
                stopped = set(_stopped(errors))
                for key in pending:
                    if key[0] in stopped:
                        self._pending[key] = _Outcome("ack")
            self._report(what, errors)
        self._runner_write_done.set()  # (shutdown and the flusher wait for it)
        if self._pending:
            self._wake.set()

    async def _flush_mixed(self, pending: dict[_Key, _Pending]) -> None:
        """``_flush`` of outcomes of several kinds: one call per kind."""
        batch = {key: _as_outcome(value) for key, value in pending.items()}
        by_kind: dict[str, dict[str, tuple[_Key, _Outcome]]] = {
            "complete": {},
            "fail": {},
            "discard": {},
            "ack": {},
        }
        for key, outcome in batch.items():
            by_kind[outcome.kind][key[0]] = (key, outcome)
        written: set[_Key] = set()
        kind = ""  # (the kind being written)
        try:
            completes = by_kind["complete"]
            if completes:
                kind = "complete"
                errors = await self._write(
                    self._queue._complete_checked,
                    [
                        _new_tuple(Change, (i, COMPLETE, o.result, None, None, None, None))
                        for i, (_, o) in completes.items()
                    ],
                )
                written.update([k for k, _ in completes.values()])
                self._report("complete", errors)
            acks = {i: k for i, (k, _) in by_kind["ack"].items()}
            fails = by_kind["fail"]
            if fails:
                kind = "fail"
                errors = await self._write(
                    self._fail_jobs, {i: (o.message, o.retry_in) for i, (_, o) in fails.items()}
                )
                for job_id in _stopped(errors):
                    key = fails.pop(job_id)[0]
                    batch[key] = _Outcome("ack")
                    acks[job_id] = key
                written.update(k for k, _ in fails.values())
                self._report("fail", errors)
            discards = by_kind["discard"]
            if discards:
                kind = "discard"
                errors = await self._write(
                    self._queue.discard_jobs, {i: o.message for i, (_, o) in discards.items()}
                )
                written.update(k for k, _ in discards.values())
                self._report("discard", errors)
            if acks:
                kind = "ack"
                errors = await self._write(
                    self._queue.acknowledge_cancellation, dict.fromkeys(acks, True)
                )
                written.update(acks.values())
                self._report("acknowledge_cancellation", errors)
        except BaseException as exc:
            if handed_to(exc) is not None:  # cancelled, that kind's write goes on: its
                # outcomes are left to it (see ``_flush``); the later kinds' are pending
                under_way = (
                    dict.fromkeys(acks.values())
                    if kind == "ack"
                    else dict.fromkeys(k for k, _ in by_kind[kind].values())
                )
                self._left_to(
                    exc,
                    {key: batch[key] for key in under_way},
                    "acknowledge_cancellation" if kind == "ack" else kind,
                )
                written.update(under_way)
            self._pend_again({key: o for key, o in batch.items() if key not in written})
            raise

    def _latest_only(self, batch: dict[_Key, _Pending]) -> dict[_Key, _Pending]:
        """``batch`` without outcomes of a job's older assignment: one finished elsewhere
        (say, recovered as unresponsive) and assigned to us again meanwhile."""
        latest: dict[str, datetime | None] = {}
        for job_id, assigned_at in [*self._running, *batch]:
            latest[job_id] = _newest(latest.get(job_id, assigned_at), assigned_at)
        kept: dict[_Key, _Pending] = {}
        for key, outcome in batch.items():
            if latest[key[0]] == key[1]:
                kept[key] = outcome
            else:
                logger.warning(
                    "worker %s: job %r was finished elsewhere and assigned again; "
                    "dropping the old run's outcome (%s)",
                    self.assignee_id,
                    key[0],
                    _as_outcome(outcome).kind,
                )
        return kept

    async def _fail_jobs(self, errors: dict[str, tuple[str, timedelta | None]]) -> None:
        """``fail_jobs`` with this worker's retry policy (its attempt limit applies to
        jobs without their own)."""
        await self._queue._fail_with(errors, self.config.retry)

    @staticmethod
    async def _write(
        call: Callable[[Any], Coroutine[Any, Any, None]], argument: Any
    ) -> dict[str, Exception]:
        try:
            await call(argument)
        except BatchError as exc:
            return dict(exc.errors)
        return {}

    def _report(self, what: str, errors: dict[str, Exception]) -> None:
        for job_id, err in errors.items():
            logger.warning(
                "worker %s: could not %s job %r, it was moved meanwhile: %s",
                self.assignee_id,
                what,
                job_id,
                err,
            )

    # --- housekeeping and shutdown ------------------------------------------------------

    async def _cleanup_loop(self) -> None:
        interval = self.config.cleanup_interval.total_seconds()
        while True:
            try:
                deleted = await self._queue.cleanup_expired_jobs(self.config.ttl)
            except QueueClosedError:
                return
            except Exception:
                logger.exception("worker %s: TTL cleanup failed", self.assignee_id)
            else:
                if deleted:
                    logger.info(
                        "worker %s: deleted %d completed job(s) older than %s",
                        self.assignee_id,
                        deleted,
                        self.config.ttl,
                    )
            await asyncio.sleep(interval)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)

    async def _shutdown(self, grace: float) -> None:
        """Everything after the consumer stopped; runs to the end even if cancelled."""
        if self._consumer is not None:
            self._consumer.cancel()
            await asyncio.wait({self._consumer})
        if self._running and grace > 0:
            logger.info(
                "worker %s stopping: waiting up to %.1f s for %d running job(s)",
                self.assignee_id,
                grace,
                len(self._running),
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
        late = list(self._running)
        if late:
            logger.warning(
                "worker %s: cancelling %d job(s) still running at shutdown; they will run again",
                self.assignee_id,
                len(late),
            )
            for key in late:
                self._interrupt(key, "shutdown")
            keys = set(late)
            busy = {r.task for r in self._runners if r.key in keys and r.task is not None}
            if busy:
                await asyncio.wait(busy)
        await self._runner_write_done.wait()  # (its refill is given back by the close)
        idle = [r.task for r in self._runners if r.task is not None]
        for runner_task in idle:  # parked (no job is left to run): end them
            runner_task.cancel()
        if idle:
            await asyncio.wait(idle)
        if self._helpers:
            await asyncio.wait(list(self._helpers))
        self._closing_flusher = True
        self._wake.set()
        if self._flusher is not None:
            await asyncio.wait({self._flusher})
        for task in (self._cleaner, self._periodic):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._stream is not None:
            await self._stream.aclose()
        while self._helpers:  # cancel listeners that fired during the final flush
            await asyncio.wait(list(self._helpers))
        self._early_cancels.clear()
        if self._stream is not None:  # its hooks refer to this worker: a cycle
            self._stream._handoff = None
            with contextlib.suppress(ValueError):
                self._stream._cancel_listeners.remove(self._on_cancel)


def _stopped(errors: dict[str, Exception]) -> list[str]:
    """The jobs whose failure met them ``CANCELLING`` (cancelled while it failed: it
    stopped, so it is acknowledged instead), in order, taken out of ``errors``."""
    stopped = [
        job_id
        for job_id, err in errors.items()
        if isinstance(err, InvalidTransitionError) and err.current is JobStatus.CANCELLING
    ]
    for job_id in stopped:
        del errors[job_id]
    return stopped


def _newest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _seconds(value: float | timedelta, what: str) -> float:
    """Seconds from a number or a ``timedelta``: finite, at least zero."""
    if isinstance(value, timedelta):
        if value < timedelta(0):
            raise ValueError(f"{what} must not be negative, got {value!r}")
        return value.total_seconds()
    return check_seconds(value, what, zero=True)
