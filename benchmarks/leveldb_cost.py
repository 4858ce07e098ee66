"""``python -m benchmarks.leveldb_cost``: one LevelDB drain run to count under callgrind.

Instructions per job do not depend on the machine's load, so they are how the LevelDB
backend's per-job cost is compared between revisions on a shared machine::

    for n in 1000 3000; do
      valgrind --tool=callgrind --separate-threads=yes \\
        --callgrind-out-file=cg-$n.%p.out python -m benchmarks.leveldb_cost --mode stream --jobs $n
    done
    # instructions per job, per thread: (total at 3000 - total at 1000) / 2000

Modes:

* ``storage``: the backend's synchronous steps alone, in this thread (no event loop,
  no worker thread): insert ``--jobs`` jobs with 100-byte JSON payloads in one call,
  claim 10, then complete 10 per call with the refill's claim in the same call
  (``_apply_changes`` with a :class:`Refill`), as the drain's stream does.
* ``stream`` / ``worker``: the harness's drain workload on LevelDB
  (:func:`benchmarks.workloads.drain_stream` / ``drain_worker``, 10 slots, leases on):
  the whole process, event loop, storage thread and LevelDB's own background thread
  (``--separate-threads=yes`` splits them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from jobpool_async import Job
from jobpool_async.backends import LevelDBBackend
from jobpool_async.backends.base import COMPLETE, Change, Refill

from . import workloads


def storage_only(path: Path, n: int) -> None:
    """Insert ``n`` jobs, then drain them 10 at a time through the backend's own steps."""
    backend = LevelDBBackend(path)
    backend._open_sync()
    try:
        payload = json.dumps({"x": "a" * 80}).encode()
        jobs = [Job(id=f"job-{i:06d}", job_type="t", job_definition=payload) for i in range(n)]
        backend._insert_jobs(jobs)
        now = datetime.now(UTC)
        claimed = backend._claim("bench", [], 10, now)
        done = 0
        while claimed:
            changes = [Change(job.id, COMPLETE, result=b'{"ok": true}') for job in claimed]
            refill = Refill("bench", (), frozenset(job.id for job in claimed), 0)
            claimed = backend._apply_changes(changes, now, refill).claimed
            done += len(changes)
        if done != n:
            raise SystemExit(f"drained {done} of {n} jobs")
    finally:
        backend._close_sync()


async def whole(path: Path, n: int, mode: str) -> None:
    run = workloads.drain_stream if mode == "stream" else workloads.drain_worker
    outcome = await run(LevelDBBackend(path), n, 10, 600.0)
    if outcome.problem:
        raise SystemExit(outcome.problem)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.leveldb_cost")
    parser.add_argument("--mode", choices=["storage", "stream", "worker"], default="storage")
    parser.add_argument("--jobs", type=int, default=3000)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="jobpool-ldb-cost-"))
    try:
        if args.mode == "storage":
            storage_only(workdir / "store", args.jobs)
        else:
            asyncio.run(whole(workdir / "store", args.jobs, args.mode))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
