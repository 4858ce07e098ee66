"""A Worker: jobs run concurrently, flaky ones fail and are retried, one is cancelled.

Run it: ``python examples/worker.py`` (SQLite in a temporary directory).
"""

from __future__ import annotations

import asyncio
import logging
import random
import tempfile
from datetime import timedelta
from pathlib import Path

from jobpool_async import Config, Job, JobStatus, PoolQueue, RetryPolicy, SQLiteBackend, Worker

random.seed(7)
started_long_job = asyncio.Event()


async def process(job: Job) -> bytes:
    """Pretend to call a flaky service: roughly one call in three fails."""
    if job.job_type == "long":
        started_long_job.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            print(f"{job.id}: cancelled while running, cleaning up")
            raise
    await asyncio.sleep(random.uniform(0.001, 0.01))
    if job.retry_count < 3 and random.random() < 0.35:
        raise ConnectionError(f"service unavailable (attempt {job.retry_count + 1})")
    return f"processed {job.job_definition.decode()}".encode()


async def main(path: Path) -> None:
    async with PoolQueue(SQLiteBackend(path)) as queue:
        ids = await queue.enqueue_jobs(
            [
                Job(id=f"order-{n}", job_type="order", job_definition=str(n).encode())
                for n in range(20)
            ]
        )
        await queue.enqueue_job(Job(id="nightly-export", job_type="long"))

        # A failed job runs again after 50 ms, 100 ms, 200 ms ... (the default starts at 1 s).
        config = Config(concurrency=4, retry=RetryPolicy(base=timedelta(milliseconds=50)))
        async with Worker(queue, process, assignee_id="example", config=config):
            await started_long_job.wait()
            result = await queue.cancel_jobs(job_ids=["nightly-export"])
            print(f"cancel requested for {result.cancelled}")
            while True:  # a real service would keep running; the example stops when done
                stats = await queue.get_job_stats()
                if stats.completed_jobs + stats.stopped_jobs == len(ids) + 1:
                    break
                await asyncio.sleep(0.05)

        for job in await queue.get_jobs(ids):
            assert job.status is JobStatus.COMPLETED
            if job.retry_count:
                print(
                    f"{job.id}: completed after {job.retry_count} retries "
                    f"(last error: {job.error_message})"
                )
        export = await queue.get_job("nightly-export")
        print(f"nightly-export: {export.status.name}")
        assert export.status is JobStatus.STOPPED
        stats = await queue.get_job_stats()
        print(
            f"completed={stats.completed_jobs} stopped={stats.stopped_jobs} "
            f"retries={stats.total_retries}"
        )
    print("worker example: OK")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(Path(tmp) / "jobs.db"))
