"""The basics on an embedded LevelDB directory: enqueue, stream, complete, fail, cancel, stats.

Run it: ``python examples/basic_leveldb.py`` (it uses a temporary directory).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from jobpool_async import Job, JobStatus, LevelDBBackend, PoolQueue


async def main(path: Path) -> None:
    async with PoolQueue(LevelDBBackend(path)) as queue:
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

    # The directory keeps everything: reopen it and read a job back.
    async with PoolQueue(LevelDBBackend(path)) as queue:
        job = await queue.get_job("resize-0")
        print(f"after reopening: {job.id} is {job.status.name}, result {job.result!r}")
    print("basic_leveldb: OK")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(Path(tmp) / "jobs.ldb"))
