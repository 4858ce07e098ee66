"""Child process of the memory workload: stream many jobs through one queue, sample RSS.

Run by :func:`benchmarks.workloads.memory_profile` in a fresh interpreter, so the
figures are this workload's alone. Prints one JSON line: seconds, metrics and the
RSS samples (after each batch). Jobs go through in rounds: enqueue a batch, drain
it through one stream with batched completion. Completed jobs stay in the store
(on disk for SQLite/LevelDB/PostgreSQL); for the in-memory backend, whose store
*is* the process memory, each round ends with ``cleanup_expired_jobs`` so that
what is measured is the queue's own footprint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import threading
import uuid
from datetime import timedelta
from typing import Any

from jobpool_async import Job, PoolQueue, open_backend

from ._common import now


def _rss_mb() -> float:
    """Current resident set size in MiB (from /proc, else the kernel's peak figure).

    ``ru_maxrss`` is only a fallback: on Linux it carries over the parent's peak
    across ``exec``, so it would report the harness's memory, not this process's.
    """
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 if sys.platform != "darwin" else peak / 2**20


class _PeakSampler:
    """Reads RSS every 10 ms in a thread, so the peak includes moments between rounds."""

    def __init__(self) -> None:
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def _run(name: str, location: str, n: int, batch: int, slots: int) -> dict[str, Any]:
    samples: list[dict[str, float]] = []
    prefix = uuid.uuid4().hex[:6]
    done = 0
    dups = 0
    seen_round: set[str] = set()
    with _PeakSampler() as sampler:
        async with PoolQueue(open_backend(location)) as queue:
            samples.append({"processed": 0.0, "rss_mb": _rss_mb()})
            t0 = now()
            async with queue.stream_jobs("bench", max_assigned_jobs=slots) as stream:
                round_no = 0
                while done < n:
                    size = min(batch, n - done)
                    jobs = [
                        Job(id=f"{prefix}-{round_no}-{i}", job_type="bench") for i in range(size)
                    ]
                    await queue.enqueue_jobs(jobs)
                    seen_round.clear()
                    async for got in stream:
                        for j in got:
                            if j.id in seen_round:
                                dups += 1
                            seen_round.add(j.id)
                        await queue.complete_jobs({j.id: b"" for j in got})
                        if len(seen_round) >= size:
                            break
                    if name == "memory":
                        await queue.cleanup_expired_jobs(timedelta(microseconds=1))
                    done += size
                    round_no += 1
                    samples.append({"processed": float(done), "rss_mb": _rss_mb()})
            seconds = now() - t0
            stats = await queue.get_job_stats()
    expected = 0 if name == "memory" else n
    problems = []
    if dups:
        problems.append(f"{dups} duplicate deliveries")
    if stats.completed_jobs != expected or stats.total_jobs != expected:
        problems.append(
            f"store has {stats.completed_jobs} completed of {stats.total_jobs}, expected {expected}"
        )
    # Warm-up: the first tenth of the jobs (at least one round) fills caches and pools.
    warm = next((s for s in samples if s["processed"] >= max(n / 10, batch)), samples[-1])
    last = samples[-1]
    metrics = {
        "rss_start_mb": samples[0]["rss_mb"],
        "rss_warm_mb": warm["rss_mb"],
        "rss_end_mb": last["rss_mb"],
        "peak_mb": max(sampler.peak, *(s["rss_mb"] for s in samples)),
        "growth_after_warmup_mb": last["rss_mb"] - warm["rss_mb"],
        "end_over_warm": last["rss_mb"] / warm["rss_mb"] if warm["rss_mb"] else 0.0,
    }
    return {
        "seconds": seconds,
        "metrics": metrics,
        "samples": samples,
        "problem": "; ".join(problems),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--location", required=True)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--slots", type=int, default=100)
    args = parser.parse_args()
    result = asyncio.run(_run(args.backend, args.location, args.jobs, args.batch, args.slots))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
