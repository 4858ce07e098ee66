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

Variants, to price a piece: ``hand-noidle`` drops the three ``list_jobs`` indexes
(``jobs_idle_*``) from the store before the run, ``worker-notrace`` runs the Worker
with the OpenTelemetry wrapper turned off.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobpool_async import _tracing
from jobpool_async.backends.postgres import PostgresBackend

from ._common import drain_payload, drain_work
from .floors import RawAsyncpg
from .workloads import Outcome, drain_stream, drain_worker

_TICK = os.sysconf("SC_CLK_TCK")
_IDLE = "DROP INDEX {s}.jobs_idle_list, {s}.jobs_idle_status, {s}.jobs_idle_type"


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
    """A backend that reads its server processes' CPU just before it closes."""

    drop = ""
    server = 0.0

    async def open(self) -> None:
        await super().open()
        if self.drop and self._pool is not None:
            await self._pool.execute(self.drop.format(s=f'"{self.schema}"'))

    async def close(self) -> None:
        if self._pool is not None:
            conn = await _connect(self._dsn)
            try:
                rows = await conn.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                    self.application_name,
                )
            finally:
                await conn.close()
            self.server = _proc_cpu([r[0] for r in rows])
        await super().close()
        conn = await _connect(self._dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await conn.close()


Body = Callable[..., Awaitable[Outcome]]
Result = tuple[float, float, float, float]  # jobs/s, client, server (µs/job), WAL bytes/job


async def _ours(dsn: str, body: Body, n: int, drop: str = "") -> Result:
    backend = _Measured(dsn, schema=f"jpcpu_{uuid.uuid4().hex[:12]}")
    backend.drop = drop
    wal0, cpu0, t0 = await _wal(dsn), time.process_time(), time.perf_counter()
    out = await body(backend, n, 10, 600.0)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    wal = await _wal(dsn) - wal0
    if out.problem:
        raise RuntimeError(out.problem)
    return n / seconds, cpu / n * 1e6, backend.server / n * 1e6, wal / n


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
