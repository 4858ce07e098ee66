"""A processor's exception is visible (WARNING with its traceback) and stays the job's
error through a Worker's shutdown, on every backend (#19 item 3)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from jobpool_async import Config, Job, JobStatus, PoolQueue, Worker

DEADLINE = 10.0


async def wait_for_retries(queue: PoolQueue, job_id: str, count: int) -> None:
    async with asyncio.timeout(DEADLINE):
        while (await queue.get_job(job_id)).retry_count < count:  # noqa: ASYNC110 - a deadline
            await asyncio.sleep(0.001)


async def test_a_failing_processor_is_logged_and_its_error_kept(
    queue: PoolQueue, caplog: pytest.LogCaptureFixture
) -> None:
    async def divide(job: Job) -> bytes:
        return bytes([1 // 0])

    await queue.enqueue_job(Job(id="f", job_type="divide"))
    with caplog.at_level(logging.WARNING, logger="jobpool_async"):
        async with Worker(queue, divide, assignee_id="w", config=Config(concurrency=1)):
            await wait_for_retries(queue, "f", 3)
    job = await queue.get_job("f")
    assert job.status is JobStatus.FAILED_RETRY
    assert job.error_message == "integer division or modulo by zero"
    failures = [r for r in caplog.records if r.name == "jobpool_async.worker" and r.exc_info]
    assert len(failures) >= 3
    record = failures[0]
    assert record.levelno == logging.WARNING
    assert "job 'f' (divide) failed" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError
    assert "in divide" in caplog.text and "Traceback" in caplog.text
