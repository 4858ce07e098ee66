"""Leases across real processes: workers SIGKILLed at random, nobody calls a recovery.

Three Worker processes (``_lease_worker.py``, default assignee ids, a 2 s lease)
work through the jobs of one SQLite file or PostgreSQL schema. Every second a
killer SIGKILLs a random worker, counts the jobs it held (``RUNNING``/
``CANCELLING`` with its assignee, read right after its death) and starts a new
one. Afterwards:

* every job is ``COMPLETED``; none is ``RUNNING`` or ``UNKNOWN_RETRY``; no
  ``mark_worker_unresponsive``/``reset_running_jobs`` was ever called: the
  killed workers' jobs came back through their leases alone;
* every job ran at least once, and the extra runs (ledger lines beyond one per
  job) are at most the jobs the killed workers held.

Size: ``JOBPOOL_LEASE_KILL_JOBS`` (default 1,500 for CI; the issue's size is 20,000).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
from collections import Counter
from pathlib import Path

import pytest

from jobpool_async import Job, PoolQueue

from ..backends import backend_factory, drop_postgres_schema, new_schema_name, postgres_dsn

WORKER = Path(__file__).with_name("_lease_worker.py")
JOBS = int(os.environ.get("JOBPOOL_LEASE_KILL_JOBS", "1500"))
PROCESSES = 3
LEASE = 2.0
KILL_EVERY = 1.0


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class Fleet:
    """The worker processes, their ledgers, and what the killed ones held."""

    def __init__(self, url: str, schema: str | None, tmp: Path, backend_name: str) -> None:
        self.url, self.schema, self.tmp, self.backend_name = url, schema, tmp, backend_name
        self.live: list[tuple[asyncio.subprocess.Process, Path]] = []
        self.ledgers: list[Path] = []
        self.killed = 0
        self.held_by_killed = 0

    async def start(self) -> None:
        ledger = self.tmp / f"ledger{len(self.ledgers)}.log"
        self.ledgers.append(ledger)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            self.url,
            self.schema or "-",
            str(ledger),
            str(LEASE),
            stderr=asyncio.subprocess.PIPE,
        )
        self.live.append((proc, ledger))

    async def assignee(self, proc: asyncio.subprocess.Process, ledger: Path) -> str:
        async with asyncio.timeout(30):
            while True:
                for line in _lines(ledger):
                    if line.startswith("A "):
                        return line[2:]
                if proc.returncode is not None:
                    err = (await proc.stderr.read()).decode() if proc.stderr else ""
                    raise AssertionError(f"worker exited early: {err}")
                await asyncio.sleep(0.02)

    async def kill_one(self, rng: random.Random) -> None:
        proc, ledger = self.live.pop(rng.randrange(len(self.live)))
        assignee = await self.assignee(proc, ledger)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        self.killed += 1
        self.held_by_killed += await self.held(assignee)

    async def held(self, assignee: str) -> int:
        """Jobs the dead worker held: RUNNING/CANCELLING with its assignee."""
        sql_where = "assignee_id = $1 AND status IN ('running', 'cancelling')"
        if self.backend_name == "sqlite":
            conn = sqlite3.connect(self.tmp / "jobs.db", timeout=30)
            try:
                where = sql_where.replace("$1", "?")
                return int(
                    conn.execute(
                        f"SELECT count(*) FROM jobs WHERE {where}", (assignee,)
                    ).fetchone()[0]
                )
            finally:
                conn.close()
        import asyncpg

        conn2 = await asyncpg.connect(postgres_dsn())
        try:
            table = f'"{self.schema}".jobs'
            return int(
                await conn2.fetchval(f"SELECT count(*) FROM {table} WHERE {sql_where}", assignee)
            )
        finally:
            await conn2.close()

    async def stop_all(self) -> None:
        for proc, _ in self.live:
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
            await proc.wait()
        self.live.clear()

    def runs(self) -> Counter[str]:
        return Counter(
            line for ledger in self.ledgers for line in _lines(ledger) if not line.startswith("A ")
        )


@pytest.mark.timeout(max(180, JOBS // 50))
@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
async def test_killed_workers_jobs_come_back_through_leases(
    backend_name: str, tmp_path: Path
) -> None:
    rng = random.Random(int(os.environ.get("JOBPOOL_LEASE_KILL_SEED", "17")))
    schema = new_schema_name() if backend_name == "postgres" else None
    url = postgres_dsn() if backend_name == "postgres" else f"sqlite:///{tmp_path / 'jobs.db'}"
    factory = backend_factory(backend_name, tmp_path, schema)
    fleet = Fleet(url, schema, tmp_path, backend_name)
    ids = [f"job-{i:06}" for i in range(JOBS)]
    try:
        async with PoolQueue(factory(), lease=None) as queue:
            for start in range(0, JOBS, 1000):
                await queue.enqueue_jobs(
                    [Job(id=i, job_type="t") for i in ids[start : start + 1000]]
                )
            for _ in range(PROCESSES):
                await fleet.start()
            async with asyncio.timeout(max(150, JOBS // 60)):
                while (await queue.get_job_stats()).completed_jobs < JOBS:
                    await asyncio.sleep(KILL_EVERY)
                    if (await queue.get_job_stats()).completed_jobs < JOBS:
                        await fleet.kill_one(rng)
                        await fleet.start()
            await fleet.stop_all()
            stats = await queue.get_job_stats()
            assert stats.completed_jobs == JOBS
            assert stats.running_jobs == 0 and stats.failed_jobs == 0
            assert stats.total_jobs == JOBS
        runs = fleet.runs()
        assert set(runs) == set(ids)
        extra = sum(n - 1 for n in runs.values())
        twice = sum(1 for n in runs.values() if n > 1)
        print(
            f"\n{backend_name}: {JOBS} jobs, {fleet.killed} workers killed holding "
            f"{fleet.held_by_killed} jobs; {twice} jobs ran more than once ({extra} extra runs)"
        )
        assert fleet.killed >= 1
        assert twice <= extra <= fleet.held_by_killed
    finally:
        await fleet.stop_all()
        if schema is not None:
            await drop_postgres_schema(schema)
