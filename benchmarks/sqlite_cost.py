"""One phase of the SQLite storage thread's work on the schedules workload, to count
under callgrind (instructions per job do not depend on the machine's load).

``valgrind --tool=callgrind --collect-atstart=no --toggle-collect=functools_reduce
python -m benchmarks.sqlite_cost plain|mixed|drain enqueue|cycle [--jobs 5000]``

Runs the backend's thread functions on a plain ``sqlite3`` connection, as
:mod:`benchmarks.sqlite_frames` does: ``--jobs`` jobs (plain, or mixed: random
priorities, 20% scheduled slightly in the past) enqueued in batches of 1,000, then
one 10-slot stream's claim cycle (each commit completes 10 jobs and claims the next
10). Only the phase named runs inside ``functools.reduce``, so callgrind's
``--toggle-collect=functools_reduce`` counts that phase alone (divide by ``--jobs``).
Used for ``benchmarks/results/sqlite-session5.md``.

``drain`` jobs are those of :mod:`benchmarks.drain` (100-byte JSON payloads; each
completed with a small JSON result). ``python -m benchmarks.sqlite_cost drain stream|worker
--runs K`` runs that benchmark's hand loop or ``Worker`` end to end instead, ``K`` times
in one process (every thread: count without toggles, and subtract the count of
``--runs 1`` from that of ``--runs 2`` to get one run's). Used for
``benchmarks/results/sqlite-session6.md`` and ``sqlite-session7.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import sqlite3
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._common import drain_payload
from .sqlite_frames import BATCH, SLOTS, _jobs

#: The result each drain job is completed with (the size of ``drain_work``'s).
DRAIN_RESULT = b'{"n": 1, "ok": true}'


def _drain_jobs(n: int) -> list[Any]:
    from jobpool_async import Job
    from jobpool_async.backends.base import check_new_job

    return [
        check_new_job(Job(id=f"d-{i:08d}", job_type="bench", job_definition=drain_payload(i)))
        for i in range(n)
    ]


def end_to_end(consumer: str, n: int, runs: int) -> None:
    """``runs`` runs of the drain benchmark's hand loop or ``Worker`` on fresh stores."""
    from jobpool_async import SQLiteBackend

    from .workloads import drain_stream, drain_worker

    body = drain_worker if consumer == "worker" else drain_stream

    async def one() -> None:
        with tempfile.TemporaryDirectory(prefix="jp-cost-") as tmp:
            backend = SQLiteBackend(Path(tmp) / "store.db")
            try:
                out = await body(backend, n, SLOTS, 600.0)
            finally:
                await backend.close()
            if out.problem:
                raise RuntimeError(out.problem)

    for _ in range(runs):
        asyncio.run(one())


def _measured(body: Callable[[], Any], counted: bool) -> Any:
    """Run ``body``, inside ``functools.reduce`` when it is the counted phase."""
    return functools.reduce(lambda _, step: step(), [body], None) if counted else body()


def run(kind: str, phase: str, n: int) -> None:
    from jobpool_async.backends import sqlite as sq
    from jobpool_async.backends.base import COMPLETE, Change, Refill

    with tempfile.TemporaryDirectory(prefix="jp-cost-") as tmp:
        path = Path(tmp) / "store.db"
        conn = sqlite3.connect(path, isolation_level=None, cached_statements=256)
        sq._open_store(conn, str(path), "NORMAL", 5000)
        now = datetime.now(UTC)
        if kind == "drain":
            jobs = _drain_jobs(n)
        else:
            jobs = _jobs(n, kind == "mixed", random.Random(7), now)
        result = DRAIN_RESULT if kind == "drain" else b""

        def enqueue() -> None:
            for start in range(0, n, BATCH):
                sq._transaction(conn, sq._insert, jobs[start : start + BATCH])

        def cycle() -> None:
            # after every creation time (under callgrind, making the jobs takes seconds):
            # a job finalized before it was created is an exception a store indexes apart
            at = sq._us(max(now, *(job.created_at for job in jobs))) + 1_000_000
            rows, _ = sq._claim_promoting(conn, "bench", (), SLOTS, at, True, True)
            done = 0
            while rows:
                ids = [row[0] for row in rows]  # a claim's rows begin with the id
                done += len(ids)
                at += 1000
                changes = [Change(i, COMPLETE, result=result) for i in ids]
                refill = Refill("bench", (), frozenset(ids))
                rows = sq._transaction(conn, sq._apply, changes, at, refill, False)[2]
            if done != n:
                raise RuntimeError(f"only {done} of {n} jobs went through")

        _measured(enqueue, phase == "enqueue")
        _measured(cycle, phase == "cycle")
        conn.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sqlite_cost")
    parser.add_argument("kind", choices=("plain", "mixed", "drain"))
    parser.add_argument("phase", choices=("enqueue", "cycle", "stream", "worker"))
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=1, help="stream/worker: runs in one process")
    args = parser.parse_args(argv)
    if args.phase in ("stream", "worker"):
        if args.kind != "drain":
            parser.error("stream and worker run the drain workload (kind drain)")
        end_to_end(args.phase, args.jobs, args.runs)
    else:
        run(args.kind, args.phase, args.jobs)


if __name__ == "__main__":
    main()
