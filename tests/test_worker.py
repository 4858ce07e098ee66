"""The Worker: concurrency, batched writes, cancellation, shutdown, recovery, cleanup.

Most tests run on the memory backend (the worker's logic does not depend on the
storage); those about storage sharing run on SQLite too. Waiting is always on
events or polling with a deadline.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from jobpool_async import (
    Config,
    Job,
    JobNotFoundError,
    JobStatus,
    MemoryBackend,
    PoolQueue,
    StorageError,
    Worker,
)
from jobpool_async.backends.base import Change
from jobpool_async.pytest_plugin import wait_for_status
from jobpool_async.testing import next_batch, until

S = JobStatus
DEADLINE = 10.0


@pytest.fixture
async def queue() -> AsyncIterator[PoolQueue]:
    q = PoolQueue(MemoryBackend())
    await q.open()
    try:
        yield q
    finally:
        await q.close()


def job(job_id: str, **kwargs: Any) -> Job:
    return Job(id=job_id, job_type="test", **kwargs)


async def status_of(queue: PoolQueue, job_id: str) -> JobStatus:
    return (await queue.get_job(job_id)).status


class Gate:
    """A processor whose jobs wait until released; records what it saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.running = 0
        self.max_running = 0
        self.result = b"done"
        self.on_start = asyncio.Event()

    async def __call__(self, job: Job) -> bytes:
        self.started.append(job.id)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.on_start.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(job.id)
            raise
        finally:
            self.running -= 1
        return self.result


# --- construction ---------------------------------------------------------------------


async def test_bad_arguments_are_rejected(queue: PoolQueue) -> None:
    async def proc(job: Job) -> bytes:
        return b""

    with pytest.raises(TypeError, match="PoolQueue"):
        Worker(object(), proc, assignee_id="w")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="assignee_id"):
        Worker(queue, proc, assignee_id="")
    with pytest.raises(TypeError, match="Config"):
        Worker(queue, proc, assignee_id="w", config={"concurrency": 2})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tag"):
        Worker(queue, proc, assignee_id="w", tags=[""])
    with pytest.raises(ValueError, match="grace"):
        Worker(queue, proc, assignee_id="w", grace=-1)
    with pytest.raises(TypeError, match="processor"):
        Worker(queue, "not callable", assignee_id="w")  # type: ignore[arg-type]


async def test_a_worker_runs_once(queue: PoolQueue) -> None:
    worker = Worker(queue, Gate(), assignee_id="w")
    async with worker:
        with pytest.raises(RuntimeError, match="runs once"):
            await worker.run()
    assert worker.stopped
    with pytest.raises(RuntimeError, match="runs once"):
        async with worker:
            pass


# --- running jobs -----------------------------------------------------------------------


async def test_runs_up_to_concurrency_jobs_at_once(queue: PoolQueue) -> None:
    gate = Gate()
    await queue.enqueue_jobs([job(f"j{i}") for i in range(7)])
    async with Worker(queue, gate, assignee_id="w", config=Config(concurrency=3)):
        await until(lambda: gate.running == 3, "three jobs running")
        stats = await queue.get_job_stats()
        assert stats.running_jobs == 3 and stats.pending_jobs == 4
        gate.release.set()
        for i in range(7):
            await wait_for_status(queue, f"j{i}", S.COMPLETED, timeout=DEADLINE)
    assert gate.max_running == 3
    assert (await queue.get_job("j0")).result == b"done"


async def test_outcomes(queue: PoolQueue) -> None:
    class Silent(Exception):
        pass

    async def proc(job: Job) -> Any:
        kind = job.job_definition
        if job.retry_count:  # each failing kind fails once, then succeeds
            return b"second"
        if kind == b"ok":
            return b"result:" + job.id.encode()
        if kind == b"none":
            return None
        if kind == b"bytearray":
            return bytearray(b"ba")
        if kind == b"boom":
            raise RuntimeError("it broke")
        if kind == b"silent":
            raise Silent()
        if kind == b"nul":
            raise ValueError("a\x00b")
        return 42  # not bytes

    kinds = ["ok", "none", "bytearray", "boom", "silent", "nul", "int"]
    await queue.enqueue_jobs([job(k, job_definition=k.encode()) for k in kinds])
    async with Worker(queue, proc, assignee_id="w", config=Config(concurrency=4)):
        for k in ["ok", "none", "bytearray"]:
            await wait_for_status(queue, k, S.COMPLETED)
        for k in ["boom", "silent", "nul", "int"]:
            await wait_for_status(queue, k, S.COMPLETED)
    jobs = {j.id: j for j in await queue.get_jobs(kinds)}
    assert jobs["ok"].result == b"result:ok"
    assert jobs["none"].result is None
    assert jobs["bytearray"].result == b"ba"
    assert jobs["boom"].error_message == "it broke"
    assert jobs["silent"].error_message == "Silent"
    assert jobs["nul"].error_message == "a\\x00b"
    assert jobs["int"].error_message == "the processor returned int, expected bytes"
    for k in ["boom", "silent", "nul", "int"]:  # the failure is kept after the retry
        assert jobs[k].retry_count == 1 and jobs[k].result == b"second"


async def test_a_failed_job_runs_again(queue: PoolQueue) -> None:
    seen: list[int] = []

    async def proc(job: Job) -> bytes:
        seen.append(job.retry_count)
        if job.retry_count < 2:
            raise RuntimeError(f"attempt {job.retry_count} failed")
        return b"third time lucky"

    await queue.enqueue_job(job("flaky"))
    async with Worker(queue, proc, assignee_id="w"):
        done = await wait_for_status(queue, "flaky", S.COMPLETED)
    assert seen == [0, 1, 2]
    assert done.retry_count == 2 and done.result == b"third time lucky"
    assert done.error_message == "attempt 1 failed"


async def test_only_jobs_with_the_workers_tags(queue: PoolQueue) -> None:
    await queue.enqueue_jobs([job("gpu", tags=["gpu", "x"]), job("cpu", tags=["cpu"])])

    async def proc(job: Job) -> bytes:
        return b""

    async with Worker(queue, proc, assignee_id="w", tags=["gpu"]):
        await wait_for_status(queue, "gpu", S.COMPLETED)
        await queue.enqueue_job(job("gpu2", tags=["gpu"]))  # younger than "cpu"
        await wait_for_status(queue, "gpu2", S.COMPLETED)
        assert await status_of(queue, "cpu") is S.INITIAL_PENDING


async def test_outcomes_finishing_together_are_written_in_one_call(
    queue: PoolQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the Worker completes jobs through complete_jobs' core, with changes it built, and
    # fails them through fail_jobs' core, with its Config.retry policy)
    calls: dict[str, list[int]] = {"_complete_checked": [], "_fail_with": []}
    for name in calls:
        real = getattr(queue, name)

        def spy(
            mapping: dict[str, Any], *more: Any, _real: Any = real, _name: str = name
        ) -> Awaitable[None]:
            calls[_name].append(len(mapping))
            return _real(mapping, *more)  # type: ignore[no-any-return]

        monkeypatch.setattr(queue, name, spy)

    release = asyncio.Event()
    started: list[str] = []

    async def proc(job: Job) -> bytes:
        started.append(job.id)
        await release.wait()
        if job.id.startswith("bad"):
            raise RuntimeError("no")
        return b"ok"

    await queue.enqueue_jobs([job(f"good{i}") for i in range(6)] + [job("bad0"), job("bad1")])
    async with Worker(queue, proc, assignee_id="w", config=Config(concurrency=8)):
        await until(lambda: len(started) == 8, "all running")
        release.set()
        for i in range(6):
            await wait_for_status(queue, f"good{i}", S.COMPLETED)
        await wait_for_status(queue, "bad0", (S.FAILED_RETRY, S.RUNNING))
    assert calls["_complete_checked"][0] == 6, calls
    assert calls["_fail_with"][0] == 2, calls


async def test_a_finished_job_is_written_while_others_still_run(queue: PoolQueue) -> None:
    gate = Gate()

    async def proc(job: Job) -> bytes:
        if job.id == "slow":
            return await gate(job)
        return b"quick"

    await queue.enqueue_job(job("slow"))
    async with Worker(queue, proc, assignee_id="w", config=Config(concurrency=2)):
        await until(lambda: gate.running == 1, "slow job running")
        await queue.enqueue_job(job("quick"))
        await wait_for_status(queue, "quick", S.COMPLETED, timeout=DEADLINE)
        assert gate.running == 1
        gate.release.set()
        await wait_for_status(queue, "slow", S.COMPLETED)


async def test_a_storage_error_while_writing_is_retried(
    queue: PoolQueue, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = queue._complete_checked  # (complete_jobs' core, which the Worker calls)
    failures = [StorageError("disk on fire")]

    async def flaky(changes: list[Change]) -> None:
        if failures:
            raise failures.pop()
        await real(changes)

    monkeypatch.setattr(queue, "_complete_checked", flaky)

    async def proc(job: Job) -> bytes:
        return b"ok"

    await queue.enqueue_job(job("a"))
    with caplog.at_level(logging.ERROR, logger="jobpool_async"):
        async with Worker(queue, proc, assignee_id="w"):
            await wait_for_status(queue, "a", S.COMPLETED)
    assert "writing job outcomes failed" in caplog.text
    assert not failures


async def test_a_storage_error_while_taking_jobs_is_retried_with_growing_delays(
    queue: PoolQueue, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/worker.md: the worker logs a failing stream and takes jobs again after a
    back-off that grows (0.05 s, then 0.1 s, ...)."""
    real = queue.backend.claim
    failures = [StorageError("claim failed again"), StorageError("claim failed")]

    async def flaky(*args: Any) -> list[Job]:
        if failures:
            raise failures.pop()
        return await real(*args)

    monkeypatch.setattr(queue.backend, "claim", flaky)

    async def proc(job: Job) -> bytes:
        return b"ok"

    await queue.enqueue_job(job("a"))
    with caplog.at_level(logging.ERROR, logger="jobpool_async"):
        async with Worker(queue, proc, assignee_id="w"):
            await wait_for_status(queue, "a", S.COMPLETED)
    assert not failures
    retries = [r.getMessage() for r in caplog.records if "taking jobs failed" in r.getMessage()]
    assert retries == [
        "worker w: taking jobs failed; retrying in 0.05 s",
        "worker w: taking jobs failed; retrying in 0.10 s",
    ]


async def test_outcomes_that_cannot_be_written_at_shutdown_are_given_up_and_named(
    queue: PoolQueue, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Storage keeps failing while the worker stops: after a bounded number of tries
    the outcomes are dropped with an error naming the jobs (they stay RUNNING until
    mark_worker_unresponsive/reset_running_jobs), and stop() returns."""

    async def broken(changes: list[Change]) -> None:
        raise StorageError("disk gone")

    monkeypatch.setattr(queue, "_complete_checked", broken)

    async def proc(job: Job) -> bytes:
        return b"ok"

    await queue.enqueue_job(job("lost"))
    with caplog.at_level(logging.ERROR, logger="jobpool_async"):
        async with Worker(queue, proc, assignee_id="w"):
            await until(lambda: "writing job outcomes failed" in caplog.text, "a failed write")
    assert "giving up writing job outcomes at shutdown" in caplog.text
    assert "storage kept failing; outcomes of 1 job(s) not written" in caplog.text
    assert "['lost']" in caplog.text
    assert (await queue.get_job("lost")).status is S.RUNNING
    assert await queue.mark_worker_unresponsive("w") == 1


async def test_outcomes_left_when_the_queue_closes_are_dropped_and_named(
    queue: PoolQueue, caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate()
    await queue.enqueue_job(job("late"))
    worker = Worker(queue, gate, assignee_id="w", grace=DEADLINE)
    with caplog.at_level(logging.ERROR, logger="jobpool_async"):
        runner = asyncio.ensure_future(worker.run())
        await until(lambda: gate.running == 1, "the job runs")
        await queue.close()
        gate.release.set()  # finishes after the close: its outcome cannot be written
        await asyncio.wait_for(runner, DEADLINE)
    assert "the queue is closed; outcomes of 1 job(s) not written" in caplog.text
    assert "['late']" in caplog.text


async def test_a_job_moved_meanwhile_is_logged_and_the_worker_goes_on(
    queue: PoolQueue, caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate()
    await queue.enqueue_job(job("a"))
    with caplog.at_level(logging.WARNING, logger="jobpool_async"):
        async with Worker(queue, gate, assignee_id="w"):
            await until(lambda: gate.running == 1, "running")
            await queue.stop_job("a", "stopped by an operator")
            gate.release.set()
            await until(lambda: "could not complete job 'a'" in caplog.text, "warning logged")
            await queue.enqueue_job(job("b"))
            await wait_for_status(queue, "b", S.COMPLETED)
    stopped = await queue.get_job("a")
    assert stopped.status is S.STOPPED and stopped.result is None


# --- cancellation -----------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_cancelling_a_running_job_cancels_its_processor(
    queue: PoolQueue, concurrency: int
) -> None:
    """With concurrency=1 the only slot is busy: the acknowledgement must not need it."""
    gate = Gate()
    await queue.enqueue_jobs([job("a"), job("b")])
    async with Worker(queue, gate, assignee_id="w", config=Config(concurrency=concurrency)):
        await until(lambda: "a" in gate.started, "a running")
        result = await queue.cancel_jobs(job_ids=["a"])
        assert result.cancelled == ["a"]
        stopped = await wait_for_status(queue, "a", S.STOPPED)
        assert gate.cancelled == ["a"]
        assert stopped.result is None
        gate.release.set()
        await wait_for_status(queue, "b", S.COMPLETED)


async def test_a_result_that_finished_first_wins_over_a_cancel(
    queue: PoolQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processor returned, its write is in flight, then the job is cancelled."""
    real = queue._complete_checked  # (complete_jobs' core, which the Worker calls)
    writing = asyncio.Event()
    go_on = asyncio.Event()

    async def slow_complete(changes: list[Change]) -> None:
        writing.set()
        await go_on.wait()
        await real(changes)

    monkeypatch.setattr(queue, "_complete_checked", slow_complete)

    async def proc(job: Job) -> bytes:
        return b"finished"

    await queue.enqueue_job(job("a"))
    async with Worker(queue, proc, assignee_id="w") as worker:
        await asyncio.wait_for(writing.wait(), DEADLINE)
        assert (await queue.cancel_jobs(job_ids=["a"])).cancelled == ["a"]
        assert await status_of(queue, "a") is S.CANCELLING
        assert worker._helpers, "the cancel handler was started"
        await until(lambda: not worker._helpers, "the cancel handler has acted (wrongly?)")
        go_on.set()
        done = await wait_for_status(queue, "a", S.COMPLETED)
    assert done.result == b"finished"


async def test_a_processor_that_ignores_the_cancel_and_returns_completes(
    queue: PoolQueue,
) -> None:
    started = asyncio.Event()

    async def proc(job: Job) -> bytes:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return b"cleaned up and finished"
        return b""

    await queue.enqueue_job(job("a"))
    async with Worker(queue, proc, assignee_id="w"):
        await asyncio.wait_for(started.wait(), DEADLINE)
        await queue.cancel_jobs(job_ids=["a"])
        done = await wait_for_status(queue, "a", S.COMPLETED)
    assert done.result == b"cleaned up and finished"


async def test_a_processor_that_fails_while_cancelled_ends_stopped(queue: PoolQueue) -> None:
    started = asyncio.Event()

    async def proc(job: Job) -> bytes:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("failed while cleaning up") from None
        return b""

    await queue.enqueue_job(job("a"))
    async with Worker(queue, proc, assignee_id="w"):
        await asyncio.wait_for(started.wait(), DEADLINE)
        await queue.cancel_jobs(job_ids=["a"])
        stopped = await wait_for_status(queue, "a", S.STOPPED)
    assert stopped.retry_count == 0


async def test_cancelling_a_job_again_after_its_id_was_reused(queue: PoolQueue) -> None:
    """Cancel job x, delete it, enqueue a new x: cancelling the new one still works.

    (Fails while ``JobStream._cancels_seen`` remembers cancelled ids without their
    ``assigned_at``: the second cancel of a reused id is never passed on.)
    """
    gate = Gate()
    async with Worker(queue, gate, assignee_id="w", grace=0.05):
        for round_ in range(2):
            gate.on_start.clear()
            await queue.enqueue_job(job("x", job_definition=str(round_).encode()))
            await asyncio.wait_for(gate.on_start.wait(), DEADLINE)
            assert (await queue.cancel_jobs(job_ids=["x"])).cancelled == ["x"]
            await wait_for_status(queue, "x", S.STOPPED, timeout=3)
            assert gate.cancelled == ["x"] * (round_ + 1)
            assert await queue.delete_jobs(job_ids=["x"]) == 1


async def test_a_cancel_never_hits_an_older_run_with_the_same_id(
    queue: PoolQueue, caplog: pytest.LogCaptureFixture
) -> None:
    """Old x still runs (an operator stopped and deleted it); new x runs too.

    The old run's late result must not complete the new job, and cancelling x
    must cancel the new run only.
    """
    old_release = asyncio.Event()
    cancelled: list[bytes] = []
    started: list[bytes] = []

    async def proc(job: Job) -> bytes:
        started.append(job.job_definition)
        try:
            if job.job_definition == b"old":
                await old_release.wait()
                return b"old result"
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(job.job_definition)
            raise
        return b""

    with caplog.at_level(logging.WARNING, logger="jobpool_async"):
        async with Worker(queue, proc, assignee_id="w", config=Config(concurrency=2)):
            await queue.enqueue_job(job("x", job_definition=b"old"))
            await until(lambda: started == [b"old"], "old running")
            await queue.stop_job("x", "an operator stopped it")
            assert await queue.delete_jobs(job_ids=["x"]) == 1
            await queue.enqueue_job(job("x", job_definition=b"new"))
            await until(lambda: started == [b"old", b"new"], "new running")
            old_release.set()
            await until(lambda: "dropping the old run's outcome" in caplog.text, "dropped")
            still = await queue.get_job("x")
            assert still.status is S.RUNNING and still.result is None
            await queue.cancel_jobs(job_ids=["x"])
            await wait_for_status(queue, "x", S.STOPPED)
            assert cancelled == [b"new"]
    new = await queue.get_job("x")
    assert new.status is S.STOPPED and new.result is None


async def test_a_cancel_ends_only_its_own_runner_and_later_jobs_run_unharmed(
    queue: PoolQueue,
) -> None:
    """Two suspended jobs on two runners: cancelling one reaches only its processor;
    the other finishes, and jobs handed over after the cancel (a replacement runner or
    a parked one takes them) run to the end without a stray ``CancelledError``."""
    gate = Gate()
    await queue.enqueue_jobs([job("a"), job("b")])
    async with Worker(queue, gate, assignee_id="w", config=Config(concurrency=2)) as worker:
        await until(lambda: gate.running == 2, "a and b running")
        assert (await queue.cancel_jobs(job_ids=["a"])).cancelled == ["a"]
        await wait_for_status(queue, "a", S.STOPPED)
        assert gate.cancelled == ["a"]
        assert await status_of(queue, "b") is S.RUNNING
        gate.release.set()
        await wait_for_status(queue, "b", S.COMPLETED)
        await queue.enqueue_jobs([job(f"n{i}") for i in range(6)])
        for i in range(6):
            await wait_for_status(queue, f"n{i}", S.COMPLETED)
        assert gate.cancelled == ["a"]
        assert len(worker._runners) <= 2  # the retired runner is gone, none leaked
    assert not worker._runners


async def test_a_job_cancelled_before_a_runner_takes_it_never_runs(
    queue: PoolQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """White-box: the job is queued for the runners, but the runner that would take it
    has not been woken yet (held back here); the cancel takes it off the queue, so
    its processor never runs, and the runner woken later finds nothing of it."""
    gate = Gate()
    worker = Worker(queue, gate, assignee_id="w", config=Config(concurrency=2))
    real_add = worker._add_puller
    held = asyncio.Event()
    go_on = asyncio.Event()

    def add_puller_later() -> None:
        queued = [key[0] for key in worker._queued]
        if queued == ["b"] and not go_on.is_set():
            held.set()
            worker._pullers += 1  # counted as woken, as a wake in flight is

            async def wake_later() -> None:
                await go_on.wait()
                worker._pullers -= 1
                real_add()

            worker._spawn(wake_later())
            return
        real_add()

    monkeypatch.setattr(worker, "_add_puller", add_puller_later)
    await queue.enqueue_job(job("a"))
    async with worker:
        await until(lambda: gate.running == 1, "a running")
        await queue.enqueue_job(job("b"))
        await asyncio.wait_for(held.wait(), DEADLINE)
        assert await status_of(queue, "b") is S.RUNNING
        assert (await queue.cancel_jobs(job_ids=["b"])).cancelled == ["b"]
        stopped = await wait_for_status(queue, "b", S.STOPPED)
        assert not worker._queued
        go_on.set()
        gate.release.set()
        await wait_for_status(queue, "a", S.COMPLETED)
        await queue.enqueue_job(job("c"))
        await wait_for_status(queue, "c", S.COMPLETED)
    assert gate.started == ["a", "c"] and gate.cancelled == []
    assert stopped.error_message == "" or "cancel" in stopped.error_message.lower()


async def test_many_concurrent_cancels_reach_exactly_their_jobs(queue: PoolQueue) -> None:
    """Under concurrency: 300 jobs whose processors suspend a varying number of times,
    10 at once, while four tasks cancel random jobs (queued, just handed over, mid-run,
    finished). A processor only ever sees the cancellation of its own job; every job
    ends COMPLETED, or STOPPED/UNSCHEDULED if it was cancelled; no runner is left."""
    rng = random.Random(20)
    ids = [f"j{i:03d}" for i in range(300)]
    hit: list[str] = []
    ran: set[str] = set()

    async def proc(job: Job) -> bytes:
        ran.add(job.id)
        try:
            for _ in range(int(job.job_definition or b"0")):
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            hit.append(job.id)
            raise
        return b"ok"

    cancelled: set[str] = set()

    async def canceller(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(60):
            chosen = local.sample(ids, 3)
            result = await queue.cancel_jobs(job_ids=chosen)
            cancelled.update(result.cancelled)
            for _ in range(local.randrange(4)):
                await asyncio.sleep(0)

    jobs = [job(i, job_definition=str(rng.randrange(6)).encode()) for i in ids]
    async with Worker(queue, proc, assignee_id="w", config=Config(concurrency=10)) as worker:
        enqueue = asyncio.ensure_future(queue.enqueue_jobs(jobs))
        await asyncio.wait_for(asyncio.gather(enqueue, *(canceller(k) for k in range(4))), DEADLINE)

        # every job final (woken by the queue's own moves, no polling)
        await asyncio.gather(*(queue.wait_for(i, timeout=DEADLINE) for i in ids))
        assert len(worker._runners) <= 10
    final = {j.id: j.status for j in await queue.get_jobs(ids)}
    assert set(hit) <= cancelled, f"cancellations reached other jobs: {set(hit) - cancelled}"
    assert all(final[i] is S.STOPPED for i in hit)
    assert set(final.values()) <= {S.COMPLETED, S.STOPPED, S.UNSCHEDULED}  # (cancelled pending)
    assert {i for i, s in final.items() if s is not S.COMPLETED} <= cancelled
    assert hit, "no cancellation reached a running processor"
    assert not worker._runners and not worker._queued


class _CountedScans(set[Any]):
    """A set that counts the loops over it."""

    scans = 0

    def __iter__(self) -> Iterator[Any]:
        self.scans += 1
        return super().__iter__()


async def test_a_cancel_finds_the_runner_of_its_job_without_a_scan(queue: PoolQueue) -> None:
    """Cancelling each of 60 running jobs finds the runner of that job without going
    through the runners (it looked through them all for each: 60 x 60 looks)."""
    gate = Gate()
    ids = [f"j{i:02d}" for i in range(60)]
    await queue.enqueue_jobs([job(i) for i in ids])
    worker = Worker(queue, gate, assignee_id="w", config=Config(concurrency=60))
    runners = worker._runners = _CountedScans()
    async with worker:
        await until(lambda: gate.running == 60, "all 60 running")
        await queue.cancel_jobs(job_ids=ids)
        await until(lambda: len(gate.cancelled) == 60, "every processor cancelled")
        assert runners.scans == 0
    assert {j.status for j in await queue.get_jobs(ids)} == {S.STOPPED}


async def test_a_job_that_ends_the_grace_from_its_own_code_is_interrupted(
    queue: PoolQueue,
) -> None:
    """``_end_grace`` called by a job's own code between two suspensions finds that
    job's runner (the current task's): the job is cancelled at its next suspension
    and runs again."""
    seen: list[str] = []
    worker: Worker | None = None

    async def proc(j: Job) -> bytes:
        assert worker is not None
        if j.attempts > 1:
            return b"again"
        worker._end_grace()
        try:
            await asyncio.sleep(DEADLINE)
        except asyncio.CancelledError:
            seen.append(j.id)
            raise
        return b"late"

    await queue.enqueue_jobs([job("a")])
    worker = Worker(queue, proc, assignee_id="w", config=Config(concurrency=1))
    async with worker:
        done = await wait_for_status(queue, "a", S.COMPLETED)
    assert seen == ["a"]
    assert (done.attempts, done.result) == (2, b"again")


async def test_a_runner_goes_on_after_a_job_timeout_without_a_stray_cancel(
    queue: PoolQueue,
) -> None:
    """``job_timeout`` cancels the runner's task for one job and takes the cancellation
    back: the same runner's next job (concurrency 1) must not be cancelled."""
    seen: list[str] = []

    async def proc(job: Job) -> bytes:
        if job.id == "slow":
            await asyncio.Event().wait()
        for _ in range(3):
            await asyncio.sleep(0.005)
        seen.append(job.id)
        return b"ok"

    config = Config(concurrency=1, job_timeout=timedelta(milliseconds=50))
    await queue.enqueue_job(job("slow"))
    async with Worker(queue, proc, assignee_id="w", config=config) as worker:
        failed = await wait_for_status(queue, "slow", S.FAILED_RETRY)
        assert "job_timeout" in failed.error_message
        runners = set(worker._runners)
        await queue.enqueue_job(job("next"))
        await wait_for_status(queue, "next", S.COMPLETED)
        assert worker._runners == runners  # the same runner ran it
    assert seen == ["next"]


async def test_each_job_runs_in_a_context_of_its_own(queue: PoolQueue) -> None:
    """A context variable a processor sets does not leak into the next job run by the
    same runner (as with a task per job)."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[tuple[str, str]] = []

    async def proc(job: Job) -> bytes:
        seen.append((job.id, var.get()))
        var.set(job.id)
        if job.id == "b":
            await asyncio.sleep(0)
            seen.append(("b after a suspension", var.get()))
        return b""

    await queue.enqueue_jobs([job("a"), job("b"), job("c")])
    async with Worker(queue, proc, assignee_id="w", config=Config(concurrency=1)):
        await wait_for_status(queue, "c", S.COMPLETED)
    assert seen == [("a", "unset"), ("b", "unset"), ("b after a suspension", "b"), ("c", "unset")]


# --- shutdown ---------------------------------------------------------------------------


async def test_stop_lets_running_jobs_finish_and_takes_no_new_ones(queue: PoolQueue) -> None:
    gate = Gate()
    await queue.enqueue_job(job("a"))
    worker = Worker(queue, gate, assignee_id="w")
    await worker.__aenter__()
    await until(lambda: gate.running == 1, "a running")
    stopping = asyncio.ensure_future(worker.stop(grace=DEADLINE))
    await until(lambda: worker._consumer is not None and worker._consumer.done(), "no new jobs")
    await queue.enqueue_job(job("late"))
    assert not stopping.done()
    gate.release.set()
    await asyncio.wait_for(stopping, DEADLINE)
    assert await status_of(queue, "a") is S.COMPLETED
    assert await status_of(queue, "late") is S.INITIAL_PENDING
    assert gate.started == ["a"]
    await worker.stop()  # again: fine


async def test_stop_after_the_grace_period_fails_the_jobs_so_they_run_again(
    queue: PoolQueue,
) -> None:
    gate = Gate()
    await queue.enqueue_jobs([job("a"), job("b")])
    async with Worker(queue, gate, assignee_id="w", config=Config(concurrency=2), grace=0.05):
        await until(lambda: gate.running == 2, "both running")
    assert sorted(gate.cancelled) == ["a", "b"]
    for job_id in "ab":
        failed = await queue.get_job(job_id)
        assert failed.status is S.FAILED_RETRY
        assert "shut down before the job finished" in failed.error_message
        assert failed.retry_count == 1
    # ... and another worker runs them again
    async with Worker(queue, lambda j: _ok(), assignee_id="w2"):
        await wait_for_status(queue, "a", S.COMPLETED)
        await wait_for_status(queue, "b", S.COMPLETED)


async def _ok() -> bytes:
    return b"ok"


async def test_a_processor_that_returns_when_cancelled_at_shutdown_completes(
    queue: PoolQueue,
) -> None:
    started = asyncio.Event()

    async def proc(job: Job) -> bytes:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return b"saved my work"
        return b""

    await queue.enqueue_job(job("a"))
    worker = Worker(queue, proc, assignee_id="w", grace=0)
    async with worker:
        await asyncio.wait_for(started.wait(), DEADLINE)
    done = await queue.get_job("a")
    assert done.status is S.COMPLETED and done.result == b"saved my work"
    assert not worker._reasons  # why it was interrupted is not kept once it is recorded


async def test_a_job_stopped_before_a_runner_starts_it_is_still_recorded(
    queue: PoolQueue,
) -> None:
    """White-box: a job handed over but not started yet (queued for the runners) that
    is stopped as a shutdown would stop it never runs its processor then; the worker
    must record it anyway (FAILED_RETRY, run again)."""
    ran: list[int] = []

    async def proc(job: Job) -> bytes:
        ran.append(job.retry_count)
        return b"second run"

    worker = Worker(queue, proc, assignee_id="w")
    real_accept = worker._accept
    cancelled: list[str] = []

    def accept_then_cancel(batch: list[Job]) -> None:
        real_accept(batch)
        if not cancelled:
            j = batch[0]
            cancelled.append(j.id)
            key = (j.id, j.assigned_at)
            assert key in worker._queued and worker._runner_of(key) is None  # not started
            worker._interrupt(key, "shutdown")
            assert (j.id, j.assigned_at) not in worker._running

    worker._accept = accept_then_cancel  # type: ignore[method-assign]
    await queue.enqueue_job(job("a"))
    async with worker:
        done = await wait_for_status(queue, "a", S.COMPLETED)
    assert ran == [1]
    assert done.retry_count == 1 and "shut down before the job finished" in done.error_message


async def test_cancelling_the_run_task_records_every_running_job(queue: PoolQueue) -> None:
    """CancelledError is a BaseException: the job must not stay RUNNING with no owner."""
    gate = Gate()
    await queue.enqueue_jobs([job("a"), job("b")])
    worker = Worker(queue, gate, assignee_id="w", config=Config(concurrency=2), grace=60)
    task = asyncio.ensure_future(worker.run())
    await until(lambda: gate.running == 2, "both running")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for job_id in "ab":
        assert await status_of(queue, job_id) is S.FAILED_RETRY
    assert worker.stopped
    await worker.stop()


async def test_a_cancel_during_shutdown_still_ends_stopped(queue: PoolQueue) -> None:
    started = asyncio.Event()

    async def proc(job: Job) -> bytes:
        started.set()
        await asyncio.Event().wait()
        return b""

    await queue.enqueue_job(job("a"))
    worker = Worker(queue, proc, assignee_id="w")
    await worker.__aenter__()
    await asyncio.wait_for(started.wait(), DEADLINE)
    stopping = asyncio.ensure_future(worker.stop(grace=DEADLINE))
    await until(lambda: worker._consumer is not None and worker._consumer.done(), "stopping")
    await queue.cancel_jobs(job_ids=["a"])
    await asyncio.wait_for(stopping, DEADLINE)
    assert await status_of(queue, "a") is S.STOPPED


async def test_foreground_run_and_concurrent_stops(queue: PoolQueue) -> None:
    gate = Gate()
    gate.release.set()
    await queue.enqueue_job(job("a"))
    worker = Worker(queue, gate, assignee_id="w")
    runner = asyncio.ensure_future(worker.run())
    await wait_for_status(queue, "a", S.COMPLETED)
    await asyncio.gather(worker.stop(), worker.stop(grace=0))
    await asyncio.wait_for(runner, DEADLINE)
    assert runner.result() is None


async def test_stop_before_start(queue: PoolQueue) -> None:
    worker = Worker(queue, Gate(), assignee_id="w")
    await worker.stop()
    assert worker.stopped
    with pytest.raises(RuntimeError):
        await worker.run()


async def test_the_worker_ends_when_the_queue_closes(queue: PoolQueue) -> None:
    worker = Worker(queue, Gate(), assignee_id="w")
    runner = asyncio.ensure_future(worker.run())
    await asyncio.wait_for(worker._started.wait(), DEADLINE)
    await queue.close()
    await asyncio.wait_for(runner, DEADLINE)
    assert worker.stopped


async def test_start_on_a_closed_queue_raises(queue: PoolQueue) -> None:
    from jobpool_async import QueueClosedError

    await queue.close()
    with pytest.raises(QueueClosedError):
        async with Worker(queue, Gate(), assignee_id="w"):
            pass


# --- recovery and cleanup -------------------------------------------------------------


async def _leave_running(queue: PoolQueue, job_id: str) -> None:
    """A job handed to a consumer that then vanished: RUNNING, nobody working on it."""
    await queue.enqueue_job(job(job_id, tags=[f"only:{job_id}"]))
    async with queue.stream_jobs("crashed", tags=[f"only:{job_id}"]) as stream:
        await asyncio.wait_for(stream.__anext__(), DEADLINE)
    assert await status_of(queue, job_id) is S.RUNNING


async def test_recover_on_start_is_off_by_default(queue: PoolQueue) -> None:
    await _leave_running(queue, "orphan")
    await queue.enqueue_job(job("marker"))
    async with Worker(queue, lambda j: _ok(), assignee_id="w"):
        await wait_for_status(queue, "marker", S.COMPLETED)
        assert await status_of(queue, "orphan") is S.RUNNING


async def test_recover_on_start_runs_jobs_left_running(queue: PoolQueue) -> None:
    await _leave_running(queue, "orphan")
    async with Worker(queue, lambda j: _ok(), assignee_id="w", recover_on_start=True):
        done = await wait_for_status(queue, "orphan", S.COMPLETED)
    assert done.assignee_id == "w"


async def test_periodic_ttl_cleanup(queue: PoolQueue) -> None:
    config = Config(ttl=timedelta(milliseconds=1), cleanup_interval=timedelta(milliseconds=20))
    await queue.enqueue_jobs([job("a"), job("fails")])

    async def proc(job: Job) -> bytes:
        if job.id == "fails":
            raise RuntimeError("no")
        return b""

    async with Worker(queue, proc, assignee_id="w", config=config):
        async with asyncio.timeout(DEADLINE):
            while True:
                try:
                    await queue.get_job("a")
                except JobNotFoundError:
                    break
                await asyncio.sleep(0.005)
        assert (await queue.get_job("fails")).retry_count >= 1


# --- logging ------------------------------------------------------------------------------


async def test_nothing_is_logged_per_job_at_info(
    queue: PoolQueue, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    async def proc(job: Job) -> bytes:
        if job.retry_count == 0 and job.id.endswith("7"):
            raise RuntimeError("first attempt fails")
        return b""

    n = 60
    await queue.enqueue_jobs([job(f"j{i}") for i in range(n)])
    with caplog.at_level(logging.INFO, logger="jobpool_async"):
        async with Worker(queue, proc, assignee_id="w", config=Config(concurrency=5)):
            async with asyncio.timeout(DEADLINE):
                while (await queue.get_job_stats()).completed_jobs < n:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) <= 3, [r.getMessage() for r in infos]
    # Above INFO: only the processor's failures (WARNING with traceback), one per run.
    warnings = [r for r in caplog.records if r.levelno > logging.INFO]
    assert sorted(r.getMessage().split("'")[1] for r in warnings) == sorted(
        f"j{i}" for i in range(n) if str(i).endswith("7")
    )
    assert all(r.levelno == logging.WARNING and r.exc_info for r in warnings)
    assert all(r.name.startswith("jobpool_async") for r in caplog.records)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


# --- storage shared between processes -----------------------------------------------------


async def test_a_cancel_from_another_process_reaches_the_worker(tmp_path: Path) -> None:
    """Two queues on one SQLite file stand for two processes: pushed within poll_interval."""
    from jobpool_async import SQLiteBackend

    path = tmp_path / "jobs.db"
    gate = Gate()
    async with (
        PoolQueue(SQLiteBackend(path), poll_interval=0.05) as mine,
        PoolQueue(SQLiteBackend(path), poll_interval=0.05) as other,
    ):
        await other.enqueue_job(job("a"))
        async with Worker(mine, gate, assignee_id="w"):
            await until(lambda: gate.running == 1, "a running")
            await other.cancel_jobs(job_ids=["a"])
            await wait_for_status(other, "a", S.STOPPED)
            assert gate.cancelled == ["a"]


async def test_on_every_backend(make_backend: Callable[[], Any]) -> None:
    """The whole loop on each backend: concurrency, retries, a cancel, a shutdown."""
    started = asyncio.Event()

    async def proc(job: Job) -> bytes:
        if job.id == "long":
            started.set()
            await asyncio.Event().wait()
        if job.retry_count == 0 and job.id.endswith("3"):
            raise RuntimeError("first attempt fails")
        return job.id.encode()

    async with PoolQueue(make_backend(), poll_interval=0.05) as queue:
        ids = await queue.enqueue_jobs([job(f"j{i}") for i in range(40)])
        await queue.enqueue_job(job("long"))
        async with Worker(queue, proc, assignee_id="w", config=Config(concurrency=4)):
            await asyncio.wait_for(started.wait(), DEADLINE)
            await queue.cancel_jobs(job_ids=["long"])
            for job_id in ids:
                await wait_for_status(queue, job_id, S.COMPLETED)
            await wait_for_status(queue, "long", S.STOPPED)
        stats = await queue.get_job_stats()
        assert stats.completed_jobs == 40 and stats.stopped_jobs == 1
        assert stats.total_retries == 4  # j3, j13, j23, j33
        assert (await queue.get_job("j13")).result == b"j13"


@pytest.mark.parametrize("backend_name", ["memory", "sqlite"])
async def test_under_concurrent_cancels_and_failures_every_job_ends_recorded(
    make_backend: Callable[[], Any],
) -> None:
    """Two workers, random short processors, failures and cancels from another task,
    then a shutdown with a short grace: no job may stay RUNNING or CANCELLING."""
    rng = random.Random(1234)
    running = 0
    peak = 0

    async def proc(job: Job) -> bytes:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(rng.choice([0, 0, 0.001, 0.003]))
            if rng.random() < 0.2:
                raise RuntimeError("random failure")
            return b"ok"
        finally:
            running -= 1

    n = 300
    async with PoolQueue(make_backend(), poll_interval=0.05) as queue:
        ids = await queue.enqueue_jobs([job(f"j{i}") for i in range(n)])
        workers = [
            Worker(queue, proc, assignee_id=f"w{k}", config=Config(concurrency=5), grace=0.01)
            for k in range(2)
        ]
        for w in workers:
            await w.__aenter__()
        for _ in range(40):
            await queue.cancel_jobs(job_ids=rng.sample(ids, 3))
            await asyncio.sleep(0.002)
        async with asyncio.timeout(DEADLINE):
            while (await queue.get_job_stats()).pending_jobs:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        await asyncio.gather(*(w.stop() for w in workers))
        stats = await queue.get_job_stats()
        assert stats.running_jobs == 0, stats
        assert stats.total_jobs == n
        assert peak <= 10
        assert stats.by_status[S.STOPPED] + stats.by_status[S.UNSCHEDULED] > 0
        for j in await queue.get_jobs(ids):
            assert j.status in (S.COMPLETED, S.STOPPED, S.UNSCHEDULED, S.FAILED_RETRY), j


class _SuspendingApplies(MemoryBackend):
    """Every apply suspends once, as a backend with a storage thread's does."""

    async def apply(self, changes: Any, now: Any, refill: Any = None) -> Any:
        await asyncio.sleep(0)
        return await super().apply(changes, now, refill)


async def test_a_refill_handed_to_the_worker_does_not_wake_its_consumer() -> None:
    """Each write of a batch's outcomes frees its slots and refills them, handing the
    jobs to the runners: the consumer (waiting in the stream for a free slot) has
    nothing to do then and is not woken for it (it was, once per batch, to find its
    slots full and wait again)."""
    async with PoolQueue(_SuspendingApplies()) as queue:
        await queue.enqueue_jobs([job(f"j{i:03d}") for i in range(200)])
        waits = 0
        real_wait = queue._notifier.wait

        async def counted(*args: Any) -> bool:
            nonlocal waits
            waits += 1
            return await real_wait(*args)

        queue._notifier.wait = counted  # type: ignore[method-assign,assignment]
        done = asyncio.Event()
        ran: list[str] = []

        async def proc(j: Job) -> bytes:
            ran.append(j.id)
            if len(ran) == 200:
                done.set()
            return b"ok"

        async with Worker(queue, proc, assignee_id="w", config=Config(concurrency=10)):
            await asyncio.wait_for(done.wait(), DEADLINE)
            stats = await queue.get_job_stats()
            async with asyncio.timeout(DEADLINE):  # the last outcomes written
                while stats.running_jobs or stats.pending_jobs:  # (polled, with a deadline)
                    await asyncio.sleep(0.01)
                    stats = await queue.get_job_stats()
        assert sorted(ran) == [f"j{i:03d}" for i in range(200)]
        assert stats.completed_jobs == 200
        assert waits <= 5, waits  # (20 batches: one wait per batch before)


class _GatedApplies(MemoryBackend):
    """Applies naming a job of ``gates`` wait for its event (a storage round trip held
    open); ``claims`` counts the claims of streams' own (a refill's is no call)."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, asyncio.Event] = {}
        self.held: set[str] = set()
        self.claims = 0

    async def apply(self, changes: Any, now: Any, refill: Any = None) -> Any:
        for change in changes:
            gate = self.gates.get(change.job_id)
            if gate is not None:
                self.held.add(change.job_id)
                await gate.wait()
        return await super().apply(changes, now, refill)

    async def claim(self, *args: Any) -> Any:
        self.claims += 1
        return await super().claim(*args)


async def test_a_full_worker_stream_left_waiting_by_a_refill_is_no_longer_hungry() -> None:
    """A Worker's consumer waits with a free slot its claim found no job for; a job
    then arrives unannounced (as from another process) and a refill (a completion of
    one of its jobs by another caller, while its own write's refill is still under
    way) hands it to the runners, filling the stream: the consumer is left waiting,
    not woken. It must not still count as a stream waiting for jobs: while one does,
    every other stream's completions skip their refill (so that the waiting one gets
    the jobs first), and each batch of theirs costs a claim of its own."""
    backend = _GatedApplies()
    first_done, rest = asyncio.Event(), asyncio.Event()

    async def proc(j: Job) -> bytes:
        await (first_done if j.id == "w1" else rest).wait()
        return b"ok"

    async with PoolQueue(backend) as queue:
        await queue.enqueue_jobs([job("w1", tags=["w"]), job("w2", tags=["w"])])
        backend.gates = {"w1": asyncio.Event(), "w2": asyncio.Event()}
        worker = Worker(queue, proc, assignee_id="w", tags=["w"], config=Config(concurrency=3))
        async with worker:
            try:
                await _fill_a_hungry_worker_stream(queue, backend, worker, first_done)
                # Meanwhile another stream completes its batches: each refills it in
                # the same call (no claim of its own), as with no stream waiting.
                await queue.enqueue_jobs([job(f"s{i}", tags=["s"]) for i in range(3)])
                async with queue.stream_jobs("s", tags=["s"], max_assigned_jobs=1) as s:
                    batch = await next_batch(s)
                    claims = backend.claims
                    for _ in range(2):
                        await queue.complete_jobs({batch[0].id: b"ok"})
                        batch = await next_batch(s)
                    assert backend.claims == claims  # (one claim per batch before)
            finally:  # (the worker's stop waits for its writes)
                for gate in backend.gates.values():
                    gate.set()
                rest.set()


async def _fill_a_hungry_worker_stream(
    queue: PoolQueue, backend: _GatedApplies, worker: Worker, first_done: asyncio.Event
) -> None:
    stream = worker._stream
    assert stream is not None
    await until(lambda: len(stream._held) == 2 and stream._waiting, "w1, w2 held")
    await backend.insert([job("w3", tags=["w"])])  # no wake-up: none was sent
    first_done.set()  # the worker writes w1's outcome: a refill, held open
    await until(lambda: "w1" in backend.held, "w1's write under way")
    other = asyncio.ensure_future(queue.complete_job("w2", b"elsewhere"))
    await until(lambda: "w2" in backend.held, "w2's completion under way")
    backend.gates["w2"].set()  # its refill claims w3 for the worker: the stream is full
    await other
    await until(lambda: "w3" in stream._held, "w3 handed to the worker")
