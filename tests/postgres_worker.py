"""A separate OS process working on a PostgreSQL store, for ``tests/test_postgres.py``.

Run as ``python tests/postgres_worker.py MODE DSN SCHEMA ASSIGNEE ...``. Every mode
uses ``poll_interval=30``, so anything it notices within the test's deadlines was
pushed by ``LISTEN/NOTIFY``:

* ``stream ... TOTAL``: stream jobs (10 slots) and complete them in batches until
  the store holds ``TOTAL`` completed jobs; prints ``ready``, then ``got ID`` for each
  job, and at the end the delivered ids as one JSON list.
* ``worker ...``: a :class:`~jobpool_async.Worker` whose processor prints
  ``started ID`` and waits until cancelled (printing ``cancelled ID``); stops when
  stdin closes.
* ``hold ... SLOTS``: take one batch of up to ``SLOTS`` jobs, print ``holding [ids]``
  and wait to be killed.
"""

from __future__ import annotations

import asyncio
import json
import sys

from jobpool_async import Config, Job, PoolQueue, Worker
from jobpool_async.backends.postgres import PostgresBackend

POLL = 30.0


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def make_queue(dsn: str, schema: str) -> PoolQueue:
    return PoolQueue(PostgresBackend(dsn, schema=schema, pool_max_size=4), poll_interval=POLL)


async def stream(dsn: str, schema: str, assignee: str, total: int) -> None:
    delivered: list[str] = []
    async with make_queue(dsn, schema) as queue:
        s = queue.stream_jobs(assignee, max_assigned_jobs=10)

        async def watch() -> None:
            # Test-side stop condition only: the stream itself never polls (POLL = 30 s).
            while (await queue.get_job_stats()).completed_jobs < total:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            await s.aclose()

        say("ready")
        watcher = asyncio.create_task(watch())
        async with s:
            async for batch in s:
                for job in batch:
                    say(f"got {job.id}")
                delivered.extend(job.id for job in batch)
                await queue.complete_jobs({job.id: assignee.encode() for job in batch})
        await watcher
    say(json.dumps(delivered))


async def worker(dsn: str, schema: str, assignee: str) -> None:
    async def processor(job: Job) -> bytes:
        say(f"started {job.id}")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            say(f"cancelled {job.id}")
            raise
        return b""

    config = Config(concurrency=4)
    async with (
        make_queue(dsn, schema) as queue,
        Worker(queue, processor, assignee_id=assignee, config=config),
    ):
        say("ready")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes stdin


async def hold(dsn: str, schema: str, assignee: str, slots: int) -> None:
    queue = make_queue(dsn, schema)
    await queue.open()
    s = queue.stream_jobs(assignee, max_assigned_jobs=slots)
    say("ready")
    batch = await s.__anext__()
    say("holding " + json.dumps(sorted(job.id for job in batch)))
    await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    mode, dsn, schema, assignee, *rest = argv
    if mode == "stream":
        asyncio.run(stream(dsn, schema, assignee, int(rest[0])))
    elif mode == "worker":
        asyncio.run(worker(dsn, schema, assignee))
    elif mode == "hold":
        asyncio.run(hold(dsn, schema, assignee, int(rest[0])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
