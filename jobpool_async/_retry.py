"""Retry policy and the exceptions a processor raises to steer its job (SPEC §8.3)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

from ._models import check_delay, check_max_attempts

__all__ = ["Discard", "Retry", "RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long a failed job waits before its next run, and how many runs it gets.

    Attempt *n* (the job's ``attempts`` when it failed) waits
    ``min(max_delay, base * factor^(n-1))``, times a uniform factor in
    ``[1 - jitter, 1 + jitter]``. ``max_attempts`` applies to jobs without their own
    (``None``: unlimited).
    """

    base: timedelta = timedelta(seconds=1)
    factor: float = 2.0
    max_delay: timedelta = timedelta(hours=1)
    jitter: float = 0.1
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        check_delay(self.base, "RetryPolicy.base")
        check_delay(self.max_delay, "RetryPolicy.max_delay")
        for name in ("factor", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"RetryPolicy.{name} must be a number, got {value!r}")
        if not self.factor >= 1:
            raise ValueError(f"RetryPolicy.factor must be at least 1, got {self.factor!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RetryPolicy.jitter must be in [0, 1], got {self.jitter!r}")
        check_max_attempts(self.max_attempts, "RetryPolicy.max_attempts")

    def delay(self, attempt: int, rng: random.Random | None = None) -> timedelta:
        """The wait after attempt ``attempt`` (1 for the first run) failed."""
        n = max(1, attempt)
        cap = self.max_delay.total_seconds()
        base = self.base.total_seconds()
        try:
            seconds = min(cap, base * self.factor ** (n - 1))
        except OverflowError:
            seconds = cap
        if self.jitter:
            seconds *= (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        return timedelta(seconds=max(0.0, seconds))


class Retry(Exception):
    """Raised by a processor: fail this run and run the job again after ``in_``."""

    def __init__(self, in_: timedelta, message: str = "") -> None:
        check_delay(in_, "Retry(in_=...)")
        super().__init__(message or f"retry requested in {in_}")
        self.in_ = in_
        self.message = message or f"retry requested in {in_}"


class Discard(Exception):
    """Raised by a processor: give up on this job now (it becomes DISCARDED)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message or "discarded by its processor"
