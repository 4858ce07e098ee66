"""The queue's clock: what time it is, and one way to be called back at a time.

:class:`SystemClock` is the real one (``datetime.now(UTC)`` and the event loop's
timers). Tests pass :class:`jobpool_async.testing.FakeClock` instead, which moves
only when told to, so nothing waits for a schedule to come due.
"""

from __future__ import annotations

import asyncio
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


class SystemClock:
    """The process's wall clock, with timers from the running event loop."""

    def now(self) -> datetime:
        return utcnow()

    def call_at(self, when: datetime, callback: Callable[[], None]) -> TimerHandle:
        delay = (when - utcnow()).total_seconds()
        return asyncio.get_running_loop().call_later(max(0.0, delay), callback)
