"""The basics on an embedded store: enqueue, stream, complete, fail, cancel, stats.

Run it: ``python examples/basics.py`` for an SQLite file, ``python examples/basics.py
leveldb`` for a LevelDB directory (either in a temporary directory).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from jobpool_async import Backend, Job, JobStatus, LevelDBBackend, PoolQueue, SQLiteBackend

#: Store kind -> (backend on a path, file name of the store).
STORES: dict[str, tuple[Callable[[Path], Backend], str]] = {
    "sqlite": (SQLiteBackend, "jobs.db"),
    "leveldb": (LevelDBBackend, "jobs.ldb"),
}


async def main(kind: str, path: Path) -> None:
    make_backend = STORES[kind][0]
    async with PoolQueue(make_backend(path)) as queue:
        await queue.enqueue_jobs(
            [
                Job(
                    id=f"resize-{n}",
                    job_type="resize",
                    job_definition=f"img{n}.png".encode(),
                    tags=["images"],
                )
                for n in range(5)
            ]
        )
        await queue.enqueue_job(Job(id="report", job_type="report", tags=["reports"]))

        # A consumer takes up to 3 image jobs at a time.
        done = 0
        async with queue.stream_jobs("example-worker", tags=["images"], max_assigned_jobs=3) as s:
            async for batch in s:
                for job in batch:
                    if job.id == "resize-3" and job.retry_count == 0:
                        await queue.fail_job(job.id, "thumbnail service timed out")
                        print(f"{job.id}: failed once, will be retried")
                        continue
                    await queue.complete_job(job.id, b"ok:" + job.job_definition)
                    done += 1
                if done == 5:
                    break

        # The report job was never started: cancelling it makes it UNSCHEDULED.
        cancelled = await queue.cancel_jobs(job_ids=["report", "no-such-job"])
        print(f"cancelled {cancelled.cancelled}, unknown {cancelled.unknown}")

        retried = await queue.get_job("resize-3")
        assert retried.status is JobStatus.COMPLETED and retried.retry_count == 1
        print(
            f"resize-3: {retried.status.name} after {retried.retry_count} retry, "
            f"result {retried.result!r}"
        )

        stats = await queue.get_job_stats()
        print(
            f"completed={stats.completed_jobs} stopped={stats.stopped_jobs} "
            f"retries={stats.total_retries}"
        )
        assert stats.completed_jobs == 5 and stats.by_status[JobStatus.UNSCHEDULED] == 1

    # The store keeps everything: reopen it and read a job back.
    async with PoolQueue(make_backend(path)) as queue:
        job = await queue.get_job("resize-0")
        print(f"after reopening: {job.id} is {job.status.name}, result {job.result!r}")
    print(f"basics ({kind}): OK")


if __name__ == "__main__":
    store = sys.argv[1] if len(sys.argv) > 1 else "sqlite"
    if store not in STORES:
        sys.exit(f"usage: python examples/basics.py [{' | '.join(STORES)}]")
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(store, Path(tmp) / STORES[store][1]))
