"""A small Starlette service: its lifespan runs a Worker; endpoints enqueue jobs and report them.

Endpoints:

* ``POST /jobs`` with JSON ``{"text": "...", "tags": [...]}`` → ``201 {"id": ...}``
* ``GET /jobs/{id}`` → the job's status, result, error and retries (``404`` if unknown)
* ``POST /jobs/{id}/cancel`` → ``{"cancelled": true|false}``
* ``GET /stats`` → job counts per status

The worker upper-cases the text; a text containing "flaky" fails on its first
attempt and succeeds on the retry.

Serve it with any ASGI server, e.g. ``uvicorn examples.asgi_service:app``
(``JOBPOOL_URL`` picks the store, default ``sqlite:///jobpool-service.db``);
``pip install 'jobpool_async[examples]'`` installs uvicorn.
``python examples/asgi_service.py`` runs a short in-process session against it
(through httpx's ASGI transport, on a temporary SQLite file) and exits.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from jobpool_async import (
    Config,
    Job,
    JobNotFoundError,
    JobStatus,
    PoolQueue,
    Worker,
    open_backend,
)


async def process(job: Job) -> bytes:
    text = job.job_definition.decode()
    if "flaky" in text and job.retry_count == 0:
        raise RuntimeError("flaky upstream, try again")
    await asyncio.sleep(0.001)  # stands for real I/O
    return text.upper().encode()


def _queue(request: Request) -> PoolQueue:
    queue: PoolQueue = request.app.state.queue
    return queue


def _job_json(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status.value,
        "result": job.result.decode() if job.result is not None else None,
        "error_message": job.error_message,
        "retry_count": job.retry_count,
        "tags": job.tags,
    }


async def create_job(request: Request) -> JSONResponse:
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "the body must be JSON"}, status_code=400)
    if not isinstance(body, dict) or not isinstance(body.get("text"), str):
        return JSONResponse({"error": 'expected {"text": "...", "tags": [...]}'}, status_code=400)
    tags = body.get("tags", [])
    job = Job(
        id=uuid.uuid4().hex,
        job_type="uppercase",
        job_definition=body["text"].encode(),
        tags=tags if isinstance(tags, list) else [],
    )
    try:
        job_id = await _queue(request).enqueue_job(job)
    except (TypeError, ValueError) as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    return JSONResponse({"id": job_id}, status_code=201)


async def get_job(request: Request) -> JSONResponse:
    try:
        job = await _queue(request).get_job(request.path_params["job_id"])
    except JobNotFoundError:
        return JSONResponse({"error": "no such job"}, status_code=404)
    return JSONResponse(_job_json(job))


async def cancel_job(request: Request) -> JSONResponse:
    result = await _queue(request).cancel_jobs(job_ids=[request.path_params["job_id"]])
    return JSONResponse({"cancelled": bool(result.cancelled)})


async def stats(request: Request) -> JSONResponse:
    s = await _queue(request).get_job_stats()
    return JSONResponse({status.value: count for status, count in s.by_status.items()})


def create_app(url: str | None = None, *, concurrency: int = 8) -> Starlette:
    """The service on the store at ``url`` (default: env ``JOBPOOL_URL`` or a SQLite file)."""
    store = url or os.environ.get("JOBPOOL_URL", "sqlite:///jobpool-service.db")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with PoolQueue(open_backend(store)) as queue:
            worker = Worker(
                queue,
                process,
                assignee_id=f"service-{os.getpid()}",
                config=Config(concurrency=concurrency),
            )
            async with worker:
                app.state.queue = queue
                yield
            # leaving: the worker stops first (finishing or failing its jobs), then the queue

    return Starlette(
        routes=[
            Route("/jobs", create_job, methods=["POST"]),
            Route("/jobs/{job_id}", get_job, methods=["GET"]),
            Route("/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
            Route("/stats", stats, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


app = create_app()


async def _wait_final(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            body: dict[str, Any] = (await client.get(f"/jobs/{job_id}")).json()
            if JobStatus(body["status"]).is_final:
                return body
            await asyncio.sleep(0.01)


async def demo(url: str) -> None:
    """Drive the app in-process: httpx's ASGITransport does not run the lifespan, so we do."""
    service = create_app(url)
    async with (
        service.router.lifespan_context(service),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=service), base_url="http://service"
        ) as client,
    ):
        ids = []
        for text in ["hello", "flaky world", "jobpool"]:
            response = await client.post("/jobs", json={"text": text, "tags": ["demo"]})
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        for job_id in ids:
            body = await _wait_final(client, job_id)
            print(f"{body['result']!r}: {body['status']} after {body['retry_count']} retries")
        missing = await client.get("/jobs/nope")
        print(f"unknown job -> HTTP {missing.status_code}")
        bad = await client.post("/jobs", json={"tags": ["no text"]})
        print(f"bad request -> HTTP {bad.status_code}")
        counts = (await client.get("/stats")).json()
        print(f"stats: completed={counts['completed']}")
    print("asgi_service: OK")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(demo(f"sqlite:///{tmp}/service.db"))
