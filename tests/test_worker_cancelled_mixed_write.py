"""A Worker's write of outcomes other than completions (a failure, a discard:
``Worker._flush_mixed``) whose writer, a runner, is cancelled while the write is under
way goes on in a task (the queue's carried call) and must be that write's only
outcome, as a4702f0 made it for completions: written, it is not written again (b94acb5;
found by this test before it, LEAD-NOTES 22:30).

Here it matters more than for a completion: a failure is not guarded by the
assignment, and the job it made eligible may be claimed by another stream before a
second write of the same failure; that write then fails the other stream's run (its
job eligible again while that stream runs it). (Reviewer, session 14.)
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from jobpool_async import Config, Discard, Job, JobStatus, PoolQueue, Retry, Worker
from jobpool_async.backends import MemoryBackend
from jobpool_async.backends.base import DISCARD, FAIL
from jobpool_async.testing import DEADLINE, FakeClock, next_batch, until

S = JobStatus


class _GatedMoves(MemoryBackend):
    """Applies of ``transition`` wait, each for the next of ``gates`` (a storage round
    trip held open, carried in the caller's task as on SQLite or LevelDB); ``writer``
    is the task of the first; ``writes`` counts the changes that reach the store."""

    def __init__(self, transition: Any) -> None:
        super().__init__()
        self.transition = transition
        self.gates: list[asyncio.Event] = [asyncio.Event() for _ in range(8)]
        self.calls = 0
        self.writer: asyncio.Task[Any] | None = None
        self.writes: Counter[str] = Counter()

    async def apply(self, changes: Any, now: Any, refill: Any = None) -> Any:
        if any(c.transition is self.transition for c in changes):
            gate = self.gates[self.calls]
            if not self.calls:
                self.writer = asyncio.current_task()
            self.calls += 1
            await gate.wait()
            self.writes.update(c.job_id for c in changes if c.transition is self.transition)
        return await super().apply(changes, now, refill)


@pytest.mark.parametrize("kind", ["fail", "discard"])
async def test_a_runner_cancelled_during_a_write_of_other_outcomes_writes_once(
    caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """The job's outcome is written once, nothing is logged; with a failure (due after
    its minute), another stream that claimed the job after that write keeps it RUNNING."""
    transition = {"fail": FAIL, "discard": DISCARD}[kind]
    backend = _GatedMoves(transition)
    caplog.set_level(logging.WARNING, logger="jobpool_async.worker")

    async def proc(job: Job) -> bytes:
        if kind == "discard":
            raise Discard("given up")
        raise Retry(timedelta(minutes=1), "again in a minute")

    clock = FakeClock(datetime(2030, 1, 1, tzinfo=UTC))
    async with PoolQueue(backend, lease=None, clock=clock) as queue:
        await queue.enqueue_jobs([Job(id="a", job_type="t")])
        worker = Worker(queue, proc, assignee_id="w", config=Config(concurrency=1))
        await worker.__aenter__()
        stopping: asyncio.Task[None] | None = None
        try:
            await until(lambda: backend.calls >= 1, "the runner's write")
            writer = backend.writer
            assert writer is not None and writer in worker._by_task  # (a runner)
            writer.cancel()
            await until(writer.done, "the runner ended")
            # the worker takes no more jobs (else it would take "a" again itself)
            stopping = asyncio.ensure_future(worker.stop())
            await until(lambda: worker._consumer is None or worker._consumer.done(), "no consumer")
            backend.gates[0].set()  # the write goes on, in its task, and is made
            await until(lambda: backend.writes["a"] == 1, "the first write")
            if kind == "fail":
                assert (await queue.get_job("a")).status is S.FAILED_RETRY
                clock.advance(timedelta(minutes=1))  # due (not before: no refill took it)
                async with queue.stream_jobs("other", max_assigned_jobs=1) as other:
                    (taken,) = await next_batch(other)
                    assert taken.id == "a"
                    for gate in backend.gates[1:]:
                        gate.set()  # a second write, if any, is made now
                    await asyncio.wait_for(stopping, DEADLINE)
                    again = await queue.get_job("a")
                    assert (again.status, again.assignee_id) == (S.RUNNING, "other"), again
                    await queue.complete_job("a", b"by other")
            else:
                for gate in backend.gates[1:]:
                    gate.set()
                await asyncio.wait_for(stopping, DEADLINE)
                assert (await queue.get_job("a")).status is S.DISCARDED
        finally:
            for gate in backend.gates:
                gate.set()
            await asyncio.wait_for(stopping or worker.stop(), DEADLINE)
        assert backend.writes == {"a": 1}
        assert [r.getMessage() for r in caplog.records if "could not" in r.getMessage()] == []
