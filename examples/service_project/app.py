"""A FastAPI service whose lifespan builds its own queue and Worker (see README.md here).

The endpoints get the queue through the ``get_queue`` dependency, never from a
global, so tests can hand them another queue with ``app.dependency_overrides``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

from jobpool_async import Job, JobNotFoundError, PoolQueue, Worker, open_backend


async def shout(job: Job) -> bytes:
    """The service's job: upper-case a text."""
    text = job.job_definition.decode()
    if not text:
        raise ValueError("nothing to shout")
    return text.upper().encode()


def make_worker(queue: PoolQueue) -> Worker:
    """The Worker the service runs (tests run the same one on their own queue)."""
    return Worker(queue, shout, assignee_id=f"shouter-{uuid.uuid4().hex[:8]}")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    url = os.environ.get("JOBPOOL_URL", "sqlite:///shouter.db")
    async with PoolQueue(open_backend(url)) as queue, make_worker(queue):
        app.state.queue = queue
        yield


app = FastAPI(lifespan=lifespan)


def get_queue(request: Request) -> PoolQueue:
    """The queue the lifespan built; tests override this dependency."""
    queue: PoolQueue = request.app.state.queue
    return queue


Queue = Annotated[PoolQueue, Depends(get_queue)]


class ShoutIn(BaseModel):
    text: str


@app.post("/shouts", status_code=201)
async def create_shout(body: ShoutIn, queue: Queue) -> dict[str, str]:
    job_id = await queue.enqueue_job(
        Job(id=uuid.uuid4().hex, job_type="shout", job_definition=body.text.encode())
    )
    return {"id": job_id}


@app.get("/shouts/{job_id}")
async def read_shout(job_id: str, queue: Queue) -> dict[str, Any]:
    try:
        job = await queue.get_job(job_id)
    except JobNotFoundError:
        raise HTTPException(404, f"no shout {job_id!r}") from None
    return {
        "status": job.status.value,
        "result": job.result.decode() if job.result is not None else None,
        "error": job.error_message,
    }


@app.delete("/shouts/{job_id}", status_code=204)
async def cancel_shout(job_id: str, queue: Queue) -> None:
    result = await queue.cancel_jobs(job_ids=[job_id])
    if result.missing:
        raise HTTPException(404, f"no shout {job_id!r}")
    if result.unknown:
        raise HTTPException(409, f"shout {job_id!r} already finished")
