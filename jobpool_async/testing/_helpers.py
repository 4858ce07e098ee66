"""Helpers for tests of a queue: put a job in any status through the public API,
wait with a deadline, hold a backend call at an awkward moment."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from jobpool_async import Backend, Job, JobStatus, JobStream, PoolQueue
from jobpool_async.backends.base import Change, Refill

__all__ = [
    "DEADLINE",
    "PauseAfter",
    "PauseAfterApply",
    "assert_pending",
    "job_in",
    "next_batch",
    "take",
    "until",
]

S = JobStatus
_counter = itertools.count()

#: SPEC §2, written out independently of the transition table the backends use.
LIFECYCLE = {
    "complete": ({S.RUNNING, S.CANCELLING, S.UNKNOWN_RETRY, S.UNKNOWN_STOPPED}, S.COMPLETED),
    "fail": ({S.RUNNING, S.UNKNOWN_RETRY}, S.FAILED_RETRY),
    "stop": ({S.RUNNING, S.CANCELLING, S.UNKNOWN_RETRY}, S.STOPPED),
    "stop_with_retry": ({S.CANCELLING}, S.STOPPED),
    "mark_unknown_stopped": ({S.RUNNING, S.CANCELLING, S.UNKNOWN_RETRY}, S.UNKNOWN_STOPPED),
    "discard": ({S.RUNNING, S.CANCELLING, S.UNKNOWN_RETRY}, S.DISCARDED),
}
UPDATE_ALLOWED = {
    S.INITIAL_PENDING: {S.UNSCHEDULED},
    S.RUNNING: {
        S.COMPLETED,
        S.FAILED_RETRY,
        S.STOPPED,
        S.CANCELLING,
        S.UNKNOWN_RETRY,
        S.UNKNOWN_STOPPED,
        S.DISCARDED,
    },
    S.CANCELLING: {S.COMPLETED, S.STOPPED, S.UNKNOWN_STOPPED},
    S.FAILED_RETRY: {S.STOPPED, S.UNKNOWN_STOPPED},
    S.UNKNOWN_RETRY: {S.COMPLETED, S.FAILED_RETRY, S.STOPPED, S.UNKNOWN_STOPPED, S.DISCARDED},
    S.UNKNOWN_STOPPED: {S.COMPLETED, S.STOPPED},
    S.COMPLETED: set(),
    S.STOPPED: set(),
    S.UNSCHEDULED: set(),
    S.DISCARDED: set(),
}
FINAL = {S.COMPLETED, S.STOPPED, S.UNSCHEDULED, S.UNKNOWN_STOPPED, S.DISCARDED}
#: Seconds a test waits for something that should happen at once.
DEADLINE = 10.0


def new_id(prefix: str = "job") -> str:
    return f"{prefix}-{next(_counter)}"


def utc(year: int, month: int, day: int) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


async def take(queue: PoolQueue, job_id: str, assignee: str = "w") -> Job:
    """Enqueue ``job_id`` with a unique tag and assign it; the job ends RUNNING."""
    tag = f"only:{job_id}"
    await queue.enqueue_job(Job(id=job_id, job_type="test", tags=[tag]))
    async with queue.stream_jobs(assignee, tags=[tag]) as stream:
        batch = await asyncio.wait_for(stream.__anext__(), DEADLINE)
    assert [j.id for j in batch] == [job_id]
    return batch[0]


async def job_in(queue: PoolQueue, status: JobStatus, job_id: str | None = None) -> str:
    """Create a job and drive it to ``status`` with public calls only; return its id."""
    job_id = job_id or new_id(status.value)
    if status is S.INITIAL_PENDING:
        await queue.enqueue_job(Job(id=job_id, job_type="test"))
        return job_id
    if status is S.UNSCHEDULED:
        await queue.enqueue_job(Job(id=job_id, job_type="test"))
        await queue.cancel_jobs(job_ids=[job_id])
        return job_id
    assignee = f"worker-of-{job_id}"
    await take(queue, job_id, assignee)
    if status is S.RUNNING:
        pass
    elif status is S.CANCELLING:
        await queue.cancel_jobs(job_ids=[job_id])
    elif status is S.FAILED_RETRY:
        await queue.fail_job(job_id, "boom")
    elif status is S.UNKNOWN_RETRY:
        assert await queue.mark_worker_unresponsive(assignee) == 1
    elif status is S.COMPLETED:
        await queue.complete_job(job_id, b"done")
    elif status is S.STOPPED:
        await queue.stop_job(job_id, "stopped")
    elif status is S.UNKNOWN_STOPPED:
        await queue.mark_job_unknown_stopped(job_id, "lost")
    elif status is S.DISCARDED:
        await queue.discard_job(job_id, "given up")
    got = await queue.get_job(job_id)
    assert got.status is status, (job_id, got.status, status)
    return job_id


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll a cheap in-process predicate with a deadline (never sleep and hope)."""
    try:
        async with asyncio.timeout(DEADLINE):
            while not predicate():  # noqa: ASYNC110 - polling with a deadline
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"not within {DEADLINE} s: {what}") from None


async def next_batch(stream: JobStream) -> list[Job]:
    """The stream's next batch, within :data:`DEADLINE`."""
    return await asyncio.wait_for(stream.__anext__(), DEADLINE)


async def assert_pending(task: asyncio.Future[Any], for_seconds: float = 0.1) -> None:
    """The task is still waiting after a short while (a negative check, so bounded)."""
    done, _ = await asyncio.wait({task}, timeout=for_seconds)
    assert not done, f"expected no batch, got {task.result() if done else None}"


class PauseAfter:
    """Fault injection: hold a backend's ``method`` calls chosen by ``when`` (given the
    call's arguments) after the store made the change and before the queue sees the
    outcome: the window in which other tasks act on stale knowledge. ``paused`` is
    set when one is held; ``go()`` lets it (and any later one) return."""

    def __init__(
        self, backend: Backend, method: str, when: Callable[..., bool] = lambda *a, **k: True
    ) -> None:
        self.paused = asyncio.Event()
        self._go = asyncio.Event()
        self._when = when
        self._inner = getattr(backend, method)
        setattr(backend, method, self._call)

    async def _call(self, *args: Any, **kwargs: Any) -> Any:
        outcome = await self._inner(*args, **kwargs)
        if self._when(*args, **kwargs):
            self.paused.set()
            await self._go.wait()
        return outcome

    async def held(self) -> None:
        """Wait (with a deadline) until a call is held."""
        await asyncio.wait_for(self.paused.wait(), DEADLINE)

    def go(self) -> None:
        self._go.set()


class PauseAfterApply(PauseAfter):
    """:class:`PauseAfter` on ``apply``; ``when(changes, refill)``."""

    def __init__(
        self, backend: Backend, when: Callable[[list[Change], Refill | None], bool]
    ) -> None:
        super().__init__(
            backend, "apply", lambda changes, now, refill=None: when(list(changes), refill)
        )
