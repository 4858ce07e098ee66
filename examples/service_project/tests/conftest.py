"""The app's queue in tests: the plugin's ``jobpool_queue`` (memory by default, or
``--jobpool-backend=sqlite``...), given to the endpoints by a dependency override.

The lifespan (which would build a queue of its own) is not run: httpx's
``ASGITransport`` does not run it, and the test runs the service's Worker itself.
Written for pytest-asyncio's strict mode (``pytest_asyncio.fixture``); it works
unchanged in auto mode.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest_asyncio
from app import app, get_queue, make_worker

from jobpool_async import PoolQueue


@pytest_asyncio.fixture
async def client(jobpool_queue: PoolQueue) -> AsyncIterator[httpx.AsyncClient]:
    app.dependency_overrides[get_queue] = lambda: jobpool_queue
    try:
        async with (
            make_worker(jobpool_queue),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test"
            ) as client,
        ):
            yield client
    finally:
        app.dependency_overrides.clear()
