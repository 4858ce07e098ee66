"""Periodic jobs (SPEC §8.5): one job per tick, however many processes run them.

Each tick's job has the id ``f"{name}@{tick ISO-8601 UTC}"`` and ``scheduled_at =
tick``, and is enqueued with ``if_exists="ignore"``: every process running the same
:class:`Periodic` computes the same ticks and ids, so exactly one job per tick is
stored. Ticks of ``every`` are multiples of it since the Unix epoch (so processes
agree without talking); ``cron`` ticks are in UTC, parsed by ``cronsim``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from datetime import UTC, datetime, timedelta

from cronsim import CronSim, CronSimError

from ._errors import QueueClosedError
from ._models import Job, check_id
from ._queue import PoolQueue

__all__ = ["Periodic", "run_periodic"]

logger = logging.getLogger("jobpool_async.periodic")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
#: Delays between attempts when enqueueing a tick fails (storage errors).
_RETRY_DELAYS = (0.1, 0.5, 1.0, 5.0)

JobFactory = Callable[[datetime], Job]


@dataclass(frozen=True, slots=True)
class Periodic:
    """A job made at every tick of ``every`` (a ``timedelta``) or of ``cron`` (five
    fields, UTC). ``job(tick)`` builds it; its ``id`` and ``scheduled_at`` are set
    to ``f"{name}@{tick}"`` and the tick."""

    name: str
    _: KW_ONLY
    job: JobFactory
    every: timedelta | None = None
    cron: str | None = None

    def __post_init__(self) -> None:
        check_id(self.name, "Periodic name")
        if (self.every is None) == (self.cron is None):
            raise ValueError(f"Periodic {self.name!r}: give exactly one of every= and cron=")
        if self.every is not None:
            if not isinstance(self.every, timedelta):
                raise TypeError(f"Periodic {self.name!r}: every must be a timedelta")
            if self.every < timedelta(seconds=1) or self.every % timedelta(seconds=1):
                raise ValueError(
                    f"Periodic {self.name!r}: every must be a whole number of seconds, "
                    f"at least 1, got {self.every!r}"
                )
        else:
            if not isinstance(self.cron, str):
                raise TypeError(f"Periodic {self.name!r}: cron must be a str")
            try:
                CronSim(self.cron, _EPOCH)
            except CronSimError as exc:
                raise ValueError(
                    f"Periodic {self.name!r}: bad cron expression {self.cron!r}: {exc}"
                ) from None
        if not callable(self.job):
            raise TypeError(f"Periodic {self.name!r}: job must be callable (tick -> Job)")

    def last_tick(self, now: datetime) -> datetime:
        """The latest tick at or before ``now``."""
        if self.every is not None:
            steps = (now - _EPOCH) // self.every
            return _EPOCH + steps * self.every
        assert self.cron is not None
        return next(CronSim(self.cron, now.astimezone(UTC) + _US, reverse=True))

    def next_tick(self, after: datetime) -> datetime:
        """The first tick after ``after``."""
        if self.every is not None:
            return self.last_tick(after) + self.every
        assert self.cron is not None
        return next(CronSim(self.cron, after.astimezone(UTC)))

    def job_for(self, tick: datetime) -> Job:
        """The job of ``tick``: built by ``job``, with the tick's id and schedule."""
        made = self.job(tick)
        if not isinstance(made, Job):
            raise TypeError(f"Periodic {self.name!r}: job() returned {type(made).__name__}")
        stamp = tick.astimezone(UTC).isoformat()
        return dataclasses.replace(made, id=f"{self.name}@{stamp}", scheduled_at=tick)


async def run_periodic(queue: PoolQueue, periodics: Sequence[Periodic]) -> None:
    """Enqueue the jobs of ``periodics`` until cancelled (or the queue closes).

    At start, each gets the job of its latest tick (missed ticks are not made up,
    except that one) and of its next; then, at each tick, the one after. Sleeps on
    the queue's clock (one timer at a time)."""
    items = list(periodics)
    for p in items:
        if not isinstance(p, Periodic):
            raise TypeError(f"periodics must be Periodic objects, got {type(p).__name__}")
    if not items:
        return
    clock = queue.clock
    now = clock.now()
    upcoming = {p.name: p.next_tick(now) for p in items}
    try:
        await _enqueue(queue, [p.job_for(p.last_tick(now)) for p in items])
        while True:
            await _enqueue(queue, [p.job_for(upcoming[p.name]) for p in items])
            due = min(upcoming.values())
            await _sleep_until(queue, due)
            now = clock.now()
            for p in items:
                if upcoming[p.name] <= now:
                    upcoming[p.name] = p.next_tick(max(now, upcoming[p.name]))
    except QueueClosedError:
        return


async def _enqueue(queue: PoolQueue, jobs: list[Job]) -> None:
    failures = 0
    while True:
        try:
            await queue.enqueue_jobs(jobs, if_exists="ignore")
            return
        except QueueClosedError:
            raise
        except Exception:  # storage trouble: try again, never give up the schedule
            delay = _RETRY_DELAYS[min(failures, len(_RETRY_DELAYS) - 1)]
            failures += 1
            logger.exception("enqueueing periodic jobs failed; retrying in %.1f s", delay)
            await asyncio.sleep(delay)


async def _sleep_until(queue: PoolQueue, when: datetime) -> None:
    """Wait on the queue's clock until ``when``."""
    woke = asyncio.Event()
    timer = queue.clock.call_at(when, woke.set)
    try:
        await woke.wait()
    finally:
        timer.cancel()
