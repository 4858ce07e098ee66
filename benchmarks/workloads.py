"""The jobpool_async workloads, run against one backend store each.

Every workload builds its jobs before the clock starts, checks its result after
it stops (every job delivered exactly once and ``COMPLETED`` in the store), and
returns plain numbers; the runner turns them into rows beside their floors.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from jobpool_async import Job, PoolQueue
from jobpool_async.backends.base import COMPLETE, Backend, Change, utcnow

from ._common import check_exactly_once, drain_payload, drain_work, median, now, percentile
from ._targets import Target

_ROOT = str(Path(__file__).resolve().parent.parent)
#: The library's default lease (``benchmarks.leases`` also runs with ``None``: off).
DEFAULT_LEASE = timedelta(seconds=30)

__all__ = [
    "Outcome",
    "bulk_enqueue",
    "drain_stream",
    "drain_worker",
    "end_to_end_stream",
    "end_to_end_worker",
    "fan_out",
    "memory_profile",
    "scale",
    "wake_latency",
    "worker_available",
]


@dataclass(slots=True)
class Outcome:
    """What one workload run measured; ``problem`` is empty when its checks held."""

    jobs: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    problem: str = ""
    series: list[dict[str, float]] = field(default_factory=list)


def _jobs(n: int, *, prefix: str = "", tags: Sequence[str] = (), tag_cycle: int = 0) -> list[Job]:
    """``n`` fresh jobs; with ``tag_cycle`` job ``i`` carries tag ``t{i % tag_cycle}``."""
    prefix = prefix or f"{uuid.uuid4().hex[:6]}-"
    out = []
    for i in range(n):
        job_tags = list(tags)
        if tag_cycle:
            job_tags.append(f"t{i % tag_cycle}")
        out.append(Job(id=f"{prefix}{i:08d}", job_type="bench", tags=job_tags))
    return out


async def _enqueue(queue: PoolQueue, jobs: Sequence[Job], batch: int) -> None:
    for i in range(0, len(jobs), batch):
        await queue.enqueue_jobs(jobs[i : i + batch])


async def _completed(queue: PoolQueue) -> int:
    return (await queue.get_job_stats()).completed_jobs


async def _check_store(queue: PoolQueue, n: int) -> str:
    stats = await queue.get_job_stats()
    if stats.completed_jobs != n or stats.total_jobs != n:
        return (
            f"store has {stats.completed_jobs} completed of {stats.total_jobs} jobs, expected {n}"
        )
    return ""


def _join(*problems: str) -> str:
    return "; ".join(p for p in problems if p)


# --- 1. bulk enqueue ---------------------------------------------------------------------


async def bulk_enqueue(backend: Backend, n: int, batch: int) -> Outcome:
    jobs = _jobs(n)
    async with PoolQueue(backend) as queue:
        t0 = now()
        await _enqueue(queue, jobs, batch)
        seconds = now() - t0
        stats = await queue.get_job_stats()
    problem = "" if stats.pending_jobs == n else f"{stats.pending_jobs} pending, expected {n}"
    return Outcome(n, seconds, problem=problem)


# --- 2. end to end -------------------------------------------------------------------------


async def end_to_end_stream(
    backend: Backend,
    n: int,
    slots: int,
    enqueue_batch: int,
    time_limit: float,
    *,
    lease: timedelta | None = DEFAULT_LEASE,
) -> Outcome:
    """One stream of ``slots`` slots; each batch completed with one ``complete_jobs`` call.

    The stream is waiting before the clock starts; the clock covers enqueueing
    every job (in batches) and completing the last one.
    """
    jobs = _jobs(n)
    delivered: list[str] = []
    done = asyncio.Event()
    calls = 0
    async with PoolQueue(backend, lease=lease) as queue:
        started = asyncio.Event()

        async def consume() -> None:
            nonlocal calls
            async with queue.stream_jobs("bench", max_assigned_jobs=slots) as stream:
                started.set()
                async for batch in stream:
                    calls += 1
                    delivered.extend(j.id for j in batch)
                    await queue.complete_jobs({j.id: b"" for j in batch})
                    if len(delivered) >= n:
                        done.set()
                        return

        task = asyncio.create_task(consume())
        await started.wait()
        await asyncio.sleep(0.01)  # the stream is now idle, waiting for work
        t0 = now()
        await _enqueue(queue, jobs, enqueue_batch)
        await asyncio.wait_for(done.wait(), time_limit)
        seconds = now() - t0
        await task
        problem = _join(
            check_exactly_once((j.id for j in jobs), delivered), await _check_store(queue, n)
        )
    return Outcome(n, seconds, {"batches": calls, "mean_batch": n / max(calls, 1)}, problem)


def worker_available() -> tuple[bool, str]:
    """Whether ``Worker`` and ``Config`` exist in this checkout (another issue builds them)."""
    try:
        mod = importlib.import_module("jobpool_async")
        getattr(mod, "Worker")  # noqa: B009 - may not exist yet
        getattr(mod, "Config")  # noqa: B009
    except (ImportError, AttributeError) as exc:
        return False, f"jobpool_async.Worker is not available yet ({exc})"
    return True, ""


async def end_to_end_worker(
    backend: Backend,
    n: int,
    slots: int,
    enqueue_batch: int,
    time_limit: float,
    *,
    lease: timedelta | None = DEFAULT_LEASE,
) -> Outcome:
    """The same workload through a ``Worker`` (``concurrency=slots``), no-op processor."""
    mod: Any = importlib.import_module("jobpool_async")
    jobs = _jobs(n)
    delivered: list[str] = []
    all_seen = asyncio.Event()

    async def processor(job: Job) -> bytes:
        delivered.append(job.id)
        if len(delivered) >= n:
            all_seen.set()
        return b""

    async with PoolQueue(backend, lease=lease) as queue:
        worker = mod.Worker(
            queue, processor, assignee_id="bench", config=mod.Config(concurrency=slots)
        )
        async with worker:
            await asyncio.sleep(0.01)
            t0 = now()
            await _enqueue(queue, jobs, enqueue_batch)
            await asyncio.wait_for(all_seen.wait(), time_limit)
            # stop() returns once every outcome is written: the clock ends when the
            # last job is completed in storage (as a peer's drain mode does)
            await asyncio.wait_for(worker.stop(), time_limit)
            seconds = now() - t0
        problem = _join(
            check_exactly_once((j.id for j in jobs), delivered), await _check_store(queue, n)
        )
    return Outcome(n, seconds, problem=problem)


# --- 2b. drain: the pattern users write most (issue #20) -------------------------------------


def _drain_jobs(n: int) -> list[Job]:
    prefix = f"{uuid.uuid4().hex[:6]}-"
    return [
        Job(id=f"{prefix}{i:08d}", job_type="bench", job_definition=drain_payload(i))
        for i in range(n)
    ]


async def drain_stream(
    backend: Backend,
    n: int,
    slots: int,
    time_limit: float,
    *,
    lease: timedelta | None = DEFAULT_LEASE,
) -> Outcome:
    """``n`` jobs with 100-byte JSON payloads enqueued in one ``enqueue_jobs`` call, then
    drained by one stream of ``slots`` slots whose loop decodes each payload, awaits a
    trivial coroutine, encodes a small JSON result and completes the batch with one
    ``complete_jobs``. The clock covers the enqueue and the drain."""
    jobs = _drain_jobs(n)
    delivered: list[str] = []
    calls = 0
    async with PoolQueue(backend, lease=lease) as queue:
        t0, cpu0 = now(), time.process_time()
        await queue.enqueue_jobs(jobs)
        enqueued = now() - t0
        async with asyncio.timeout(time_limit):
            async with queue.stream_jobs("bench", max_assigned_jobs=slots) as stream:
                async for batch in stream:
                    calls += 1
                    results = {}
                    for job in batch:
                        results[job.id] = await drain_work(job.job_definition)
                    delivered.extend(results)
                    await queue.complete_jobs(results)
                    if len(delivered) >= n:
                        break
        seconds, cpu = now() - t0, time.process_time() - cpu0
        problem = _join(
            check_exactly_once((j.id for j in jobs), delivered), await _check_store(queue, n)
        )
    metrics = {"batches": calls, "enqueue_s": enqueued, "drain_s": seconds - enqueued, "cpu_s": cpu}
    return Outcome(n, seconds, metrics, problem)


async def drain_worker(
    backend: Backend,
    n: int,
    slots: int,
    time_limit: float,
    *,
    lease: timedelta | None = DEFAULT_LEASE,
) -> Outcome:
    """The same jobs, enqueued the same way, run by a ``Worker`` with ``slots`` at once
    whose processor does the same work; the clock ends when the last is completed."""
    mod: Any = importlib.import_module("jobpool_async")
    jobs = _drain_jobs(n)
    delivered: list[str] = []
    all_seen = asyncio.Event()

    async def processor(job: Job) -> bytes:
        delivered.append(job.id)
        if len(delivered) >= n:
            all_seen.set()
        return await drain_work(job.job_definition)

    async with PoolQueue(backend, lease=lease) as queue:
        t0, cpu0 = now(), time.process_time()
        await queue.enqueue_jobs(jobs)
        enqueued = now() - t0
        worker = mod.Worker(
            queue, processor, assignee_id="bench", config=mod.Config(concurrency=slots)
        )
        async with worker:
            await asyncio.wait_for(all_seen.wait(), time_limit)
            await asyncio.wait_for(worker.stop(), time_limit)  # every outcome written
            seconds, cpu = now() - t0, time.process_time() - cpu0
        problem = _join(
            check_exactly_once((j.id for j in jobs), delivered), await _check_store(queue, n)
        )
    metrics = {"enqueue_s": enqueued, "drain_s": seconds - enqueued, "cpu_s": cpu}
    return Outcome(n, seconds, metrics, problem)


# --- 3. fan-out ----------------------------------------------------------------------------


async def fan_out(
    backend: Backend,
    n: int,
    streams: int,
    slots: int,
    tags: int,
    enqueue_batch: int,
    time_limit: float,
    *,
    lease: timedelta | None = DEFAULT_LEASE,
) -> Outcome:
    """``streams`` streams of ``slots`` slots, stream ``k`` filtering on tag ``t{k % tags}``."""
    jobs = _jobs(n, tag_cycle=tags)
    delivered: list[str] = []
    wrong_tag = 0
    done = asyncio.Event()
    async with PoolQueue(backend, lease=lease) as queue:
        ready = 0
        all_ready = asyncio.Event()

        async def consume(k: int) -> None:
            nonlocal ready, wrong_tag
            tag = f"t{k % tags}"
            async with queue.stream_jobs(f"bench-{k}", tags=[tag], max_assigned_jobs=slots) as s:
                ready += 1
                if ready == streams:
                    all_ready.set()
                async for batch in s:
                    wrong_tag += sum(1 for j in batch if tag not in j.tags)
                    delivered.extend(j.id for j in batch)
                    await queue.complete_jobs({j.id: b"" for j in batch})
                    if len(delivered) >= n:
                        done.set()

        tasks = [asyncio.create_task(consume(k)) for k in range(streams)]
        await all_ready.wait()
        await asyncio.sleep(0.01)
        t0 = now()
        await _enqueue(queue, jobs, enqueue_batch)
        await asyncio.wait_for(done.wait(), time_limit)
        deadline = now() + time_limit  # other streams' last completions may be in flight
        while await _completed(queue) < n and now() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.002)  # storage state: no event to wait on
        seconds = now() - t0
        stored = await _check_store(queue, n)
        await queue.close()  # ends every stream
        await asyncio.gather(*tasks)
    problem = _join(
        check_exactly_once((j.id for j in jobs), delivered),
        f"{wrong_tag} jobs delivered to a stream whose tag they lack" if wrong_tag else "",
        stored,
    )
    return Outcome(n, seconds, problem=problem)


# --- 4. wake latency -------------------------------------------------------------------------


async def wake_latency(
    backend: Backend, samples: int, time_limit: float, producer: Backend | None = None
) -> Outcome:
    """An idle one-slot stream; one job enqueued at a time once the stream waits again.

    Latency is from ``enqueue_job`` returning to the consumer holding the job; when
    the consumer already has it by then (the wake ran inside the enqueue call), the
    sample is 0. The producer waits for the consumer to complete the previous job
    and then a 2 ms gap, so the stream is idle when each job arrives.

    With ``producer`` (a second backend on the same store, as another process would
    have: its own connections and listener), the jobs are enqueued through a queue
    on it, and the consumer's queue polls only every 30 s: the wake-up must come
    pushed from the other queue (PostgreSQL: ``NOTIFY``).
    """
    jobs = _jobs(samples)
    received: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
    latencies: list[float] = []
    delivered: list[str] = []
    poll = 30.0 if producer is not None else None
    async with PoolQueue(backend, poll_interval=poll) as queue, contextlib.AsyncExitStack() as x:
        enqueuer = queue if producer is None else await x.enter_async_context(PoolQueue(producer))
        started = asyncio.Event()

        async def consume() -> None:
            async with queue.stream_jobs("bench", max_assigned_jobs=1) as stream:
                started.set()
                async for batch in stream:
                    t = now()
                    await queue.complete_jobs({j.id: b"" for j in batch})
                    for j in batch:
                        received.put_nowait((j.id, t))

        task = asyncio.create_task(consume())
        await started.wait()
        t_start = now()
        try:
            for job in jobs:
                await asyncio.sleep(0.002)
                await enqueuer.enqueue_job(job)
                t_ret = now()
                job_id, t_recv = await asyncio.wait_for(received.get(), time_limit)
                delivered.append(job_id)
                latencies.append(max(0.0, t_recv - t_ret))
        finally:
            seconds = now() - t_start
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        problem = _join(
            check_exactly_once((j.id for j in jobs), delivered), await _check_store(queue, samples)
        )
    metrics = {
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies, default=0.0) * 1000,
        "samples": float(len(latencies)),
    }
    return Outcome(samples, seconds, metrics, problem)


# --- 5. scale --------------------------------------------------------------------------------


async def _preload(backend: Backend, count: int, chunk: int = 10_000) -> None:
    """Add ``count`` COMPLETED jobs straight through the backend: insert, claim, complete."""
    prefix = f"old-{uuid.uuid4().hex[:6]}-"
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        jobs = [
            Job(id=f"{prefix}{start + i:08d}", job_type="old", tags=["old"]) for i in range(size)
        ]
        await backend.insert(jobs)
        moment: datetime = utcnow()
        claimed = await backend.claim("preload", (), size, moment)
        outcome = await backend.apply(
            [Change(j.id, COMPLETE, result=b"") for j in claimed], utcnow()
        )
        if outcome.errors or len(claimed) != size:
            raise RuntimeError(f"preload claimed {len(claimed)} of {size}: {outcome.errors}")


async def scale(
    backend: Backend,
    levels: Sequence[int],
    jobs_per_level: int,
    rounds: int,
    slots: int,
    stats_calls: int,
    enqueue_batch: int,
    time_limit: float,
) -> list[tuple[int, Outcome]]:
    """Assignment throughput and stats latency with ``levels`` completed jobs already stored.

    At each level the store is topped up with completed jobs; then, ``rounds``
    times, ``jobs_per_level`` new jobs are enqueued (not timed) and drained
    through one stream of ``slots`` slots with batched completion (timed). The
    best round is reported (the machine is shared: the best is the least
    disturbed). Stats latency is the median of ``stats_calls`` ``get_job_stats()``
    calls over the whole store, and likewise with a tag filter.
    """
    results: list[tuple[int, Outcome]] = []
    stored = 0
    async with PoolQueue(backend) as queue:
        for level in sorted(levels):
            t_pre = now()
            await _preload(queue.backend, level - stored)
            preload_s = now() - t_pre
            stored = level
            problem = ""
            times: list[float] = []
            for _ in range(rounds):
                jobs = _jobs(jobs_per_level, tags=["fresh"])
                await _enqueue(queue, jobs, enqueue_batch)
                delivered: list[str] = []
                t0 = now()
                async with queue.stream_jobs("bench", max_assigned_jobs=slots) as stream:
                    async for batch in stream:
                        delivered.extend(j.id for j in batch)
                        await queue.complete_jobs({j.id: b"" for j in batch})
                        if len(delivered) >= jobs_per_level or now() - t0 > time_limit:
                            break
                times.append(now() - t0)
                stored += jobs_per_level
                problem = _join(problem, check_exactly_once((j.id for j in jobs), delivered))
            stat_times = []
            stats = None
            for _ in range(stats_calls):
                s0 = now()
                stats = await queue.get_job_stats()
                stat_times.append(now() - s0)
            tag_times = []
            for _ in range(stats_calls):
                s0 = now()
                await queue.get_job_stats(tags=["fresh"])
                tag_times.append(now() - s0)
            if stats is not None and stats.completed_jobs != stored:
                problem = _join(problem, f"{stats.completed_jobs} completed, expected {stored}")
            metrics = {
                "completed_in_store": float(level),
                "stats_ms": median(stat_times) * 1000,
                "stats_tagged_ms": median(tag_times) * 1000,
                "median_round_jobs_per_s": jobs_per_level / median(times),
                "preload_s": preload_s,
            }
            results.append((level, Outcome(jobs_per_level, min(times), metrics, problem)))
    return results


# --- 6. memory -------------------------------------------------------------------------------


async def memory_profile(
    target: Target, location: str, n: int, batch: int, slots: int, time_limit: float
) -> Outcome:
    """Run :mod:`benchmarks._memory_child` in a fresh process and read its RSS samples."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks._memory_child",
        "--backend",
        target.name,
        "--location",
        location,
        "--jobs",
        str(n),
        "--batch",
        str(batch),
        "--slots",
        str(slots),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=_ROOT
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), time_limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return Outcome(n, time_limit, problem=f"memory child timed out after {time_limit:.0f} s")
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        return Outcome(n, 0.0, problem=f"memory child failed: {' | '.join(tail)}")
    import json

    data = json.loads(out.decode().strip().splitlines()[-1])
    return Outcome(
        n,
        float(data["seconds"]),
        {k: float(v) for k, v in data["metrics"].items()},
        str(data.get("problem", "")),
        [{k: float(v) for k, v in s.items()} for s in data["samples"]],
    )
