"""The demo behind ``python -m jobpool_async``: a few thousand jobs through Workers on SQLite.

It enqueues ``--jobs`` jobs into an embedded SQLite file, runs them through
``--workers`` :class:`~jobpool_async.Worker` instances (each with
``--concurrency`` slots), shows a progress line while they work, and ends with a
stats table. Some jobs fail on their first attempts and are retried; a few are
cancelled before they start and a few while they run, so every common final
status shows up. The exit code is 0 when every job ended where it should.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TextIO

from ._config import Config
from ._errors import JobPoolError
from ._models import Job, JobStats, JobStatus
from ._queue import PoolQueue
from ._worker import Worker

__all__ = ["main"]

_CHUNK = 1000  # jobs per enqueue_jobs call
_SLOW = 3  # jobs that run until cancelled
_UNSCHEDULED = 5  # jobs cancelled before they start


@dataclass(frozen=True, slots=True)
class _Options:
    jobs: int
    db: Path | None
    workers: int
    concurrency: int | None
    quiet: bool


def _parse(argv: Sequence[str] | None) -> _Options:
    parser = argparse.ArgumentParser(
        prog="jobpool demo",
        description="Run a few thousand jobs through jobpool_async Workers on a SQLite file "
        "and print the resulting job stats.",
    )
    parser.add_argument("--jobs", type=int, default=5000, help="jobs to run (default 5000)")
    parser.add_argument(
        "--db",
        type=Path,
        default=None,
        help="SQLite file to use (kept afterwards); default: a temporary file, removed at the end",
    )
    parser.add_argument("--workers", type=int, default=2, help="Workers to run (default 2)")
    parser.add_argument(
        "--concurrency",
        "--batch-size",  # its old name
        dest="concurrency",
        type=int,
        default=None,
        help="jobs each Worker runs at once (default: JOBPOOL_CONCURRENCY or 10)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    ns = parser.parse_args(argv)
    if ns.jobs < _SLOW + _UNSCHEDULED + 1:
        parser.error(f"--jobs must be at least {_SLOW + _UNSCHEDULED + 1}")
    if ns.workers < 1:
        parser.error("--workers must be at least 1")
    if ns.concurrency is not None and ns.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return _Options(ns.jobs, ns.db, ns.workers, ns.concurrency, ns.quiet)


class _Processor:
    """Hashes each job's payload. Every 11th job fails once, every 37th twice; the
    "slow" jobs run until they are cancelled."""

    def __init__(self) -> None:
        self.slow_started: asyncio.Queue[str] = asyncio.Queue()

    async def __call__(self, job: Job) -> bytes:
        payload = json.loads(job.job_definition)
        n = int(payload["n"])
        if job.job_type == "slow":
            await self.slow_started.put(job.id)
            await asyncio.sleep(3600)  # cancelled by the demo
        if n % 37 == 0 and job.retry_count < 2:
            raise ConnectionError(f"simulated flaky upstream (attempt {job.retry_count + 1})")
        if n % 11 == 0 and job.retry_count < 1:
            raise TimeoutError("simulated timeout on the first attempt")
        await asyncio.sleep(0)  # a real processor would await I/O here
        return hashlib.sha256(job.job_definition).hexdigest().encode()


def _jobs(run: str, count: int) -> list[Job]:
    tags = ["demo", f"run:{run}"]
    out = []
    for n in range(count):
        if n < _SLOW:
            kind = "slow"
        elif n < _SLOW + _UNSCHEDULED:
            kind = "later"
        else:
            kind = "hash"
        out.append(
            Job(
                id=f"{run}-{n:06d}",
                job_type=kind,
                job_definition=json.dumps({"n": n}).encode(),
                tags=[*tags, kind],
            )
        )
    return out


class _Progress:
    """One status line: rewritten in place on a terminal, a line a second otherwise."""

    def __init__(self, out: TextIO, total: int, quiet: bool) -> None:
        self._out = out
        self._total = total
        self._quiet = quiet
        self._tty = out.isatty()
        self._last = 0.0

    def show(self, stats: JobStats, elapsed: float, *, final: bool = False) -> None:
        if self._quiet:
            return
        now = time.monotonic()
        if not final and not self._tty and now - self._last < 1.0:
            return
        self._last = now
        done = stats.completed_jobs + stats.stopped_jobs
        rate = stats.completed_jobs / elapsed if elapsed > 0 else 0.0
        line = (
            f"processed {done:>{len(str(self._total))}}/{self._total} "
            f"({100.0 * done / self._total:5.1f}%)  running {stats.running_jobs:>3}  "
            f"retries {stats.total_retries:>4}  {rate:7.0f} jobs/s"
        )
        if self._tty:
            self._out.write("\r" + line + ("\n" if final else ""))
        else:
            self._out.write(line + "\n")
        self._out.flush()


def _table(stats: JobStats, elapsed: float, workers: int, concurrency: int, db: str) -> str:
    rows = [(status.name, stats.by_status[status]) for status in JobStatus]
    width = max(len(name) for name, _ in rows)
    lines = [
        "",
        f"jobpool_async demo: {stats.total_jobs} jobs, {workers} worker(s) x {concurrency} slots, "
        f"SQLite file {db}",
        "",
        f"{'status':<{width}}  {'jobs':>7}",
        f"{'-' * width}  {'-' * 7}",
    ]
    lines += [f"{name:<{width}}  {count:>7}" for name, count in rows]
    lines += [
        f"{'-' * width}  {'-' * 7}",
        f"{'total':<{width}}  {stats.total_jobs:>7}",
        "",
        f"retries       {stats.total_retries}",
        f"elapsed       {elapsed:.2f} s",
        f"throughput    {stats.completed_jobs / elapsed if elapsed > 0 else 0.0:.0f} "
        "completed jobs/s",
    ]
    return "\n".join(lines)


async def _run(opts: _Options, db: Path) -> int:
    from .backends.sqlite import SQLiteBackend

    config = Config.from_env()
    if "JOBPOOL_RETRY_BASE" not in os.environ:  # a demo: retries after 20 ms, 40 ms, ...
        config = dataclasses.replace(
            config, retry=dataclasses.replace(config.retry, base=timedelta(milliseconds=20))
        )
    if opts.concurrency is not None:
        config = dataclasses.replace(config, concurrency=opts.concurrency)
    run = uuid.uuid4().hex[:8]
    tag = f"run:{run}"
    jobs = _jobs(run, opts.jobs)
    progress = _Progress(sys.stderr, opts.jobs, opts.quiet)
    processor = _Processor()
    async with PoolQueue(SQLiteBackend(db)) as queue:
        # Enqueue before the workers start, so the "later" jobs can be cancelled unstarted.
        for i in range(0, len(jobs), _CHUNK):
            await queue.enqueue_jobs(jobs[i : i + _CHUNK])
        later = [j.id for j in jobs if j.job_type == "later"]
        unscheduled = await queue.cancel_jobs(job_ids=later)
        started = time.monotonic()
        workers = [
            Worker(queue, processor, assignee_id=f"demo-{run}-{w}", config=config, tags=[tag])
            for w in range(opts.workers)
        ]
        for worker in workers:
            await worker.__aenter__()
        try:
            for _ in range(_SLOW):  # cancel the slow jobs once they run
                job_id = await asyncio.wait_for(processor.slow_started.get(), 30)
                await queue.cancel_jobs(job_ids=[job_id])
            while True:
                stats = await queue.get_job_stats([tag])
                progress.show(stats, time.monotonic() - started)
                if stats.completed_jobs + stats.stopped_jobs == opts.jobs:
                    break
                await asyncio.sleep(0.1)
        finally:
            await asyncio.gather(*(w.stop(grace=5) for w in workers))
        elapsed = time.monotonic() - started
        stats = await queue.get_job_stats([tag])
        progress.show(stats, elapsed, final=True)
    print(_table(stats, elapsed, opts.workers, config.concurrency, str(db)))
    expected_stopped = _SLOW + len(unscheduled.cancelled)
    ok = (
        stats.completed_jobs == opts.jobs - expected_stopped
        and stats.by_status[JobStatus.STOPPED] == _SLOW
        and stats.by_status[JobStatus.UNSCHEDULED] == _UNSCHEDULED
    )
    if not ok:
        print("unexpected final counts: see the table above", file=sys.stderr)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    opts = _parse(argv)
    # Its failures are simulated and counted in the table: the Worker's WARNING (with
    # traceback) for each would only bury the progress line.
    logging.getLogger("jobpool_async.worker").setLevel(logging.ERROR)
    try:
        if opts.db is not None:
            return asyncio.run(_run(opts, opts.db))
        with tempfile.TemporaryDirectory(prefix="jobpool-demo-") as tmp:
            return asyncio.run(_run(opts, Path(tmp) / "jobpool-demo.db"))
    except (JobPoolError, OSError) as exc:  # one clear line, no traceback
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
