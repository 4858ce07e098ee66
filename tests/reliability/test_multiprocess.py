"""Across processes (SQLite, PostgreSQL): no job is ever handed to two consumers.

Three consumer processes (``_share_worker.py``) stream from one store while this
process enqueues jobs in small batches. Each job must be handed out exactly once,
and completed by the process it was handed to.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path

import pytest

from jobpool_async import Job, JobStatus, PoolQueue

from ..backends import backend_factory, drop_postgres_schema, new_schema_name, postgres_dsn
from .conftest import scaled

WORKER = Path(__file__).with_name("_share_worker.py")
PROCESSES = 3


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


async def _ready(procs: list[asyncio.subprocess.Process], logs: list[Path]) -> None:
    async with asyncio.timeout(30):
        while not all("R" in _lines(log) for log in logs):
            for proc in procs:
                if proc.returncode is not None:
                    err = (await proc.stderr.read()).decode() if proc.stderr else ""
                    raise AssertionError(f"consumer process exited early: {err}")
            await asyncio.sleep(0.02)


@pytest.mark.timeout(scaled(120, 1800))
@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
async def test_each_job_handed_out_once_across_processes(backend_name: str, tmp_path: Path) -> None:
    schema = new_schema_name() if backend_name == "postgres" else None
    if backend_name == "postgres":
        url = postgres_dsn()
    else:
        url = f"sqlite:///{(tmp_path / 'jobs.db').resolve()}"
    factory = backend_factory(backend_name, tmp_path, schema)
    total = scaled(240, 3000)
    procs: list[asyncio.subprocess.Process] = []
    try:
        async with PoolQueue(factory()) as queue:  # creates the store
            logs = [tmp_path / f"p{n}.log" for n in range(PROCESSES)]
            for n, log in enumerate(logs):
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        str(WORKER),
                        url,
                        schema or "-",
                        str(log),
                        f"p{n}",
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.PIPE,
                    )
                )
            await _ready(procs, logs)
            ids = [f"job-{n}" for n in range(total)]
            for start in range(0, total, 8):
                await queue.enqueue_jobs([Job(i, "t") for i in ids[start : start + 8]])
                async with asyncio.timeout(30):  # the next 8 once the consumers take these
                    while (await queue.get_job_stats()).pending_jobs > 16:  # noqa: ASYNC110
                        await asyncio.sleep(0.005)
            async with asyncio.timeout(120):
                for proc in procs:
                    await proc.wait()
            for proc in procs:
                err = (await proc.stderr.read()).decode() if proc.stderr else ""
                assert proc.returncode == 0, f"consumer failed: {err}"

            handed: dict[str, list[str]] = {}
            for n, log in enumerate(logs):
                for line in _lines(log):
                    if line.startswith("D "):
                        handed.setdefault(line[2:], []).append(f"p{n}")
            twice = {i: who for i, who in handed.items() if len(who) > 1}
            assert twice == {}, f"jobs handed out more than once: {dict(list(twice.items())[:5])}"
            assert sorted(handed) == sorted(ids), "every job was handed out"
            jobs = await queue.get_jobs(ids)
            for job in jobs:
                assert job.status is JobStatus.COMPLETED
                assert job.result == b"by:" + handed[job.id][0].encode()
                assert job.assignee_id == handed[job.id][0]
            busy = Counter(who[0] for who in handed.values())
            assert len(busy) >= 2, f"only one process took jobs ({busy}): no concurrency was tested"
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if schema is not None:
            await drop_postgres_schema(schema)
