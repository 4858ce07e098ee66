"""The one-thread bridge LevelDB runs plyvel on (``backends/_thread.py``)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from jobpool_async.backends._thread import WorkerThread


async def test_calls_run_in_one_other_thread_in_submission_order() -> None:
    worker = WorkerThread("test-bridge")
    try:
        seen: list[tuple[int, str]] = []

        def record(i: int) -> int:
            seen.append((i, threading.current_thread().name))
            return i * 2

        results = await asyncio.gather(*(worker.submit(record, i) for i in range(200)))
        assert results == [i * 2 for i in range(200)]
        assert [i for i, _ in seen] == list(range(200))
        assert {name for _, name in seen} == {"test-bridge"}
        assert threading.current_thread().name != "test-bridge"
    finally:
        worker.stop()


async def test_an_exception_reaches_the_awaiting_task() -> None:
    worker = WorkerThread("test-bridge")
    try:

        def fail() -> None:
            raise KeyError("boom")

        with pytest.raises(KeyError, match="boom"):
            await worker.submit(fail)
        assert await worker.submit(lambda: "still working") == "still working"
    finally:
        worker.stop()


async def test_a_call_whose_caller_was_cancelled_still_runs_to_its_end() -> None:
    worker = WorkerThread("test-bridge")
    try:
        gate = threading.Event()
        done = threading.Event()

        def slow() -> None:
            gate.wait(10)
            done.set()

        waiter = worker.submit(slow)  # queued to the thread at once
        waiter.cancel()
        gate.set()
        assert await worker.submit(done.is_set) is True  # ran before the next call
    finally:
        worker.stop()


async def test_stop_ends_the_thread_after_queued_calls() -> None:
    worker = WorkerThread("test-bridge-stop")
    last = worker.submit(lambda: 42)
    worker.stop()
    assert await last == 42
    thread = worker._thread
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()
