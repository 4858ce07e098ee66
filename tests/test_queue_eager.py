"""The queue's eager start of a call (``jobpool_async._eager``): a call that finishes
without suspending needs no task; one that suspends is driven on in the awaiting task
(``carry``), with no task, and the awaiting task's cancellation never reaches it: it
then goes on in a task of its own, exactly as it would have in one from the start
(its result, its error)."""

from __future__ import annotations

import asyncio
import contextvars
from pathlib import Path
from typing import Any

import pytest

from jobpool_async import Job, JobStatus, PoolQueue
from jobpool_async._eager import Started, carry, start
from jobpool_async.backends import LevelDBBackend, SQLiteBackend
from jobpool_async.backends.memory import MemoryBackend
from jobpool_async.testing import PauseAfterApply

DEADLINE = 10.0
_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("_VAR", default="unset")


async def _at_once(value: int) -> int:
    return value * 2


async def _fails_at_once() -> int:
    raise ValueError("no")


async def _suspends(gate: asyncio.Future[int], steps: list[str]) -> int:
    steps.append("first step")
    value = await gate
    steps.append("rest")
    return value + 1


class _CountTasks:
    """Counts the tasks the running loop makes while installed (its task factory)."""

    def __init__(self) -> None:
        self.made = 0
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._before = loop.get_task_factory()

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            self.made += 1
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(factory)

    def close(self) -> None:
        self._loop.set_task_factory(self._before)


async def test_a_call_that_does_not_suspend_is_finished_without_a_task() -> None:
    before = len(asyncio.all_tasks())
    started = start(_at_once(21))
    assert started.done and started.task is None
    assert len(asyncio.all_tasks()) == before
    assert started.result() == 42
    failed = start(_fails_at_once())
    assert failed.done and failed.failed()
    with pytest.raises(ValueError, match="no"):
        failed.result()


async def test_a_call_that_suspends_is_carried_on_in_the_awaiting_task() -> None:
    """Its first step ran in ``start``; ``carry`` runs the rest in the task that awaits
    it: no task is made (a shielded task each was)."""
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps: list[str] = []
    started = start(_suspends(gate, steps))
    assert steps == ["first step"]  # before any loop iteration
    assert not started.done and started.task is None
    tasks = _CountTasks()
    try:
        asyncio.get_running_loop().call_soon(gate.set_result, 1)
        assert await asyncio.wait_for(carry(started), DEADLINE) == 2
    finally:
        tasks.close()
    assert steps == ["first step", "rest"]
    assert tasks.made == 1  # wait_for's own (for its deadline), none of carry's
    assert started.task is None


async def test_a_carried_call_runs_in_the_awaiting_tasks_context() -> None:
    async def reads(gate: asyncio.Future[None]) -> tuple[str, Any]:
        first = _VAR.get()
        await gate
        return first, asyncio.current_task()

    _VAR.set("caller")
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    started = start(reads(gate))
    asyncio.get_running_loop().call_soon(gate.set_result, None)
    assert await carry(started) == ("caller", asyncio.current_task())


async def test_an_error_after_the_first_step_is_raised_by_carry_with_no_task() -> None:
    async def fails_later(gate: asyncio.Future[None]) -> None:
        await gate
        raise KeyError("later")

    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    started = start(fails_later(gate))
    asyncio.get_running_loop().call_soon(gate.set_result, None)
    with pytest.raises(KeyError, match="later"):
        await carry(started)
    assert started.task is None  # the call raised: nothing goes on


async def test_a_carried_calls_own_await_cancelled_is_its_own_error() -> None:
    """What the call awaits is cancelled by someone else: the call sees it (as in a
    task), and ``carry`` raises what the call raised, with no task."""
    seen: list[str] = []

    async def awaits(gate: asyncio.Future[None]) -> None:
        try:
            await gate
        except asyncio.CancelledError:
            seen.append("cancelled at its await")
            raise

    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    started = start(awaits(gate))
    asyncio.get_running_loop().call_soon(gate.cancel)
    with pytest.raises(asyncio.CancelledError):
        await carry(started)
    assert seen == ["cancelled at its await"] and started.task is None


async def test_cancelling_the_awaiting_task_hands_the_call_over_to_a_task() -> None:
    """``asyncio.shield``'s promise: the awaiting task is cancelled, the call is not
    (its own await stays pending); it goes on in ``started.task``, whose result is
    the call's."""
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps: list[str] = []
    started = start(_suspends(gate, steps))
    carrying = asyncio.ensure_future(carry(started))
    await asyncio.sleep(0)  # it waits in carry
    carrying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await carrying
    assert not gate.cancelled()
    task = started.task
    assert task is not None and not task.done()
    gate.set_result(41)
    assert await asyncio.wait_for(task, DEADLINE) == 42
    assert steps == ["first step", "rest"]


async def test_a_cancellation_after_the_awaited_future_finished_still_hands_over() -> None:
    """The future the call awaits finished, then the awaiting task is cancelled before
    it ran again: the call still goes on (in its task) with that future's result."""
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    started = start(_suspends(gate, []))
    carrying = asyncio.ensure_future(carry(started))
    await asyncio.sleep(0)
    gate.set_result(1)
    carrying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await carrying
    assert started.task is not None
    assert await asyncio.wait_for(started.task, DEADLINE) == 2


async def test_a_call_suspended_at_a_bare_yield_is_handed_over_too() -> None:
    async def sleeps(steps: list[str]) -> str:
        steps.append("first step")
        await asyncio.sleep(0)
        steps.append("rest")
        return "done"

    steps: list[str] = []
    started = start(sleeps(steps))
    carrying = asyncio.ensure_future(carry(started))
    carrying.cancel()  # before its first step: carry ends before it begins
    with pytest.raises(asyncio.CancelledError):
        await carrying
    started = start(sleeps(steps))
    assert await carry(started) == "done"
    started = start(sleeps(steps))
    carrying = asyncio.ensure_future(carry(started))
    await asyncio.sleep(0)  # it yielded at the bare yield
    carrying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await carrying
    assert started.task is not None
    assert await asyncio.wait_for(started.task, DEADLINE) == "done"


async def test_closing_the_awaiting_coroutine_hands_the_call_over_to_a_task() -> None:
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    started = start(_suspends(gate, []))

    async def awaits(started: Started[int]) -> int:
        return await carry(started)

    outer = awaits(started)
    outer.send(None)  # suspended in carry, at its own future
    outer.close()
    assert started.task is not None
    gate.set_result(9)
    assert await asyncio.wait_for(started.task, DEADLINE) == 10


async def test_many_calls_carried_at_once_all_finish_with_their_own_results() -> None:
    """Under concurrency: 200 calls, half finishing at once and half suspending on
    gates opened in another order, each with its own result; every tenth awaiting
    task is cancelled, and its call finishes in its own task."""
    loop = asyncio.get_running_loop()
    gates = [loop.create_future() for _ in range(100)]
    steps: list[list[str]] = [[] for _ in range(100)]
    started: list[Started[int]] = []
    for i in range(100):
        started.append(start(_at_once(i)))
        started.append(start(_suspends(gates[i], steps[i])))
    carrying = {i: asyncio.ensure_future(carry(s)) for i, s in enumerate(started) if not s.done}
    await asyncio.sleep(0)
    for i in list(carrying)[::10]:
        carrying[i].cancel()
    for i in reversed(range(100)):
        gates[i].set_result(1000 + i)
    await asyncio.wait_for(asyncio.gather(*carrying.values(), return_exceptions=True), DEADLINE)
    results = []
    for i, s in enumerate(started):
        if s.done:
            results.append(s.result())
        elif carrying[i].cancelled():
            assert s.task is not None
            results.append(await asyncio.wait_for(s.task, DEADLINE))
        else:
            assert s.task is None
            results.append(carrying[i].result())
    assert results == [v for i in range(100) for v in (2 * i, 1001 + i)]
    assert all(s == ["first step", "rest"] for s in steps)


# --- the queue's calls to a backend that suspends ------------------------------------


class _HoppingBackend(MemoryBackend):
    """A memory backend whose ``apply`` and ``claim`` each await a future settled by a
    later loop callback (as a storage thread's hop is)."""

    async def _hop(self) -> None:
        loop = asyncio.get_running_loop()
        hop: asyncio.Future[None] = loop.create_future()
        loop.call_soon(hop.set_result, None)
        await hop

    async def apply(self, changes: Any, now: Any, refill: Any = None) -> Any:
        await self._hop()
        return await super().apply(changes, now, refill)

    async def claim(self, assignee_id: str, tags: Any, limit: int, now: Any) -> Any:
        await self._hop()
        return await super().claim(assignee_id, tags, limit, now)


async def test_a_hand_loop_on_a_backend_that_suspends_makes_no_task_per_batch() -> None:
    """Each batch's refilling ``complete_jobs`` and each claim suspend at a hop: the
    awaiting task drives them on (a shielded task each was)."""
    async with PoolQueue(_HoppingBackend(), lease=None) as queue:
        await queue.enqueue_jobs([Job(id=f"j{i:02d}", job_type="t") for i in range(40)])
        async with queue.stream_jobs("w", max_assigned_jobs=4) as stream:
            tasks = _CountTasks()
            try:
                done = 0
                async for batch in stream:  # the first batch: a claim
                    await queue.complete_jobs({job.id: b"ok" for job in batch})
                    done += len(batch)
                    if done == 40:
                        break
            finally:
                tasks.close()
        assert tasks.made == 0
        assert (await queue.get_job_stats()).completed_jobs == 40


@pytest.mark.parametrize("kind", ["sqlite", "leveldb"])
async def test_a_hand_loop_on_a_storage_thread_backend_makes_no_task_per_batch(
    kind: str, tmp_path: Path
) -> None:
    """The embedded backends' calls hop to a thread of their own and back (plain
    futures): the queue drives them on in the awaiting task, so a hand loop's claims
    and refilling completions make no task, and every job still runs once."""
    backend = (
        SQLiteBackend(tmp_path / "s.db") if kind == "sqlite" else LevelDBBackend(tmp_path / "s")
    )
    async with PoolQueue(backend, lease=None) as queue:
        await queue.enqueue_jobs([Job(id=f"j{i:02d}", job_type="t") for i in range(40)])
        seen: list[str] = []
        async with queue.stream_jobs("w", max_assigned_jobs=4) as stream:
            tasks = _CountTasks()
            try:
                async for batch in stream:  # the first batch: a claim
                    seen.extend(job.id for job in batch)
                    await queue.complete_jobs({job.id: b"ok" for job in batch})
                    if len(seen) == 40:
                        break
            finally:
                tasks.close()
        assert tasks.made == 0
        assert sorted(seen) == [f"j{i:02d}" for i in range(40)]
        assert (await queue.get_job_stats()).completed_jobs == 40


async def _turns(n: int) -> None:
    """Let the loop run ``n`` turns (what is ready runs; no wall-clock wait)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_two_closes_wait_for_a_refill_carried_by_another_task() -> None:
    """A refilling completion is in flight in one task (held after its write) while two
    others close the stream; one close is cancelled: the other still returns only
    after the refill's jobs were given back."""
    backend = MemoryBackend()
    async with PoolQueue(backend, lease=None) as queue:
        await queue.enqueue_jobs([Job(id=f"k{i}", job_type="t") for i in range(4)])
        stream = queue.stream_jobs("w", max_assigned_jobs=2)
        first = await anext(stream)
        pause = PauseAfterApply(backend, lambda changes, refill: refill is not None)
        completing = asyncio.ensure_future(queue.complete_jobs({j.id: b"" for j in first}))
        await pause.held()
        assert stream._carrying == 1
        closes = [asyncio.ensure_future(stream.aclose()) for _ in range(2)]
        await _turns(20)  # (as far as they go: the refill is held)
        assert not any(c.done() for c in closes), "the closes wait for the refill"
        closes[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await closes[0]
        await _turns(20)
        assert not closes[1].done()
        pause.go()
        await asyncio.wait_for(completing, DEADLINE)
        await asyncio.wait_for(closes[1], DEADLINE)
        k2, k3 = await queue.get_jobs(["k2", "k3"])
        assert (k2.status, k3.status) == (JobStatus.FAILED_RETRY, JobStatus.FAILED_RETRY)
        assert stream._carrying == 0 and stream._carried is None


async def test_a_call_carried_in_its_own_task_goes_on_when_its_caller_gives_up() -> None:
    """``in_task``: the rest runs in ``started.task`` from the start (as a call under a
    timeout of its own must); the caller awaits it shielded."""

    async def reads(gate: asyncio.Future[int]) -> Any:
        await gate
        return asyncio.current_task()

    loop = asyncio.get_running_loop()
    gate: asyncio.Future[int] = loop.create_future()
    started = start(reads(gate))
    loop.call_soon(gate.set_result, 1)
    assert await carry(started, True) is started.task is not None
    gate = loop.create_future()
    started = start(_suspends(gate, []))
    carrying = asyncio.ensure_future(carry(started, True))
    await asyncio.sleep(0)
    carrying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await carrying
    assert started.task is not None and not gate.cancelled()
    gate.set_result(1)
    assert await asyncio.wait_for(started.task, DEADLINE) == 2


async def test_a_cancellation_asked_in_the_calls_last_step_hands_its_result_over() -> None:
    """The call's own last step cancels the awaiting task (a hook, say): that task
    would lose the result (its step ends, the cancellation taking effect at its next
    suspension or its end); carry takes the cancellation, raising it once, and the
    result is ``started.task``'s."""
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    cancels: list[str] = []

    async def cancels_its_caller() -> str:
        await gate
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        return "result"

    async def caller() -> str:
        started = start(cancels_its_caller())
        try:
            return await carry(started)
        except asyncio.CancelledError:
            cancels.append("cancelled")
            assert started.task is not None and started.task.done()
            cancels.append(started.task.result())
            await asyncio.sleep(0)  # one cancellation only: this one is not cancelled
            raise

    calling = asyncio.ensure_future(caller())
    await asyncio.sleep(0)
    gate.set_result(None)
    with pytest.raises(asyncio.CancelledError):
        await calling
    assert cancels == ["cancelled", "result"]


async def test_a_claim_whose_last_step_cancels_its_stream_gives_the_jobs_back() -> None:
    """The stream's own claim (carried in the task waiting in ``__anext__``) cancels
    that task in its last step, after the store assigned the jobs: the cancellation
    is raised from ``__anext__`` and the jobs are given back, not lost with the
    task's result."""
    async with PoolQueue(_HoppingBackend(), lease=None) as queue:
        await queue.enqueue_jobs([Job(id=f"c{i}", job_type="t") for i in range(3)])
        stream = queue.stream_jobs("w", max_assigned_jobs=2)
        assign = queue._assign
        waiting: asyncio.Future[list[Job]] | None = None

        async def assign_then_cancel(s: Any, limit: int) -> list[Job]:
            jobs = await assign(s, limit)
            assert waiting is not None
            waiting.cancel()
            return jobs

        setattr(queue, "_assign", assign_then_cancel)  # noqa: B010 - on the instance only
        waiting = asyncio.ensure_future(stream.__anext__())
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, DEADLINE)
        delattr(queue, "_assign")
        await stream.aclose()
        jobs = await queue.get_jobs(["c0", "c1", "c2"])
        assert [j.status for j in jobs] == [
            JobStatus.FAILED_RETRY,
            JobStatus.FAILED_RETRY,
            JobStatus.INITIAL_PENDING,
        ]
        assert stream.assigned_job_ids == []
