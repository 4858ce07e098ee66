"""The queue's eager start of a call (``jobpool_async._eager``): a call that finishes
without suspending needs no task; one that suspends goes on in a task exactly as it
would have in one from the start (its result, its error, a cancellation)."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from jobpool_async._eager import start

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


async def test_a_call_that_suspends_ran_its_first_step_and_goes_on_in_a_task() -> None:
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps: list[str] = []
    started = start(_suspends(gate, steps))
    assert steps == ["first step"]  # before any loop iteration
    assert not started.done and started.task is not None
    gate.set_result(1)
    assert await asyncio.wait_for(started.task, DEADLINE) == 2
    assert steps == ["first step", "rest"]


async def test_an_error_after_the_first_step_is_the_tasks() -> None:
    async def fails_later(gate: asyncio.Future[None]) -> None:
        await gate
        raise KeyError("later")

    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    started = start(fails_later(gate))
    assert started.task is not None
    gate.set_result(None)
    with pytest.raises(KeyError, match="later"):
        await asyncio.wait_for(started.task, DEADLINE)


async def test_cancelling_the_task_reaches_the_call_where_it_waits() -> None:
    seen: list[str] = []

    async def cleans_up(gate: asyncio.Future[None]) -> None:
        try:
            await gate
        except asyncio.CancelledError:
            seen.append("cancelled at its await")
            raise

    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    started = start(cleans_up(gate))
    task = started.task
    assert task is not None
    await asyncio.sleep(0)  # the task has taken over the suspension
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE)
    assert seen == ["cancelled at its await"]
    assert gate.cancelled()  # the call's own await was cancelled, as in a task


async def test_many_calls_started_at_once_all_finish_with_their_own_results() -> None:
    """Under concurrency: 200 calls, half finishing at once and half suspending on
    gates opened in another order, each with its own result."""
    loop = asyncio.get_running_loop()
    gates = [loop.create_future() for _ in range(100)]
    steps: list[list[str]] = [[] for _ in range(100)]
    started = []
    for i in range(100):
        started.append(start(_at_once(i)))
        started.append(start(_suspends(gates[i], steps[i])))
    for i in reversed(range(100)):
        gates[i].set_result(1000 + i)
    results = []
    for s in started:
        if s.done:
            results.append(s.result())
        else:
            assert s.task is not None
            results.append(await asyncio.wait_for(s.task, DEADLINE))
    assert results == [v for i in range(100) for v in (2 * i, 1001 + i)]


async def test_the_rest_runs_in_a_copy_of_the_starting_context() -> None:
    async def reads(gate: asyncio.Future[None]) -> tuple[str, str]:
        first = _VAR.get()
        await gate
        return first, _VAR.get()

    _VAR.set("caller")
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    started = start(reads(gate))
    assert started.task is not None
    gate.set_result(None)
    assert await asyncio.wait_for(started.task, DEADLINE) == ("caller", "caller")
