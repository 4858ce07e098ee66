"""A Worker process for the lease kill test: runs until it is killed.

Usage: ``python _lease_worker.py URL SCHEMA LEDGER LEASE``  (SCHEMA is ``-`` except
for PostgreSQL). The Worker takes its default assignee id, which it writes to
LEDGER as ``A <assignee>`` once it runs. Each processor run appends ``<job id>``
to LEDGER (one ``write`` on an ``O_APPEND`` descriptor: it survives a SIGKILL)
before it works 10-40 ms and completes the job.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from typing import Any

from jobpool_async import Config, Job, PoolQueue, Worker, open_backend


async def main(url: str, schema: str, ledger: str, lease: str) -> None:
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    async def processor(job: Job) -> bytes:
        os.write(fd, f"{job.id}\n".encode())
        await asyncio.sleep(random.uniform(0.01, 0.04))
        return b"ok"

    options: dict[str, Any] = {} if schema == "-" else {"schema": schema}
    queue = PoolQueue(open_backend(url, **options), lease=float(lease), poll_interval=0.2)
    async with queue, Worker(queue, processor, config=Config(concurrency=4)) as worker:
        os.write(fd, f"A {worker.assignee_id}\n".encode())
        await asyncio.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
