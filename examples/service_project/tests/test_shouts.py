"""The service's endpoints, against the plugin's queue (see conftest.py)."""

from __future__ import annotations

import httpx
import pytest

from jobpool_async import JobStatus, PoolQueue
from jobpool_async.pytest_plugin import WaitForStatus


@pytest.mark.asyncio
async def test_a_shout_is_processed(
    client: httpx.AsyncClient, jobpool_queue: PoolQueue, jobpool_wait_for_status: WaitForStatus
) -> None:
    created = await client.post("/shouts", json={"text": "hello"})
    assert created.status_code == 201
    job_id = created.json()["id"]
    await jobpool_wait_for_status(jobpool_queue, job_id, JobStatus.COMPLETED)
    body = (await client.get(f"/shouts/{job_id}")).json()
    assert body == {"status": "completed", "result": "HELLO", "error": ""}


@pytest.mark.asyncio
async def test_an_empty_shout_fails_and_says_why(
    client: httpx.AsyncClient, jobpool_queue: PoolQueue, jobpool_wait_for_status: WaitForStatus
) -> None:
    job_id = (await client.post("/shouts", json={"text": ""})).json()["id"]
    job = await jobpool_wait_for_status(jobpool_queue, job_id, JobStatus.FAILED_RETRY)
    assert job.error_message == "nothing to shout"


@pytest.mark.asyncio
async def test_cancel_says_404_or_409(
    client: httpx.AsyncClient, jobpool_queue: PoolQueue, jobpool_wait_for_status: WaitForStatus
) -> None:
    assert (await client.delete("/shouts/nope")).status_code == 404
    job_id = (await client.post("/shouts", json={"text": "done"})).json()["id"]
    await jobpool_wait_for_status(jobpool_queue, job_id, JobStatus.COMPLETED)
    assert (await client.delete(f"/shouts/{job_id}")).status_code == 409


@pytest.mark.asyncio
async def test_unknown_shout_is_404(client: httpx.AsyncClient) -> None:
    assert (await client.get("/shouts/nope")).status_code == 404
