"""A clock that moves only when told to.

``PoolQueue(backend, clock=FakeClock())`` makes every timestamp the queue writes
come from the fake clock, and the queue's timer (for scheduled jobs) fire when
:meth:`FakeClock.advance` passes its time, so tests never sleep for a schedule.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from .._models import check_aware

__all__ = ["FakeClock"]


class _Timer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A controllable clock for :class:`~jobpool_async.PoolQueue` (``clock=``)."""

    def __init__(self, start: datetime | None = None) -> None:
        start = check_aware(start, "start") if start is not None else None
        self._now = start or datetime(2030, 1, 1, tzinfo=UTC)
        self._timers: list[tuple[datetime, int, _Timer]] = []
        self._order = itertools.count()

    def now(self) -> datetime:
        return self._now

    def call_at(self, when: datetime, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(callback)
        if when <= self._now:
            when = self._now
        heapq.heappush(self._timers, (when, next(self._order), timer))
        if when <= self._now:
            self._fire()
        return timer

    def advance(self, delta: timedelta | float) -> datetime:
        """Move the clock forward (a ``timedelta`` or seconds) and run the timers due."""
        step = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        if step < timedelta(0):
            raise ValueError(f"a clock only moves forward, got {step!r}")
        self._now += step
        self._fire()
        return self._now

    def set(self, when: datetime) -> datetime:
        """Move the clock to ``when`` (not before now) and run the timers due."""
        at = check_aware(when, "when")
        assert at is not None
        return self.advance(at - self._now)

    @property
    def pending(self) -> int:
        """Timers set and not yet fired or cancelled."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def _fire(self) -> None:
        while self._timers and self._timers[0][0] <= self._now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.cancelled = True
                timer.callback()
