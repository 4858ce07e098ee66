"""The queue's clock: what time it is, and one way to be called back at a time.

:class:`SystemClock` is the real one (``datetime.now(UTC)`` and the event loop's
timers). Tests pass :class:`jobpool_async.testing.FakeClock` instead, which moves
only when told to, so nothing waits for a schedule to come due.
"""

from __future__ import annotations

import asyncio
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


#: How much of a wait :class:`SystemClock` leaves to a precise sleep (``time.sleep``,
#: blocking the loop for at most this long). The loop's selector waits in whole
#: milliseconds, rounded up, so a timer left to the loop alone fires up to 1 ms late.
TIMER_LEAD: float = 0.001
#: A microsecond's give in the comparisons with ``TIMER_LEAD`` (float sums of waits).
_SLACK: float = 1e-6
#: Those sleeps may take at most this share of the wall time, and at most
#: ``SLEEP_BURST`` seconds at once after a quiet spell: with timers due every few
#: hundred microseconds (dense schedules) they would otherwise block the loop, and
#: every task on it, much of the time (43% at one job due every 0.3 ms). Past the
#: budget a timer leaves the last wait to the loop: up to 1 ms late, never early.
SLEEP_SHARE: float = 0.05
SLEEP_BURST: float = 0.002


class _SleepBudget:
    """A token bucket of blocking-sleep time, refilled at ``SLEEP_SHARE`` of the wall
    time up to ``SLEEP_BURST`` (one per process: the loops of a process share it)."""

    __slots__ = ("_at", "_left")

    def __init__(self) -> None:
        self._left = SLEEP_BURST
        self._at = time.monotonic()

    def sleep(self, seconds: float) -> bool:
        """Sleep ``seconds`` if they fit the budget now, charging the time the sleep
        really took (a short ``time.sleep`` overshoots by tens of microseconds);
        whether it slept."""
        now = time.monotonic()
        left = min(SLEEP_BURST, self._left + (now - self._at) * SLEEP_SHARE)
        if seconds > left:
            self._left, self._at = left, now
            return False
        time.sleep(seconds)
        self._at = time.monotonic()
        self._left = left - (self._at - now)
        return True


_BUDGET = _SleepBudget()


def _whole_ms_exact(ms: int) -> bool:
    """Whether a wait of ``ms`` milliseconds reaches the selector as ``ms``: asyncio
    passes it on as ``ms * 1e-3`` seconds, and CPython's ``epoll``/``poll`` turn that
    into nanoseconds and then milliseconds rounding up, so where the float product is
    a hair over (9, 13, 18, 26, 36, 52, ... ms) the wait is one millisecond longer.
    (The comparison repeats C's double arithmetic.)"""
    return ms * 1e-3 * 1e9 <= ms * 1e6


def _loop_wait(rest: float) -> float | None:
    """The delay to give the loop for a time ``rest`` seconds away, so that it wakes
    at or before that time however it rounds (``None``: within ``TIMER_LEAD``, wait
    no more in the loop).

    Over two leads away, two leads early: the selector's rounding up to whole
    milliseconds (under 1 ms) and its float slip (1 ms more where the count is one
    that :func:`_whole_ms_exact` rejects) both land before the time. Then, within
    two leads, one lead early: what is left then is a millisecond or less, a wait the
    selector makes exactly 1 ms (a count it keeps). So a timer wakes the loop once
    or twice and sleeps at most ``TIMER_LEAD``, whenever the loop gets to select."""
    if rest <= TIMER_LEAD + _SLACK:
        return None
    if rest <= 2 * TIMER_LEAD + _SLACK:
        return rest - TIMER_LEAD
    return rest - 2 * TIMER_LEAD


class _Timer:
    """One :meth:`SystemClock.call_at`: waits in the loop until ``when`` is within
    ``TIMER_LEAD`` (:func:`_loop_wait`), then sleeps the rest precisely, as the
    sleep budget (``SLEEP_SHARE``) allows."""

    __slots__ = ("_callback", "_handle", "_loop", "_when")

    def __init__(self, when: datetime, callback: Callable[[], None]) -> None:
        self._when = when
        self._callback = callback
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.Handle = self._stage()

    def _stage(self) -> asyncio.Handle:
        delay = _loop_wait((self._when - utcnow()).total_seconds())
        if delay is None:
            return self._loop.call_soon(self._fire)
        return self._loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        rest = (self._when - utcnow()).total_seconds()
        if rest > TIMER_LEAD + _SLACK:  # the first of two waits in the loop
            self._handle = self._stage()
            return
        if rest > 0 and not _BUDGET.sleep(rest):  # the loop was held enough: it waits
            self._handle = self._loop.call_later(rest, self._fire)
            return
        self._callback()

    def cancel(self) -> None:
        self._handle.cancel()


class SystemClock:
    """The process's wall clock, with timers from the running event loop."""

    def now(self) -> datetime:
        return utcnow()

    def call_at(self, when: datetime, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback`` on the running loop at ``when``: never before it, and
        without the loop's millisecond rounding (see :class:`_Timer`)."""
        return _Timer(when, callback)
