"""What schedules and priorities cost (SPEC §8.2), measured as ratios in one run.

``python -m benchmarks.schedules [--backends memory,sqlite,leveldb,postgres]
[--jobs 5000] [--pairs 5] [--future 100000] [--samples 200]``

* **Mixed workload.** One stream of 10 slots takes ``--jobs`` jobs enqueued in
  batches of 1,000 while it runs, completing each batch in one call: plain jobs
  (priority 0, no schedule) against jobs of random priority (-100 … 100) of which
  20% carry a ``scheduled_at`` (up to 50 ms before the jobs are built, so already
  due when enqueued: every one goes through the waiting index and is promoted by a
  claim). Both sides' jobs are built before the clock starts. Pairs on fresh
  stores, alternating which runs first; ratio = median mixed rate / median plain
  rate (target ≥ 0.8).
* **Due -> claimed.** A stream waits on an empty store; a job scheduled 10 ms ahead
  is enqueued; the latency is the time the stream hands it over minus its
  ``scheduled_at`` (the queue's one timer, then a claim). In-process backends
  (memory, SQLite, LevelDB); targets p50 ≤ 2 ms, p99 ≤ 5 ms.
* **Claim cost with future jobs.** The mixed-free workload on a store holding 0,
  then ``--future`` jobs scheduled a day ahead (SQLite and PostgreSQL): they wait
  in their own index, so a claim never scans them (target: ratio within ±20%).

Writes ``benchmarks/results/schedules.md`` and ``schedules.json`` (``--out``).
PostgreSQL runs with ``--postgres-dsn`` or ``JOBPOOL_BENCH_POSTGRES_DSN``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from jobpool_async import Job, PoolQueue, open_backend
from jobpool_async.backends.base import Backend

from ._common import percentile
from ._targets import BACKEND_NAMES, Target, find_targets

SLOTS = 10
BATCH = 1000
IN_PROCESS = ("memory", "sqlite", "leveldb")
FUTURE_BACKENDS = ("sqlite", "postgres")


def _jobs(n: int, mixed: bool, rng: random.Random) -> list[Job]:
    """The run's jobs, built before its clock starts (both sides alike): plain, or of
    random priority with 20% scheduled up to 50 ms before now (so already due when
    enqueued, a little later)."""
    prefix = uuid.uuid4().hex[:6]
    if not mixed:
        return [Job(id=f"{prefix}-{i}", job_type="bench") for i in range(n)]
    scheduled = set(rng.sample(range(n), n // 5))
    at = datetime.now(UTC)
    return [
        Job(
            id=f"{prefix}-{i}",
            job_type="bench",
            priority=rng.randint(-100, 100),
            scheduled_at=at - timedelta(milliseconds=rng.uniform(0, 50))
            if i in scheduled
            else None,
        )
        for i in range(n)
    ]


async def _run(backend: Backend, n: int, mixed: bool, rng: random.Random) -> tuple[float, float]:
    """Jobs per second through one stream (the clock covers enqueueing and taking all),
    and this process's CPU time per job (µs) over the same span: less swayed by other
    processes on a shared machine than the rate."""
    jobs = _jobs(n, mixed, rng)
    delivered = 0
    done = asyncio.Event()
    async with PoolQueue(backend, lease=None) as queue:
        started = asyncio.Event()

        async def consume() -> None:
            nonlocal delivered
            async with queue.stream_jobs("bench", max_assigned_jobs=SLOTS) as stream:
                started.set()
                async for batch in stream:
                    delivered += len(batch)
                    await queue.complete_jobs({j.id: b"" for j in batch})
                    if delivered >= n:
                        done.set()
                        return

        task = asyncio.create_task(consume())
        await started.wait()
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        for start in range(0, n, BATCH):
            await queue.enqueue_jobs(jobs[start : start + BATCH])
        await asyncio.wait_for(done.wait(), 300)
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        await task
        stats = await queue.get_job_stats()
        if stats.completed_jobs < n:
            raise RuntimeError(f"only {stats.completed_jobs} of {n} jobs completed")
    return n / seconds, cpu / n * 1e6


async def mixed_ratio(target: Target, workdir: Path, n: int, pairs: int) -> dict[str, Any]:
    rng = random.Random(7)
    plain: list[tuple[float, float]] = []
    mixed: list[tuple[float, float]] = []
    for i in range(pairs):
        for kind in (False, True) if i % 2 == 0 else (True, False):
            out = await _on_fresh_store(target, workdir, lambda b, k=kind: _run(b, n, k, rng))
            (mixed if kind else plain).append(out)
    return {
        "backend": target.name,
        "jobs": n,
        "pairs": pairs,
        "plain_jobs_per_s": _median(plain, 0),
        "mixed_jobs_per_s": _median(mixed, 0),
        "ratio": _median(mixed, 0) / _median(plain, 0),
        "cpu_ratio": _median(plain, 1) / _median(mixed, 1),
    }


def _median(runs: list[tuple[float, float]], k: int) -> float:
    return statistics.median(r[k] for r in runs)


async def _on_fresh_store(
    target: Target, workdir: Path, body: Any, future: int = 0
) -> tuple[float, float]:
    store = target.new_store(workdir)
    try:
        if future:
            async with PoolQueue(store.backend, lease=None) as queue:
                await _fill_future_queue(queue, future)
            store = _reopened(target, store)
        out: tuple[float, float] = await body(store.backend)
        return out
    finally:
        await store.cleanup()


def _reopened(target: Target, store: Any) -> Any:
    """The same store through a new backend (the first was closed with its queue)."""
    if store.twin is not None:
        return type(store)(store.twin(), store.cleanup, store.location, store.twin)
    backend = open_backend(store.location)
    return type(store)(backend, store.cleanup, store.location, None)


async def _fill_future_queue(queue: PoolQueue, n: int) -> None:
    later = datetime.now(UTC) + timedelta(days=1)
    prefix = uuid.uuid4().hex[:6]
    for start in range(0, n, 10_000):
        await queue.enqueue_jobs(
            [
                Job(id=f"f{prefix}-{i}", job_type="later", scheduled_at=later)
                for i in range(start, min(n, start + 10_000))
            ]
        )


async def future_ratio(
    target: Target, workdir: Path, n: int, pairs: int, future: int
) -> dict[str, Any]:
    rng = random.Random(11)
    empty: list[tuple[float, float]] = []
    full: list[tuple[float, float]] = []
    for _ in range(pairs):
        empty.append(await _on_fresh_store(target, workdir, lambda b: _run(b, n, False, rng)))
        full.append(
            await _on_fresh_store(target, workdir, lambda b: _run(b, n, False, rng), future)
        )
    return {
        "backend": target.name,
        "jobs": n,
        "future_jobs": future,
        "pairs": pairs,
        "empty_jobs_per_s": _median(empty, 0),
        "future_jobs_per_s": _median(full, 0),
        "ratio": _median(full, 0) / _median(empty, 0),
        "cpu_ratio": _median(empty, 1) / _median(full, 1),
    }


async def _bare_timer_ms(delay: float = 0.01) -> float:
    """How late the event loop runs a bare ``call_later`` callback: the machine's own
    floor for a timer, beside which the queue's latency is read."""
    loop = asyncio.get_running_loop()
    fired: asyncio.Future[float] = loop.create_future()
    due = time.monotonic() + delay
    loop.call_later(delay, lambda: fired.set_result(time.monotonic()))
    return (await fired - due) * 1000


async def due_latency(target: Target, workdir: Path, samples: int) -> dict[str, Any]:
    store = target.new_store(workdir)
    lat: list[float] = []
    bare: list[float] = []
    try:
        async with (
            PoolQueue(store.backend, lease=None) as queue,
            queue.stream_jobs("bench") as stream,
        ):
            for i in range(samples):
                waiting = asyncio.ensure_future(stream.__anext__())
                await asyncio.sleep(0.002)  # the stream claims nothing and waits
                due = datetime.now(UTC) + timedelta(milliseconds=10)
                await queue.enqueue_job(Job(id=f"l{i}", job_type="t", scheduled_at=due))
                (job,) = await asyncio.wait_for(waiting, 10)
                lat.append((datetime.now(UTC) - due).total_seconds() * 1000)
                await queue.complete_job(job.id, b"")
                bare.append(await _bare_timer_ms())
    finally:
        await store.cleanup()
    return {
        "backend": target.name,
        "samples": samples,
        "p50_ms": percentile(lat, 0.5),
        "p99_ms": percentile(lat, 0.99),
        "max_ms": max(lat),
        "bare_timer_p50_ms": percentile(bare, 0.5),
        "bare_timer_p99_ms": percentile(bare, 0.99),
    }


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Schedules and priorities: what they cost, same run",
        "",
        f"Run {result['started']} UTC, `{result['command']}`.",
        "",
        "Mixed = random priorities (-100 … 100), 20% of jobs with a `scheduled_at`",
        "(already due when enqueued: each goes through the waiting index and a",
        "promotion); plain = priority 0, no schedule. Ratio = median mixed rate /",
        "median plain rate over alternating pairs of fresh stores (target ≥ 0.8). By CPU:",
        "median CPU time per job of this process, plain / mixed (the same ratio measured",
        "on the work done, less swayed by other processes; for PostgreSQL without the",
        "server's share).",
        "",
        "| backend | jobs | pairs | plain (jobs/s) | mixed (jobs/s) | mixed/plain | by CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["mixed"]:
        lines.append(
            f"| {r['backend']} | {r['jobs']:,} | {r['pairs']} | {r['plain_jobs_per_s']:,.0f} | "
            f"{r['mixed_jobs_per_s']:,.0f} | {r['ratio']:.3f} | {r['cpu_ratio']:.3f} |"
        )
    lines += [
        "",
        "Due -> claimed: a waiting stream, a job scheduled 10 ms ahead; latency = hand-over",
        "time - `scheduled_at` (targets p50 ≤ 2 ms, p99 ≤ 5 ms). Bare timer: how late the",
        "event loop ran a plain `call_later` of 10 ms after each sample, the machine's floor.",
        "",
        "| backend | samples | p50 | p99 | max | bare timer p50 | bare timer p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["latency"]:
        lines.append(
            f"| {r['backend']} | {r['samples']} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | "
            f"{r['max_ms']:.2f} ms | {r.get('bare_timer_p50_ms', 0):.2f} ms | "
            f"{r.get('bare_timer_p99_ms', 0):.2f} ms |"
        )
    lines += [
        "",
        "Claim cost with jobs scheduled a day ahead in the store: the plain workload's",
        "rate on a store holding them / on an empty store (target within ±20%); by CPU:",
        "CPU time per job on the empty store / on the full one.",
        "",
        "| backend | jobs | future jobs | pairs | empty (jobs/s) | with future (jobs/s) | ratio "
        "| by CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["future"]:
        lines.append(
            f"| {r['backend']} | {r['jobs']:,} | {r['future_jobs']:,} | {r['pairs']} | "
            f"{r['empty_jobs_per_s']:,.0f} | {r['future_jobs_per_s']:,.0f} | {r['ratio']:.3f} "
            f"| {r['cpu_ratio']:.3f} |"
        )
    if result["unavailable"]:
        lines += [
            "",
            "Unavailable: " + ", ".join(f"{k} ({v})" for k, v in result["unavailable"].items()),
        ]
    return "\n".join(lines) + "\n"


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.schedules")
    parser.add_argument("--backends", default=",".join(BACKEND_NAMES))
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--future", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--postgres-dsn", default=os.environ.get("JOBPOOL_BENCH_POSTGRES_DSN"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "schedules"))
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "command": "python -m benchmarks.schedules "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "mixed": [],
        "latency": [],
        "future": [],
        "unavailable": {},
    }
    with tempfile.TemporaryDirectory(prefix="jp-schedules-") as tmp:
        workdir = Path(tmp)
        for target in find_targets(args.backends.split(","), args.postgres_dsn):
            if not target.available:
                result["unavailable"][target.name] = target.reason
                continue
            print(f"{target.name} ...", flush=True)
            result["mixed"].append(await mixed_ratio(target, workdir, args.jobs, args.pairs))
            if target.name in IN_PROCESS:
                result["latency"].append(await due_latency(target, workdir, args.samples))
            if target.name in FUTURE_BACKENDS and args.future:
                result["future"].append(
                    await future_ratio(target, workdir, args.jobs, args.pairs, args.future)
                )
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    asyncio.run(main())
