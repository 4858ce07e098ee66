"""A worker process for the crash tests: works on a store until it is SIGKILLed.

Usage: ``python _crash_worker.py BACKEND PATH LOG PREFIX SEED``

It enqueues jobs, streams them, completes, fails and cancels them, and appends to
LOG (one ``os.write`` on an ``O_APPEND`` descriptor per line, so a line is in the
kernel before the next step) what the library has *acknowledged*:

* ``R`` once the store is open;
* ``E <id>`` after ``enqueue_jobs`` returned for that job;
* ``C <id>`` after ``complete_job`` returned (its result is ``b"r:" + id``).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys

from jobpool_async import InvalidTransitionError, Job, JobStatus, PoolQueue, open_backend


async def main(backend: str, path: str, log: str, prefix: str, seed: int) -> None:
    rng = random.Random(seed)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def note(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    url = f"{backend}:///{path}"  # path is absolute: four slashes, as SPEC §6 says
    async with PoolQueue(open_backend(url)) as queue:
        note("R")
        n = 0
        async with queue.stream_jobs(prefix, max_assigned_jobs=4) as stream:
            while True:
                batch = [
                    Job(f"{prefix}-{n + k}", "t", os.urandom(rng.randint(0, 3000)))
                    for k in range(rng.randint(1, 5))
                ]
                n += len(batch)
                await queue.enqueue_jobs(batch)
                for job in batch:
                    note(f"E {job.id}")
                if rng.random() < 0.2:
                    await queue.cancel_jobs(job_ids=[rng.choice(batch).id])
                jobs = await stream.__anext__()
                for job in jobs:
                    try:
                        if rng.random() < 0.2:
                            await queue.fail_job(job.id, "transient")
                        else:
                            await queue.complete_job(job.id, b"r:" + job.id.encode())
                            note(f"C {job.id}")
                    except InvalidTransitionError as exc:
                        if exc.current is not JobStatus.CANCELLING:
                            raise
                        await queue.acknowledge_cancellation({job.id: True})


if __name__ == "__main__":
    backend_name, store, log_path, name, seed_text = sys.argv[1:6]
    asyncio.run(main(backend_name, os.path.abspath(store), log_path, name, int(seed_text)))
