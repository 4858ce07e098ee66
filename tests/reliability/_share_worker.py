"""A consumer process for the multi-process test: takes jobs until none is left.

Usage: ``python _share_worker.py URL SCHEMA LOG NAME``  (SCHEMA is ``-`` except for
PostgreSQL). For each job it is handed it appends ``D <id>`` to LOG, then completes
the job with the result ``b"by:" + NAME``. It stops when a claim waits 2 s in vain.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from jobpool_async import PoolQueue, open_backend


async def main(url: str, schema: str, log: str, name: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    options: dict[str, Any] = {} if schema == "-" else {"schema": schema}
    async with PoolQueue(open_backend(url, **options), poll_interval=0.05) as queue:
        os.write(fd, b"R\n")
        async with queue.stream_jobs(name, max_assigned_jobs=3) as stream:
            while True:
                try:
                    batch = await asyncio.wait_for(stream.__anext__(), 2)
                except TimeoutError:
                    return
                os.write(fd, "".join(f"D {job.id}\n" for job in batch).encode())
                await queue.complete_jobs({job.id: b"by:" + name.encode() for job in batch})


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
