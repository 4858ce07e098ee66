"""The queue's clock: what time it is, and one way to be called back at a time.

:class:`SystemClock` is the real one (``datetime.now(UTC)`` and the event loop's
timers). Tests pass :class:`jobpool_async.testing.FakeClock` instead, which moves
only when told to, so nothing waits for a schedule to come due.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from ._models import utcnow

__all__ = ["Clock", "SystemClock", "TimerHandle"]


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Where a :class:`~jobpool_async.PoolQueue` reads the time and sets its timer."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    def call_at(self, when: datetime, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback()`` once on the running event loop at ``when`` (at once if
        past); the handle's ``cancel()`` withdraws it."""
        ...


#: How early :class:`SystemClock` sets the event loop's timer. The loop's selector
#: waits in whole milliseconds rounded up, so a timer fires up to 1 ms late (0.5 ms
#: on average, before any scheduling delay); set this much early, the timer sleeps
#: the rest precisely (``time.sleep``), blocking the loop for at most this long.
TIMER_LEAD: float = 0.001


def _on_time(when: datetime, callback: Callable[[], None]) -> None:
    rest = (when - utcnow()).total_seconds()
    if rest > 0:
        time.sleep(min(rest, TIMER_LEAD))
    callback()


class SystemClock:
    """The process's wall clock, with timers from the running event loop."""

    def now(self) -> datetime:
        return utcnow()

    def call_at(self, when: datetime, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback`` on the running loop at ``when``: never before it, and
        without the loop's millisecond rounding (see :data:`TIMER_LEAD`)."""
        delay = (when - utcnow()).total_seconds() - TIMER_LEAD
        return asyncio.get_running_loop().call_later(
            max(0.0, delay), functools.partial(_on_time, when, callback)
        )
