"""SystemClock: the queue's real timer fires at its time, never before it."""

from __future__ import annotations

import asyncio
import functools
import math
from datetime import datetime, timedelta

import pytest

from jobpool_async import _clock
from jobpool_async._clock import TIMER_LEAD, _loop_wait, _whole_ms_exact
from jobpool_async.backends.base import SystemClock, utcnow

DEADLINE = 10.0


async def _never_early(clock: SystemClock, delays_ms: tuple[float, ...]) -> None:
    """A timer at each delay from now fires, and not before its time."""
    for delay_ms in delays_ms:
        fired: asyncio.Future[datetime] = asyncio.get_running_loop().create_future()
        when = utcnow() + timedelta(milliseconds=delay_ms)

        def note(f: asyncio.Future[datetime] = fired) -> None:
            f.set_result(utcnow())

        clock.call_at(when, note)
        assert await asyncio.wait_for(fired, DEADLINE) >= when


async def test_a_timer_never_fires_before_its_time() -> None:
    """It is set 1 ms early (the loop rounds its waits up to whole milliseconds) and
    sleeps the rest: the callback still never runs early."""
    await _never_early(SystemClock(), (0.2, 1, 3, 7))


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


def _selector_wait(timeout: float) -> float:
    """Seconds the loop really waits for ``timeout``, as CPython 3.11 on Linux rounds
    it: ``selectors`` up to whole milliseconds (``math.ceil(t * 1e3) * 1e-3``), then
    ``epoll.poll`` to nanoseconds and milliseconds, both up."""
    seconds = math.ceil(timeout * 1e3) * 1e-3
    nanoseconds = math.ceil(seconds * 1e9)
    return -(-nanoseconds // 1_000_000) / 1000


def test_the_selector_rounding_this_models_is_real() -> None:
    """The reason for the care below: 9 ms reaches epoll as 10 (the float 9 * 1e-3
    is a hair over 0.009), 10 ms as 10."""
    assert _selector_wait(0.0089) == 0.010
    assert _selector_wait(0.0099) == 0.010
    assert _selector_wait(0.0005) == 0.001
    assert not _whole_ms_exact(9) and _whole_ms_exact(10) and _whole_ms_exact(1)


def test_the_loop_never_waits_past_the_time() -> None:
    """For every time up to 200 ms away (in 10 us steps) and a select that starts up to
    3 ms after the timer was set: each wait in the loop ends at or before the time
    (or at once, where the loop selects only after it), and a second wait (at most
    one) leaves at most ``TIMER_LEAD`` to sleep."""
    assert _loop_wait(0.0009) is None
    for step in range(1, 20_000):
        rest = step * 1e-5
        for late in (0.0, 0.00005, 0.0003, 0.0009, 0.003):
            left, waits = rest, 0
            while (delay := _loop_wait(left)) is not None:
                waits += 1
                remaining = delay - late
                woke = late + (_selector_wait(remaining) if remaining > 0 else 0.0)
                assert woke <= max(left, late) + 1e-9, (rest, late, left, woke)
                left -= woke
            assert waits <= 2, (rest, late, waits)
            assert left <= TIMER_LEAD + 2e-6, (rest, late, left)
            assert left >= -1e-9 or late > 0, (rest, late, left)


class _FakeTime:
    """``monotonic`` and ``sleep`` for the sleep budget alone: sleeping moves it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds + 50e-6  # a short sleep overshoots: the budget charges it
        self.slept += seconds + 50e-6


def test_the_precise_sleeps_take_a_bounded_share_of_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Timers due every 0.3 ms, each asking for a 0.25 ms sleep: the loop is blocked
    for at most ``SLEEP_SHARE`` of the time (plus one burst), not most of it."""
    fake = _FakeTime()
    monkeypatch.setattr(_clock, "time", fake)
    budget = _clock._SleepBudget()
    start, asked = fake.now, 0
    while fake.now - start < 10.0:
        asked += budget.sleep(0.00025)
        fake.now += 0.0003
    elapsed = fake.now - start
    assert fake.slept <= _clock.SLEEP_SHARE * elapsed + _clock.SLEEP_BURST + 1e-9, fake.slept
    assert fake.slept >= 0.8 * _clock.SLEEP_SHARE * elapsed, "the budget is used, not starved"
    assert asked < elapsed / 0.0003 / 4


async def test_past_its_sleep_budget_a_timer_waits_in_the_loop_never_early(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spent = _clock._SleepBudget()
    spent._left = 0.0
    monkeypatch.setattr(_clock, "_BUDGET", spent)
    monkeypatch.setattr(_clock, "SLEEP_SHARE", 0.0)  # never refilled
    await _never_early(SystemClock(), (0.2, 1, 3))
    assert spent._left == 0.0, "no sleep was taken past the budget"


async def test_dense_timers_counts_the_clocks_sleeps_and_restores_its_time() -> None:
    """``benchmarks.dense_timers``: every job drained, the clock's sleeps counted within
    its budget, and the clock's ``time`` put back after."""
    from benchmarks import dense_timers

    before = vars(_clock)["time"]
    took, count, slept = await dense_timers.drain(40, 2.0)
    assert vars(_clock)["time"] is before
    assert took > 0.04  # the last job comes due 78 ms after the first
    assert 0 <= slept <= _clock.SLEEP_SHARE * (took + 0.2) + _clock.SLEEP_BURST + count * 1e-3
