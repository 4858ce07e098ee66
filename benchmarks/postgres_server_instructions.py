"""The PostgreSQL server's instructions per drained job, counted by callgrind.

``python -m benchmarks.postgres_server_instructions [--arms hand,worker] [--jobs 1500,3000]
[--after-open SQL] [--out FILE]``

``benchmarks.postgres_cpu`` reads the server's CPU from ``/proc``, which moves with the
machine's load (73-118 µs per job in consecutive rounds of one run at load 5-8). This
counts instead: it runs a PostgreSQL cluster of its own (``initdb`` once into
``--datadir``; the server binaries of ``--bindir``) under ``valgrind --tool=callgrind
--trace-children=yes``, so every backend the postmaster forks writes its instruction
count when it exits, runs each arm of the drain workload (``benchmarks.workloads``:
the hand loop, the ``Worker``; ``lease=None``, ``self_vacuum=False``) against it at
two sizes, and sums the counts of the arm's connections (found by their
``application_name``). Per job = (count at the larger size - count at the smaller) /
(difference in jobs): the enqueue's and the drain's work per job, without the
connections' start and the schema's creation. Repeated runs of one commit agree
within 0.2% (benchmarks/results/pg-session10.md); in session 14, at 1,500/3,000 jobs,
within about 3,000 a job (0.8%: benchmarks/results/pg-session14.md).

``--after-open`` runs a statement on the store right after it opens (``{s}``: its
quoted schema, ``{t}``: its jobs table), to price a schema variant, e.g.
``--after-open 'DROP INDEX {s}.jobs_idle_type'``.

Run as root (the server then runs as the ``postgres`` user, through ``runuser``) or as
a user who may run the server binaries. The server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobpool_async.backends.postgres import PostgresBackend

from .workloads import drain_stream, drain_worker

BODIES = {"hand": drain_stream, "worker": drain_worker}
SLOTS = 10
TIME_LIMIT = 3000.0  # a backend under callgrind runs some 50 times slower


def _as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class Server:
    """A PostgreSQL cluster in ``datadir`` on ``port``, run under callgrind."""

    def __init__(self, bindir: Path, datadir: Path, port: int) -> None:
        self.bindir, self.datadir, self.port = bindir, datadir, port
        self.out = datadir.parent / "callgrind"
        self.dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.datadir.parent, "postgres")
        if not (self.datadir / "PG_VERSION").exists():
            subprocess.run(
                _as_server_user(
                    [str(self.bindir / "initdb"), "-D", str(self.datadir), "-A", "trust",
                     "-U", "postgres", "--locale=C.UTF-8"]
                ),
                check=True, capture_output=True,
            )  # fmt: skip
        if self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.out, "postgres")
        settings = {
            "listen_addresses": "127.0.0.1", "unix_socket_directories": str(self.datadir.parent),
            "autovacuum": "off", "shared_buffers": "128MB", "max_wal_size": "1GB",
        }  # fmt: skip
        cmd = [
            "valgrind", "--tool=callgrind", "--trace-children=yes",
            f"--callgrind-out-file={self.out}/cg.%p",
            str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port),
        ]  # fmt: skip
        for name, value in settings.items():
            cmd += ["-c", f"{name}={value}"]
        log = (self.datadir.parent / "server.log").open("wb")
        self._process = subprocess.Popen(_as_server_user(cmd), stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while subprocess.run(
            [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
            capture_output=True,
        ).returncode:
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise RuntimeError(f"the server did not start: see {log.name}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self._process is not None:
            subprocess.run(
                _as_server_user(
                    [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "stop", "-m", "fast"]
                ),
                capture_output=True,
            )
            self._process.wait(120)

    async def instructions(self, pids: set[int]) -> int:
        """The instructions the backends ``pids`` ran (each writes its count at exit)."""
        total = 0
        for pid in sorted(pids):
            path = self.out / f"cg.{pid}"
            deadline = time.monotonic() + 120
            while True:
                text = path.read_text() if path.exists() else ""
                found = re.search(r"^totals: (\d+)", text, re.M)
                if found:
                    total += int(found.group(1))
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no instruction count from backend {pid}")
                await asyncio.sleep(0.2)
        return total


class _Counted(PostgresBackend):
    """A backend that notes its connections' server pids before it closes."""

    after_open = ""
    pids: set[int]

    async def open(self) -> None:
        await super().open()
        self.pids = set()
        if self.after_open and self._pool is not None:
            sql = self.after_open.format(s=f'"{self.schema}"', t=f'"{self.schema}".jobs')
            await self._pool.execute(sql)

    async def close(self) -> None:
        if self._pool is not None:
            rows = await self._pool.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                self.application_name,
            )
            self.pids = {r[0] for r in rows}
        await super().close()


async def _count(server: Server, arm: str, n: int, after_open: str) -> int:
    """The server's instructions for one run of ``arm`` with ``n`` jobs."""
    import asyncpg

    schema = f"jpcg_{uuid.uuid4().hex[:8]}"
    backend = _Counted(server.dsn, schema=schema, self_vacuum=False, command_timeout=TIME_LIMIT)
    backend.after_open = after_open
    out = await BODIES[arm](backend, n, SLOTS, TIME_LIMIT, lease=None)
    if out.problem:
        raise RuntimeError(out.problem)
    conn: Any = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await conn.close()
    return await server.instructions(backend.pids)


async def measure(
    server: Server, arms: list[str], sizes: tuple[int, int], after_open: str
) -> dict[str, float]:
    """Instructions per job of each arm."""
    small, large = sizes
    per_job = {}
    for arm in arms:
        counts = [await _count(server, arm, n, after_open) for n in (small, large)]
        per_job[arm] = (counts[1] - counts[0]) / (large - small)
    return per_job


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.postgres_server_instructions")
    parser.add_argument("--arms", default="hand,worker")
    # Both sizes at or above the backend's COPY_INSERT (1,000): an enqueue below it is an
    # INSERT, so sizes on both sides of it would count the COPY's saving on 1,500 jobs as
    # a saving per job (500,1500 showed -36k a job; 1500,3000 -16k: pg-session14.md).
    parser.add_argument("--jobs", default="1500,3000", help="the two sizes, smaller first")
    parser.add_argument("--after-open", default="")
    parser.add_argument("--bindir", type=Path, default=Path("/usr/lib/postgresql/15/bin"))
    parser.add_argument("--datadir", type=Path, default=Path("/tmp/jobpool-pgcg/data"))
    parser.add_argument("--port", type=int, default=5499)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(BODIES)
    if unknown:
        parser.error(f"unknown arms: {sorted(unknown)}")
    small, large = (int(x) for x in args.jobs.split(","))
    if not 0 < small < large:
        parser.error("--jobs: two sizes, the smaller first")
    server = Server(args.bindir, args.datadir, args.port)
    server.start()
    try:
        per_job = asyncio.run(measure(server, arms, (small, large), args.after_open))
    finally:
        server.stop()
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    lines = [
        "# PostgreSQL server instructions per drained job (callgrind)",
        "",
        f"Run {started} UTC, sizes {small:,} and {large:,} jobs"
        + (f", after open: `{args.after_open}`" if args.after_open else "")
        + ".",
        "",
        "| arm | server instructions per job |",
        "|---|---:|",
        *(f"| {arm} | {value:,.0f} |" for arm, value in per_job.items()),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
