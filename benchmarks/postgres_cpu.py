"""CPU per job of the drain workload on PostgreSQL, client and server, beside the floor.

``python -m benchmarks.postgres_cpu [--jobs 10000] [--rounds 3] [--arms hand,worker,floor]
[--out FILE]``

On a shared machine the rates of ``benchmarks.drain`` swing with the load; the CPU a
job costs moves much less. Each arm runs the drain workload (``benchmarks.workloads``:
the hand loop and the ``Worker``; the raw asyncpg floor's ``drain``) and reports, per
job: the client's CPU (``time.process_time``), the server's (the user and system time
of the arm's PostgreSQL backend processes, read from ``/proc``: the server must run on
this machine) and the WAL bytes written (``pg_current_wal_lsn``: the whole server's,
so other work on it counts too). Arms alternate, after one uncounted warm-up each;
medians of the rounds.

Variants, to price a piece: ``hand-noidle`` drops the ``list_jobs`` indexes
(``jobs_idle_*``) from the store before the run, ``worker-notrace`` runs the Worker
with the OpenTelemetry wrapper turned off, ``hand-future`` runs the hand loop on a
store already holding ``--future`` jobs scheduled a day ahead (enqueued by another
backend before the arm's own opens, so neither clock nor CPU counts them): claims
must not scan them (issue #16), so its CPU per job should match ``hand``'s.

Arms ``plain``, ``mixed``, ``priorities`` and ``scheduled`` run the workload of
``benchmarks.schedules`` instead (jobs enqueued while one stream drains them), plain,
mixed (random priorities and 20% scheduled), and with each half of that alone: what
the mixed workload's server and client CPU go to (issue #16).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from jobpool_async import Job, JobStatus, PoolQueue, _tracing
from jobpool_async.backends.postgres import PostgresBackend

from ._common import drain_payload, drain_work
from .floors import RawAsyncpg
from .workloads import Outcome, drain_stream, drain_worker

_TICK = os.sysconf("SC_CLK_TCK")
_IDLE = "DROP INDEX {s}.jobs_idle_status, {s}.jobs_idle_type, {s}.jobs_idle_tagged"


def _proc_cpu(pids: list[int]) -> float:
    """Seconds of CPU (user + system) the processes ``pids`` have used."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICK


async def _connect(dsn: str) -> Any:
    import asyncpg

    return await asyncpg.connect(dsn)


async def _wal(dsn: str) -> int:
    conn = await _connect(dsn)
    try:
        return int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
    finally:
        await conn.close()


class _Measured(PostgresBackend):
    """A backend that reads its server processes' CPU just before it closes.

    With ``future`` jobs in its store (not the workload's), it reads the clocks when
    the workload checks the store's stats instead, and leaves those jobs out of the
    counts: counting a million rows is no part of the drain.
    """

    drop = ""
    server = 0.0
    future = 0
    #: (clock, process CPU) when the workload's drain was over (with ``future``).
    ended: tuple[float, float] | None = None

    async def open(self) -> None:
        await super().open()
        if self.drop and self._pool is not None:
            await self._pool.execute(self.drop.format(s=f'"{self.schema}"'))

    async def _server_cpu(self) -> float:
        conn = await _connect(self._dsn)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                self.application_name,
            )
        finally:
            await conn.close()
        return _proc_cpu([r[0] for r in rows])

    async def count_by_status(self, tags: Sequence[str]) -> tuple[dict[JobStatus, int], int]:
        if not self.future:
            return await super().count_by_status(tags)
        self.ended = (time.perf_counter(), time.process_time())
        self.server = await self._server_cpu()
        counts, retries = await super().count_by_status(tags)
        counts[JobStatus.INITIAL_PENDING] -= self.future
        return counts, retries

    async def close(self) -> None:
        if self._pool is not None and self.ended is None:
            self.server = await self._server_cpu()
        await super().close()
        conn = await _connect(self._dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await conn.close()


Body = Callable[..., Awaitable[Outcome]]
Result = tuple[float, float, float, float]  # jobs/s, client, server (µs/job), WAL bytes/job


async def _fill_future(dsn: str, schema: str, n: int) -> None:
    """``n`` jobs scheduled a day ahead in the store of ``schema``, through a backend
    of its own (closed before the measured one opens)."""
    later = datetime.now(UTC) + timedelta(days=1)
    async with PoolQueue(PostgresBackend(dsn, schema=schema), lease=None) as queue:
        for start in range(0, n, 10_000):
            await queue.enqueue_jobs(
                [
                    Job(id=f"later-{i}", job_type="later", scheduled_at=later)
                    for i in range(start, min(n, start + 10_000))
                ]
            )


async def _ours(dsn: str, body: Body, n: int, drop: str = "", future: int = 0) -> Result:
    schema = f"jpcpu_{uuid.uuid4().hex[:12]}"
    if future:
        await _fill_future(dsn, schema, future)
    backend = _Measured(dsn, schema=schema)
    backend.drop, backend.future = drop, future
    wal0, cpu0, t0 = await _wal(dsn), time.process_time(), time.perf_counter()
    out = await body(backend, n, 10, 600.0)
    end, end_cpu = backend.ended or (time.perf_counter(), time.process_time())
    seconds, cpu = end - t0, end_cpu - cpu0
    wal = await _wal(dsn) - wal0
    if out.problem:
        raise RuntimeError(out.problem)
    return n / seconds, cpu / n * 1e6, backend.server / n * 1e6, wal / n


def _mixed(priorities: bool, scheduled: bool) -> Body:
    """The workload of ``benchmarks.schedules`` (one stream of 10 slots takes jobs that
    are enqueued in batches of 1,000 while it runs, completing each batch in one call),
    with random priorities (-100 … 100), with 20% of the jobs scheduled up to 50 ms in
    the past (each waits, then a claim promotes it), both (its mixed workload), or
    neither (its plain one): which part of the mixed workload's cost is whose (issue
    #16). The jobs are built before the stream starts."""

    async def body(backend: PostgresBackend, n: int, slots: int, time_limit: float) -> Outcome:
        rng = random.Random(7)
        prefix, at = uuid.uuid4().hex[:6], datetime.now(UTC)
        later = set(rng.sample(range(n), n // 5)) if scheduled else set()
        jobs = [
            Job(
                id=f"{prefix}-{i}",
                job_type="bench",
                priority=rng.randint(-100, 100) if priorities else 0,
                scheduled_at=at - timedelta(milliseconds=rng.uniform(0, 50))
                if i in later
                else None,
            )
            for i in range(n)
        ]
        done: list[str] = []
        t0 = time.perf_counter()
        async with PoolQueue(backend, lease=None) as queue:

            async def consume() -> None:
                async with queue.stream_jobs("bench", max_assigned_jobs=slots) as stream:
                    async for batch in stream:
                        await queue.complete_jobs({j.id: b"" for j in batch})
                        done.extend(j.id for j in batch)
                        if len(done) >= n:
                            return

            task = asyncio.create_task(consume())
            for start in range(0, n, 1000):
                await queue.enqueue_jobs(jobs[start : start + 1000])
            await asyncio.wait_for(task, time_limit)
            stats = await queue.get_job_stats()
        problem = "" if stats.completed_jobs == n else f"{stats.completed_jobs} of {n} completed"
        return Outcome(n, time.perf_counter() - t0, problem=problem)

    return body


async def _untraced(dsn: str, n: int) -> Result:
    saved = _tracing.trace
    _tracing.trace = None  # type: ignore[assignment]
    try:
        return await _ours(dsn, drain_worker, n)
    finally:
        _tracing.trace = saved


async def _floor(dsn: str, n: int) -> Result:
    floor = RawAsyncpg(dsn)
    await floor.open()
    try:
        pid = floor._conn.get_server_pid()
        wal0, cpu0, server0 = await _wal(dsn), time.process_time(), _proc_cpu([pid])
        t0 = time.perf_counter()
        _, claimed, _ = await floor.drain(n, 10, drain_payload, drain_work)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        server = _proc_cpu([pid]) - server0
        wal = await _wal(dsn) - wal0
    finally:
        await floor.close()
    if len(set(claimed)) != n:
        raise RuntimeError(f"floor: claimed {len(set(claimed))} of {n}")
    return n / seconds, cpu / n * 1e6, server / n * 1e6, wal / n


def _revision() -> str:
    here = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        ["git", "-C", str(here), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    )
    return out.stdout.strip()[:100]


def main(argv: list[str] | None = None) -> None:
    revision = _revision()
    text, out = asyncio.run(_main(argv, revision))
    print(text)
    if out:
        Path(out).write_text(text)


async def _main(argv: list[str] | None, revision: str) -> tuple[str, str]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.postgres_cpu")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arms", default="hand,worker,floor")
    parser.add_argument("--future", type=int, default=1_000_000)
    parser.add_argument("--postgres-dsn", default=os.environ.get("JOBPOOL_BENCH_POSTGRES_DSN"))
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    dsn, n = args.postgres_dsn, args.jobs
    if not dsn:
        raise SystemExit("needs --postgres-dsn or JOBPOOL_BENCH_POSTGRES_DSN")
    every: dict[str, Callable[[], Awaitable[Result]]] = {
        "hand": lambda: _ours(dsn, drain_stream, n),
        "worker": lambda: _ours(dsn, drain_worker, n),
        "floor": lambda: _floor(dsn, n),
        "hand-noidle": lambda: _ours(dsn, drain_stream, n, _IDLE),
        "worker-notrace": lambda: _untraced(dsn, n),
        "hand-future": lambda: _ours(dsn, drain_stream, n, future=args.future),
        "plain": lambda: _ours(dsn, _mixed(False, False), n),
        "mixed": lambda: _ours(dsn, _mixed(True, True), n),
        "priorities": lambda: _ours(dsn, _mixed(True, False), n),
        "scheduled": lambda: _ours(dsn, _mixed(False, True), n),
    }
    arms = {name: every[name] for name in args.arms.split(",")}
    load_before = os.getloadavg()
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    results: dict[str, list[Result]] = {name: [] for name in arms}
    for run in arms.values():
        await run()  # warm-up
    for i in range(args.rounds):
        order = list(arms)[i % len(arms) :] + list(arms)[: i % len(arms)]
        for name in order:
            results[name].append(await arms[name]())
    lines = [
        "# CPU per job of the drain workload on PostgreSQL",
        "",
        f"Revision {revision or 'unknown'}.",
        "",
        f"Run {started} UTC, `python -m benchmarks.postgres_cpu "
        f"{' '.join(argv or [])}`, {n:,} jobs, {args.rounds} rounds (medians), load before "
        f"{' '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        *(
            [f"The hand-future arm's store held {args.future:,} jobs scheduled a day ahead."]
            if "hand-future" in arms
            else []
        ),
        "",
        "| arm | jobs/s | client CPU (µs/job) | server CPU (µs/job) | WAL (bytes/job) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        med = [statistics.median(r[i] for r in runs) for i in range(4)]
        lines.append(f"| {name} | {med[0]:,.0f} | {med[1]:.1f} | {med[2]:.1f} | {med[3]:,.0f} |")
    return "\n".join(lines) + "\n", args.out


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
