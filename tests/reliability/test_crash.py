"""Crash safety: worker processes SIGKILLed at random points, round after round.

After each kill the store is reopened and ``reset_running_jobs()`` is called, then:

* the store opens cleanly every time;
* every job whose enqueue was acknowledged is present;
* every job whose completion was acknowledged is COMPLETED with its result, and
  every COMPLETED job carries the right result (no torn writes);
* after the reset nothing is RUNNING/CANCELLING, and no job is both completed and
  eligible: draining the eligible jobs never hands out a completed one;
* the stats agree with the jobs actually stored.

SQLite runs two workers sharing the file at once; LevelDB allows one process.
Rounds: 5 per backend in CI, 50 with ``JOBPOOL_HYPOTHESIS_PROFILE=long``;
``JOBPOOL_CRASH_SEED`` picks the kill timings.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest

from jobpool_async import JobStatus, PoolQueue

from ..backends import backend_factory
from .conftest import scaled

WORKER = Path(__file__).with_name("_crash_worker.py")
ACTIVE = {JobStatus.RUNNING, JobStatus.CANCELLING}
ELIGIBLE = {JobStatus.INITIAL_PENDING, JobStatus.FAILED_RETRY, JobStatus.UNKNOWN_RETRY}


def _read_log(log: Path) -> list[str]:
    if not log.exists():
        return []
    return log.read_text().splitlines()


async def _stderr(proc: asyncio.subprocess.Process) -> str:
    return (await proc.stderr.read()).decode() if proc.stderr is not None else ""


async def _wait_ready(proc: asyncio.subprocess.Process, log: Path) -> None:
    """Poll the worker's log (with a deadline) until it has opened the store."""
    async with asyncio.timeout(30):
        while "R" not in _read_log(log):
            if proc.returncode is not None:
                raise AssertionError(f"worker exited early: {await _stderr(proc)}")
            await asyncio.sleep(0.01)


@pytest.mark.timeout(scaled(120, 3600))
@pytest.mark.parametrize("backend_name", ["sqlite", "leveldb"])
async def test_sigkill_at_random_points(backend_name: str, tmp_path: Path) -> None:
    seed = int(os.environ.get("JOBPOOL_CRASH_SEED", "7"))
    rng = random.Random(seed)
    factory = backend_factory(backend_name, tmp_path)
    store = tmp_path / ("jobs.db" if backend_name == "sqlite" else "jobs.ldb")
    workers = 2 if backend_name == "sqlite" else 1
    rounds = scaled(5, 50)
    async with PoolQueue(factory()):  # create the store before workers race to
        pass
    enqueued: set[str] = set()
    completed: set[str] = set()
    prefixes: list[str] = []
    for rnd in range(rounds):
        procs, logs = [], []
        for w in range(workers):
            prefix = f"r{rnd}w{w}"
            log = tmp_path / f"{prefix}.log"
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER),
                backend_name,
                str(store),
                str(log),
                prefix,
                str(rng.randrange(2**31)),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            procs.append(proc)
            logs.append(log)
            prefixes.append(prefix)
        try:
            for proc, log in zip(procs, logs, strict=True):
                await _wait_ready(proc, log)
            await asyncio.sleep(rng.uniform(0.02, 0.6))
            for proc in procs:
                assert proc.returncode is None, f"worker died on its own: {await _stderr(proc)}"
        finally:
            for proc in procs:
                await _kill(proc)
        for log in logs:
            for line in _read_log(log):
                kind, _, job_id = line.partition(" ")
                if kind == "E":
                    enqueued.add(job_id)
                elif kind == "C":
                    completed.add(job_id)
        await _check_store(factory, enqueued, completed, prefixes, f"seed {seed} round {rnd}")
    assert completed, "the workers never completed a job: the test exercised nothing"


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL a worker (no cleanup of any kind) and reap it."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
    async with asyncio.timeout(30):
        await proc.wait()


async def _check_store(
    factory: object, enqueued: set[str], completed: set[str], prefixes: list[str], where: str
) -> None:
    assert callable(factory)
    async with PoolQueue(factory()) as queue:
        await queue.reset_running_jobs()
        # Every id any worker could have used: each worker numbers its jobs from 0 and
        # enqueues at most 5 more than it acknowledged.
        probe = set(enqueued)
        for prefix in prefixes:
            numbers = [int(i.rsplit("-", 1)[1]) for i in enqueued if i.startswith(prefix + "-")]
            probe.update(f"{prefix}-{k}" for k in range(max(numbers, default=-1) + 6))
        jobs = {j.id: j for j in await queue.get_jobs(sorted(probe))}
        missing = enqueued - set(jobs)
        assert not missing, f"{where}: acknowledged enqueues lost: {sorted(missing)[:5]}"
        for job_id in completed:
            job = jobs[job_id]
            assert job.status is JobStatus.COMPLETED, (
                f"{where}: {job_id} completed, now {job.status}"
            )
        for job in jobs.values():
            if job.status is JobStatus.COMPLETED:
                assert job.result == b"r:" + job.id.encode(), f"{where}: {job.id} torn result"
                assert job.finalized_at is not None
            assert job.status not in ACTIVE, f"{where}: {job.id} still {job.status} after reset"
        stats = await queue.get_job_stats()
        counts = Counter(j.status for j in jobs.values())
        assert stats.total_jobs == len(jobs), (
            f"{where}: stats {stats.total_jobs} != {len(jobs)} stored"
        )
        assert stats.by_status == {s: counts.get(s, 0) for s in JobStatus}, where
        # Drain: no completed job is ever handed out again.
        eligible = {i for i, j in jobs.items() if j.status in ELIGIBLE}
        drained: set[str] = set()
        if eligible:
            async with queue.stream_jobs("checker", max_assigned_jobs=len(eligible)) as stream:
                while len(drained) < len(eligible):
                    batch = await asyncio.wait_for(stream.__anext__(), 10)
                    drained.update(j.id for j in batch)
                    await queue.complete_jobs({j.id: b"r:" + j.id.encode() for j in batch})
        assert drained == eligible, (
            f"{where}: drained {sorted(drained - eligible)[:5]} not eligible"
        )
        assert not drained & completed
