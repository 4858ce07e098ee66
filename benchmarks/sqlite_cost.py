"""One phase of the SQLite storage thread's work on the schedules workload, to count
under callgrind (instructions per job do not depend on the machine's load).

``valgrind --tool=callgrind --collect-atstart=no --toggle-collect=functools_reduce
python -m benchmarks.sqlite_cost plain|mixed enqueue|cycle [--jobs 5000]``

Runs the backend's thread functions on a plain ``sqlite3`` connection, as
:mod:`benchmarks.sqlite_frames` does: ``--jobs`` jobs (plain, or mixed: random
priorities, 20% scheduled slightly in the past) enqueued in batches of 1,000, then
one 10-slot stream's claim cycle (each commit completes 10 jobs and claims the next
10). Only the phase named runs inside ``functools.reduce``, so callgrind's
``--toggle-collect=functools_reduce`` counts that phase alone (divide by ``--jobs``).
Used for ``benchmarks/results/sqlite-session5.md``.
"""

from __future__ import annotations

import argparse
import functools
import random
import sqlite3
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .sqlite_frames import BATCH, SLOTS, _jobs


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
        jobs = _jobs(n, kind == "mixed", random.Random(7), now)

        def enqueue() -> None:
            for start in range(0, n, BATCH):
                sq._transaction(conn, sq._insert, jobs[start : start + BATCH])

        def cycle() -> None:
            at = sq._us(now) + 1_000_000
            rows, _ = sq._claim_promoting(conn, "bench", (), SLOTS, at, True, True)
            done = 0
            while rows:
                ids = [row[0] for row in rows]  # a claim's rows begin with the id
                done += len(ids)
                at += 1000
                changes = [Change(i, COMPLETE, result=b"") for i in ids]
                refill = Refill("bench", (), frozenset(ids))
                rows = sq._transaction(conn, sq._apply, changes, at, refill, False)[2]
            if done != n:
                raise RuntimeError(f"only {done} of {n} jobs went through")

        _measured(enqueue, phase == "enqueue")
        _measured(cycle, phase == "cycle")
        conn.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sqlite_cost")
    parser.add_argument("kind", choices=("plain", "mixed"))
    parser.add_argument("phase", choices=("enqueue", "cycle"))
    parser.add_argument("--jobs", type=int, default=5000)
    args = parser.parse_args(argv)
    run(args.kind, args.phase, args.jobs)


if __name__ == "__main__":
    main()
