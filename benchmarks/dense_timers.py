"""``python -m benchmarks.dense_timers [JOBS] [STEP_MS]``: how long the event loop is
blocked by the queue's clock when jobs come due densely.

``SystemClock`` ends a timer's wait with a precise ``time.sleep`` (at most 1 ms, the
loop's own timers round up to whole milliseconds), within a budget of
``SLEEP_SHARE`` of the wall time. Here ``JOBS`` jobs are due one every ``STEP_MS``
on a memory store and one stream of 10 slots drains them; the clock's sleeps are
counted and timed, and their total is shown as a share of the drain's time (what
every other task on the loop waited for them).
"""

from __future__ import annotations

import asyncio
import sys
import time
import types
from datetime import timedelta

from jobpool_async import Job, MemoryBackend, PoolQueue, _clock
from jobpool_async.backends.base import utcnow


async def drain(jobs: int, step_ms: float) -> tuple[float, int, float]:
    """Seconds the drain took, and the clock's sleeps: how many, seconds in total."""
    sleeps: list[float] = []

    def timed_sleep(seconds: float) -> None:
        start = time.perf_counter()
        time.sleep(seconds)
        sleeps.append(time.perf_counter() - start)

    view = types.SimpleNamespace(sleep=timed_sleep, monotonic=time.monotonic)
    names = vars(_clock)  # the clock module's view of ``time`` only
    saved = names["time"]
    names["time"] = view
    try:
        async with PoolQueue(MemoryBackend()) as queue:
            first = utcnow() + timedelta(milliseconds=200)
            await queue.enqueue_jobs(
                [
                    Job(
                        id=f"j{i}",
                        job_type="t",
                        scheduled_at=first + timedelta(milliseconds=i * step_ms),
                    )
                    for i in range(jobs)
                ]
            )
            done = 0
            start = time.perf_counter()
            async with queue.stream_jobs("w", max_assigned_jobs=10) as stream:
                async for batch in stream:
                    await queue.complete_jobs({job.id: b"" for job in batch})
                    done += len(batch)
                    if done >= jobs:
                        break
            return time.perf_counter() - start, len(sleeps), sum(sleeps)
    finally:
        names["time"] = saved


def main(argv: list[str]) -> None:
    jobs = int(argv[0]) if argv else 3000
    step_ms = float(argv[1]) if len(argv) > 1 else 0.3
    took, count, slept = asyncio.run(drain(jobs, step_ms))
    print(
        f"{jobs} jobs due every {step_ms} ms: drained in {took:.3f} s; the clock slept "
        f"{count} times, {slept * 1000:.1f} ms in all = {slept / took:.1%} of the drain "
        f"(budget: {getattr(_clock, 'SLEEP_SHARE', 'none')})"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
