"""A FastAPI service on PostgreSQL: an order and the job that ships it, in one transaction.

``POST /orders`` writes the order row and enqueues its ``ship`` job through the same
asyncpg connection, inside one transaction (``enqueue_jobs(..., connection=conn)``):
both exist, or neither. There is no order without its job (a crash between two
commits), and no job for an order that was rolled back. The Worker wakes when the
transaction commits (``NOTIFY`` is transactional), in this process or any other.

* ``POST /orders`` with JSON ``{"item": "..."}`` → ``201 {"id": ...}``. An item of
  ``"rollback"`` fails *after* the job was enqueued, inside the transaction: the
  answer is 422 and neither the order nor its job exists.
* ``GET /orders/{id}`` → the order's status (``placed``, then ``shipped``) and its job's.

Needs PostgreSQL and ``pip install 'jobpool_async[examples]'`` (FastAPI, uvicorn,
asyncpg, httpx). Serve it with ``DATABASE_URL=postgresql://... uvicorn
examples.fastapi_orders:app``, or run ``DATABASE_URL=... python examples/fastapi_orders.py``
for a short in-process session (on schemas of its own, dropped at the end).
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

from jobpool_async import Job, JobNotFoundError, PoolQueue, Worker, open_backend


class OrderIn(BaseModel):
    item: str


def create_app(dsn: str, schema: str = "shop") -> FastAPI:
    """The service on the PostgreSQL server at ``dsn``: the orders table in ``schema``,
    the queue in ``{schema}_jobs`` (a jobpool store keeps a schema of its own)."""
    orders = f'"{schema}".orders'

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=5)
        try:
            await pool.execute(
                f'CREATE SCHEMA IF NOT EXISTS "{schema}"; CREATE TABLE IF NOT EXISTS {orders} '
                "(id text PRIMARY KEY, item text NOT NULL, status text NOT NULL)"
            )

            async def ship(job: Job) -> bytes:
                await pool.execute(f"UPDATE {orders} SET status = 'shipped' WHERE id = $1", job.id)
                return b"shipped"

            async with (
                PoolQueue(open_backend(dsn, schema=f"{schema}_jobs")) as queue,
                Worker(queue, ship, assignee_id=f"shipper-{os.getpid()}"),
            ):
                app.state.pool, app.state.queue = pool, queue
                yield
        finally:
            await pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/orders", status_code=201)
    async def place_order(body: OrderIn, request: Request) -> dict[str, str]:
        pool: asyncpg.Pool = request.app.state.pool
        queue: PoolQueue = request.app.state.queue
        order_id = uuid.uuid4().hex
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    f"INSERT INTO {orders} (id, item, status) VALUES ($1, $2, 'placed')",
                    order_id,
                    body.item,
                )
                job = Job(id=order_id, job_type="ship", job_definition=body.item.encode())
                await queue.enqueue_job(job, connection=conn)
                if body.item == "rollback":  # any failure after the enqueue
                    raise ValueError("the payment was declined")
        except ValueError as exc:  # the transaction rolled back: no order, no job
            raise HTTPException(422, str(exc)) from None
        return {"id": order_id}

    @app.get("/orders/{order_id}")
    async def read_order(order_id: str, request: Request) -> dict[str, Any]:
        pool: asyncpg.Pool = request.app.state.pool
        queue: PoolQueue = request.app.state.queue
        row = await pool.fetchrow(f"SELECT item, status FROM {orders} WHERE id = $1", order_id)
        try:
            job_status: str | None = (await queue.get_job(order_id)).status.value
        except JobNotFoundError:
            job_status = None
        if row is None and job_status is None:
            raise HTTPException(404, f"no order {order_id!r}")
        return {
            "item": row["item"] if row else None,
            "status": row["status"] if row else None,
            "job": job_status,
        }

    return app


app = create_app(os.environ.get("DATABASE_URL", "postgresql:///shop"))


async def shipped(client: httpx.AsyncClient, order_id: str) -> dict[str, Any]:
    """Poll the order (with a deadline) until its job completed."""
    async with asyncio.timeout(10):
        while True:
            body: dict[str, Any] = (await client.get(f"/orders/{order_id}")).json()
            if body["job"] == "completed":
                return body
            await asyncio.sleep(0.01)


async def demo(dsn: str) -> None:
    """Drive the app in-process (httpx's ASGITransport does not run the lifespan: we do)."""
    schema = f"shop_demo_{uuid.uuid4().hex[:8]}"
    service = create_app(dsn, schema)
    try:
        async with (
            service.router.lifespan_context(service),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=service), base_url="http://shop"
            ) as client,
        ):
            placed = await client.post("/orders", json={"item": "teapot"})
            body = await shipped(client, placed.json()["id"])
            print(f"order {body['item']}: {body['status']}, its job {body['job']}")
            declined = await client.post("/orders", json={"item": "rollback"})
            print(f"rolled back -> HTTP {declined.status_code}: {declined.json()['detail']}")
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                f'DROP SCHEMA IF EXISTS "{schema}" CASCADE; '
                f'DROP SCHEMA IF EXISTS "{schema}_jobs" CASCADE'
            )
        finally:
            await conn.close()
    print("fastapi_orders: OK")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        uvicorn.run(app)
    elif os.environ.get("DATABASE_URL"):
        asyncio.run(demo(os.environ["DATABASE_URL"]))
    else:
        print("fastapi_orders: needs PostgreSQL; set DATABASE_URL=postgresql://... to run it")
