"""A Worker's write of completions whose writer is cancelled while the write is under
way (a runner cancelled at shutdown, as when the event loop ends and cancels every task
left) goes on in a task (the queue's carried call). Its outcome is that write's: written,
the outcomes are not written a second time (the store would reject it: "could not
complete job", logged for a normal shutdown); failed, they are pending again and the
flusher writes them. (Queue lane, session 14: the reviewer's defect of session 13.)
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import pytest

from jobpool_async import Config, Job, JobStatus, PoolQueue, StorageError, Worker
from jobpool_async.backends import MemoryBackend
from jobpool_async.backends.base import COMPLETE, FAIL, Transition
from jobpool_async.testing import DEADLINE, until


class _GatedCompletions(MemoryBackend):
    """Applies of ``gated`` changes (COMPLETE) wait for ``gate`` (a storage round trip
    held open, carried in the caller's task as on SQLite or LevelDB); ``completes``
    counts the ``gated`` changes that reach the store per job; ``fail_next`` fails the
    next such apply."""

    def __init__(self, gated: Transition = COMPLETE) -> None:
        super().__init__()
        self.gated = gated
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.completes: Counter[str] = Counter()
        self.fail_next = False

    async def apply(self, changes: Any, now: Any, refill: Any = None) -> Any:
        gated = self.gated
        if any(c.transition is gated for c in changes):
            self.entered.set()
            await self.gate.wait()
            if self.fail_next:
                self.fail_next = False
                raise StorageError("the store is down for a moment")
            self.completes.update(c.job_id for c in changes if c.transition is gated)
        return await super().apply(changes, now, refill)


async def _cancel_the_writing_runner(
    backend: _GatedCompletions, worker: Worker, refills: bool
) -> None:
    await asyncio.wait_for(backend.entered.wait(), DEADLINE)  # the runner's write
    stream = worker._stream
    assert stream is not None
    (runner,) = worker._runners  # (one job, one runner: the one writing)
    task = runner.task
    assert task is not None and worker._writing
    if not refills:  # (as once the worker stops taking jobs: a write with no refill)
        stream._refills = False
    task.cancel()
    await until(task.done, "the runner ended")
    assert worker._writing  # its write goes on
    backend.gate.set()


async def _run_and_cancel(backend: _GatedCompletions, refills: bool, written: int) -> Job:
    """One job run by a Worker whose runner is cancelled during the write of its
    outcome; returns the job once the worker stopped with ``written`` writes made."""

    async def proc(job: Job) -> bytes:
        return b"done"

    async with PoolQueue(backend) as queue:
        await queue.enqueue_jobs([Job(id="a", job_type="t")])
        worker = Worker(queue, proc, assignee_id="w", config=Config(concurrency=1))
        async with worker:
            await _cancel_the_writing_runner(backend, worker, refills)
            await until(lambda: backend.completes["a"] >= written, f"{written} write(s)")
            await until(lambda: not worker._writing, "the write ended")
        return await queue.get_job("a")


@pytest.mark.parametrize("refills", [True, False], ids=["refill", "no-refill"])
async def test_a_runner_cancelled_during_its_write_writes_once(
    caplog: pytest.LogCaptureFixture, refills: bool
) -> None:
    backend = _GatedCompletions()
    caplog.set_level(logging.WARNING, logger="jobpool_async")
    job = await _run_and_cancel(backend, refills, 1)
    assert job.status is JobStatus.COMPLETED and job.result == b"done"
    assert backend.completes == {"a": 1}  # (2 before: the flusher wrote it again)
    assert [r.getMessage() for r in caplog.records] == []


async def test_a_cancelled_runners_failed_write_is_written_by_the_flusher(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = _GatedCompletions()
    backend.fail_next = True
    caplog.set_level(logging.WARNING, logger="jobpool_async")
    job = await _run_and_cancel(backend, True, 1)  # (by the flusher)
    assert job.status is JobStatus.COMPLETED and job.result == b"done"
    assert backend.completes == {"a": 1}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "worker w: writing job outcomes failed; the flusher retries"
    ]


async def test_a_runner_cancelled_during_a_failures_write_writes_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch of several kinds (``_flush_mixed``): the completions are written, then
    the runner is cancelled during the failures' write, which goes on: written once (a
    second FAIL would be rejected here; on a job claimed again meanwhile it would fail
    another worker's run)."""
    backend = _GatedCompletions(FAIL)

    async def proc(job: Job) -> bytes:
        if job.id == "bad":
            raise ValueError("no good")
        return b"done"

    caplog.set_level(logging.WARNING, logger="jobpool_async")
    async with PoolQueue(backend) as queue:
        await queue.enqueue_jobs([Job(id="ok", job_type="t"), Job(id="bad", job_type="t")])
        worker = Worker(queue, proc, assignee_id="w", config=Config(concurrency=2))
        async with worker:
            await _cancel_the_writing_runner(backend, worker, True)
            await until(lambda: backend.completes["bad"] >= 1, "the failure written")
            await until(lambda: not worker._writing, "the write ended")
        ok, bad = await queue.get_jobs(["ok", "bad"])
    assert ok.status is JobStatus.COMPLETED and ok.result == b"done"
    assert bad.status is JobStatus.FAILED_RETRY and bad.error_message == "no good"
    assert backend.completes == {"bad": 1}  # (2 before)
    assert [r.getMessage() for r in caplog.records if "could not" in r.getMessage()] == []
