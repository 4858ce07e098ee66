"""``python -m benchmarks.leveldb_threads``: where the LevelDB drain's CPU time goes, per thread.

Callgrind counts instructions, not what they cost: on a shared virtual machine the
LevelDB arms ran at about half the instructions per microsecond of the memory arm
(issue #20, ``benchmarks/results/ldb-session9.md``), and the kernel's share (log
writes, thread wake-ups, page faults) is not counted at all. This reads each
thread's user and system time and its context switches from ``/proc`` (Linux only)
around the part of the workload the drain benchmark clocks::

    python -m benchmarks.leveldb_threads --mode stream --jobs 10000 --runs 3
    python -m benchmarks.leveldb_threads --mode hop --jobs 20000

Modes:

* ``stream``: the drain's hand loop (:func:`benchmarks.workloads.drain_stream`'s
  steps: one ``enqueue_jobs`` of ``--jobs`` jobs, then one stream of 10 slots
  completing each batch with one ``complete_jobs``); per job, each thread's user and
  system microseconds (the event loop's, the backend's storage thread's, LevelDB's
  own background thread's), and per batch of 10 its voluntary and involuntary
  context switches; then, per thread and generation, how many cyclic garbage
  collections ran and their time per job (wall clock, from ``gc.callbacks``: the
  thread that allocates past a threshold runs the collection, whoever made the
  objects it walks);
* ``hop``: ``--jobs`` calls of a no-op through an open backend's storage thread
  (its ``WorkerThread``), one at a time: what one thread hand-off costs on this
  machine, with no LevelDB work at all.

Times come in clock ticks (10 ms), so use enough jobs (10,000 or more).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from jobpool_async import PoolQueue
from jobpool_async.backends import LevelDBBackend

from ._common import drain_work
from .workloads import DEFAULT_LEASE, _drain_jobs

_TICK = 1 / os.sysconf("SC_CLK_TCK")

#: Per thread id: name, user seconds, system seconds, voluntary and involuntary
#: context switches.
Sample = dict[int, tuple[str, float, float, int, int]]


def _sample() -> Sample:
    out: Sample = {}
    for entry in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{entry}/stat").read_text()
            status = Path(f"/proc/self/task/{entry}/status").read_text()
        except OSError:  # the thread ended
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        switches = dict(
            line.split(":\t") for line in status.splitlines() if line.endswith(tuple("0123456789"))
        )
        out[int(entry)] = (
            stat[stat.index("(") + 1 : stat.rindex(")")],
            int(fields[11]) * _TICK,
            int(fields[12]) * _TICK,
            int(switches.get("voluntary_ctxt_switches", 0)),
            int(switches.get("nonvoluntary_ctxt_switches", 0)),
        )
    return out


def _report(
    before: Sample, after: Sample, n: int, seconds: float, names: dict[int, str], per: str
) -> str:
    """Each thread's figures per ``per`` (job, hop); a thread not in ``names`` that
    used CPU time is LevelDB's own (its background compaction thread)."""
    parts = [f"wall {seconds / n * 1e6:.1f} us/{per}"]
    total = 0.0
    for tid, (comm, user, system, vol, invol) in sorted(after.items()):
        _, user0, system0, vol0, invol0 = before.get(tid, (comm, 0.0, 0.0, 0, 0))
        du, ds = (user - user0) / n * 1e6, (system - system0) / n * 1e6
        total += du + ds
        if du + ds == 0 and tid not in names:
            continue
        scale, unit = (10, "10 jobs") if per == "job" else (1, per)
        parts.append(
            f"{names.get(tid, f'LevelDB thread ({comm})')}: user {du:.1f} sys {ds:.1f} us/{per}, "
            f"context switches per {unit}: {(vol - vol0) / n * scale:.2f} voluntary, "
            f"{(invol - invol0) / n * scale:.2f} involuntary"
        )
    parts.append(f"all threads {total:.1f} us/{per}")
    return "\n  ".join(parts)


def _storage_thread(backend: LevelDBBackend) -> tuple[Any, int]:
    """The open backend's ``WorkerThread`` and its id in the operating system."""
    thread: Any = backend._thread
    assert thread is not None
    native = thread._thread.native_id
    assert native is not None  # (started in its constructor)
    return thread, native


class _Collections:
    """Cyclic garbage collections while installed: count and seconds per thread name
    and generation."""

    def __init__(self) -> None:
        self.count: dict[tuple[str, int], int] = {}
        self.seconds: dict[tuple[str, int], float] = {}
        self._started: dict[int, float] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        thread = threading.get_ident()
        if phase == "start":
            self._started[thread] = time.perf_counter()
            return
        started = self._started.pop(thread, None)
        if started is None:
            return
        key = (threading.current_thread().name, info["generation"])
        self.count[key] = self.count.get(key, 0) + 1
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started

    def report(self, n: int) -> str:
        parts = [
            f"gc in {name}, generation {generation}: {self.count[name, generation]} "
            f"collections, {self.seconds[name, generation] / n * 1e6:.2f} us/job"
            for name, generation in sorted(self.count)
        ]
        return "\n  ".join(parts or ["no cyclic garbage collection"])


async def _stream(path: Path, n: int) -> str:
    backend = LevelDBBackend(path)
    jobs = _drain_jobs(n)
    delivered: list[str] = []
    names = {threading.get_native_id(): "event loop"}
    async with PoolQueue(backend, lease=DEFAULT_LEASE) as queue:
        _, native = _storage_thread(backend)
        names[native] = "storage thread"
        collections = _Collections()
        gc.callbacks.append(collections)
        before, t0 = _sample(), time.perf_counter()
        await queue.enqueue_jobs(jobs)
        async with queue.stream_jobs("bench", max_assigned_jobs=10) as stream:
            async for batch in stream:
                results = {job.id: await drain_work(job.job_definition) for job in batch}
                delivered.extend(results)
                await queue.complete_jobs(results)
                if len(delivered) >= n:
                    break
        seconds, after = time.perf_counter() - t0, _sample()
        gc.callbacks.remove(collections)
    if sorted(delivered) != sorted(job.id for job in jobs):
        raise SystemExit("the stream did not deliver every job exactly once")
    return _report(before, after, n, seconds, names, "job") + "\n  " + collections.report(n)


async def _hop(path: Path, n: int) -> str:
    backend = LevelDBBackend(path)
    await backend.open()
    names = {threading.get_native_id(): "event loop"}
    try:
        thread, native = _storage_thread(backend)
        names[native] = "worker thread"
        before, t0 = _sample(), time.perf_counter()
        for _ in range(n):
            await thread.submit(int)
        seconds, after = time.perf_counter() - t0, _sample()
    finally:
        await backend.close()
    return _report(before, after, n, seconds, names, "hop")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.leveldb_threads")
    parser.add_argument("--mode", choices=["stream", "hop"], default="stream")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)
    for _ in range(args.runs):
        workdir = Path(tempfile.mkdtemp(prefix="jobpool-ldb-threads-"))
        run = _hop if args.mode == "hop" else _stream
        try:
            print(asyncio.run(run(workdir / "store", args.jobs)))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
