"""A separate OS process working on a SQLite store, for the multi-process tests.

Run as ``python tests/sqlite_worker.py MODE PATH ...`` by ``tests/test_sqlite.py``:

* ``stream PATH ASSIGNEE TOTAL [--tags T ...] [--slots N]``: stream jobs, complete
  each with result ``ASSIGNEE``, until the store holds ``TOTAL`` completed jobs;
  prints ``ready`` once open, then at the end the delivered ids as one JSON list.
* ``hold PATH ASSIGNEE COUNT``: complete ``COUNT`` jobs one at a time, printing
  ``done ID`` after each commit, then take one more batch, print ``holding [ids]``
  and wait to be killed.
* ``enqueue PATH ID [--tags T ...]`` and ``complete PATH ID RESULT``: one call each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from jobpool_async import Job, PoolQueue
from jobpool_async.backends.sqlite import SQLiteBackend

POLL = 0.05


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def stream(path: str, assignee: str, total: int, tags: list[str], slots: int) -> None:
    delivered: list[str] = []
    async with PoolQueue(SQLiteBackend(path), poll_interval=POLL) as queue:
        s = queue.stream_jobs(assignee, tags=tags or None, max_assigned_jobs=slots)
        say("ready")

        async def watch() -> None:
            # The other processes' progress is only visible in the file: poll it.
            while (await queue.get_job_stats()).completed_jobs < total:  # noqa: ASYNC110
                await asyncio.sleep(POLL)
            await s.aclose()

        watcher = asyncio.create_task(watch())
        async with s:
            async for batch in s:
                delivered.extend(job.id for job in batch)
                await queue.complete_jobs({job.id: assignee.encode() for job in batch})
        await watcher
    say(json.dumps(delivered))


async def hold(path: str, assignee: str, count: int) -> None:
    queue = PoolQueue(SQLiteBackend(path), poll_interval=POLL)
    await queue.open()
    s = queue.stream_jobs(assignee, max_assigned_jobs=1)
    for k in range(count):
        (job,) = await s.__anext__()
        if k == count - 1:  # it takes no more: its last completion must claim nothing
            await s.aclose()
        await queue.complete_job(job.id, f"result of {job.id}".encode())
        say(f"done {job.id}")
    big = queue.stream_jobs(assignee, max_assigned_jobs=5)
    batch = await big.__anext__()
    say("holding " + json.dumps([job.id for job in batch]))
    await asyncio.Event().wait()  # until SIGKILL


async def enqueue(path: str, job_id: str, tags: list[str]) -> None:
    async with PoolQueue(SQLiteBackend(path)) as queue:
        await queue.enqueue_job(Job(id=job_id, job_type="cross-process", tags=tags))
    say("ok")


async def complete(path: str, job_id: str, result: str) -> None:
    async with PoolQueue(SQLiteBackend(path)) as queue:
        await queue.complete_job(job_id, result.encode())
    say("ok")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("stream")
    p.add_argument("path")
    p.add_argument("assignee")
    p.add_argument("total", type=int)
    p.add_argument("--tags", nargs="*", default=[])
    p.add_argument("--slots", type=int, default=4)
    p = sub.add_parser("hold")
    p.add_argument("path")
    p.add_argument("assignee")
    p.add_argument("count", type=int)
    p = sub.add_parser("enqueue")
    p.add_argument("path")
    p.add_argument("job_id")
    p.add_argument("--tags", nargs="*", default=[])
    p = sub.add_parser("complete")
    p.add_argument("path")
    p.add_argument("job_id")
    p.add_argument("result")
    args = parser.parse_args()
    if args.mode == "stream":
        asyncio.run(stream(args.path, args.assignee, args.total, args.tags, args.slots))
    elif args.mode == "hold":
        asyncio.run(hold(args.path, args.assignee, args.count))
    elif args.mode == "enqueue":
        asyncio.run(enqueue(args.path, args.job_id, args.tags))
    else:
        asyncio.run(complete(args.path, args.job_id, args.result))


if __name__ == "__main__":
    main()
