"""SystemClock: the queue's real timer fires at its time, never before it."""

from __future__ import annotations

import asyncio
import functools
from datetime import datetime, timedelta

from jobpool_async.backends.base import SystemClock, utcnow

DEADLINE = 10.0


async def test_a_timer_never_fires_before_its_time() -> None:
    """It is set 1 ms early (the loop rounds its waits up to whole milliseconds) and
    sleeps the rest: the callback still never runs early."""
    clock = SystemClock()
    for delay_ms in (0.2, 1, 3, 7):
        fired: asyncio.Future[datetime] = asyncio.get_running_loop().create_future()
        when = utcnow() + timedelta(milliseconds=delay_ms)

        def note(f: asyncio.Future[datetime] = fired) -> None:
            f.set_result(utcnow())

        clock.call_at(when, note)
        assert await asyncio.wait_for(fired, DEADLINE) >= when


async def test_a_past_time_fires_at_once_and_a_cancelled_timer_never() -> None:
    clock = SystemClock()
    calls: list[str] = []
    done = asyncio.Event()

    def past() -> None:
        calls.append("past")
        done.set()

    clock.call_at(utcnow() - timedelta(seconds=5), past)
    handle = clock.call_at(
        utcnow() + timedelta(milliseconds=2), functools.partial(calls.append, "cancelled")
    )
    handle.cancel()
    await asyncio.wait_for(done.wait(), DEADLINE)
    later = asyncio.Event()
    clock.call_at(utcnow() + timedelta(milliseconds=5), later.set)
    await asyncio.wait_for(later.wait(), DEADLINE)
    assert calls == ["past"]
