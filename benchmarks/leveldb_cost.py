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
* ``bytes``: no callgrind needed; the ``stream`` workload once, printing the LevelDB
  operations and bytes (key plus value, without the log's few bytes of framing per
  operation) its writes stage per drained job, by key family (see the key layout in
  :mod:`jobpool_async.backends.leveldb`): LevelDB's log, its memtable and its
  background thread's flushes and compactions all work in proportion to them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


class _CountingBatch:
    """A ``WriteBatch`` that counts what is staged in it, by operation and key family."""

    __slots__ = ("_batch", "_ops", "_size")

    def __init__(self, batch: Any, ops: Counter[str], size: Counter[str]) -> None:
        self._batch, self._ops, self._size = batch, ops, size

    def put(self, key: bytes, value: bytes) -> None:
        family = f"put {key[:1].decode()}"
        self._ops[family] += 1
        self._size[family] += len(key) + len(value)
        self._batch.put(key, value)

    def delete(self, key: bytes) -> None:
        family = f"delete {key[:1].decode()}"
        self._ops[family] += 1
        self._size[family] += len(key)
        self._batch.delete(key)

    def write(self) -> None:
        self._batch.write()


class _CountingBackend(LevelDBBackend):
    """The backend, its writes counted (every write of the drain is staged by ``_stage``)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.ops: Counter[str] = Counter()
        self.size: Counter[str] = Counter()

    def _stage(self) -> Any:
        w = super()._stage()
        batch = _CountingBatch(w.batch, self.ops, self.size)
        w.batch, w.put, w.delete = batch, batch.put, batch.delete
        return w


async def written(path: Path, n: int) -> str:
    """The drain's (``stream``) LevelDB operations and bytes per drained job."""
    backend = _CountingBackend(path)
    outcome = await workloads.drain_stream(backend, n, 10, 600.0)
    if outcome.problem:
        raise SystemExit(outcome.problem)
    lines = [f"{'':<10} {'ops/job':>8} {'bytes/job':>10}"]
    for family in sorted(backend.ops):
        lines.append(
            f"{family:<10} {backend.ops[family] / n:>8.3f} {backend.size[family] / n:>10.1f}"
        )
    ops, size = sum(backend.ops.values()), sum(backend.size.values())
    lines.append(f"{'total':<10} {ops / n:>8.3f} {size / n:>10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.leveldb_cost")
    modes = ["storage", "stream", "worker", "bytes"]
    parser.add_argument("--mode", choices=modes, default="storage")
    parser.add_argument("--jobs", type=int, default=3000)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="jobpool-ldb-cost-"))
    try:
        if args.mode == "storage":
            storage_only(workdir / "store", args.jobs)
        elif args.mode == "bytes":
            print(asyncio.run(written(workdir / "store", args.jobs)))
        else:
            asyncio.run(whole(workdir / "store", args.jobs, args.mode))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
