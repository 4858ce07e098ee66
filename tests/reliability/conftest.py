"""Shared pieces of the reliability suite: Hypothesis profiles and a loop-owning runner.

Hypothesis runs synchronous test functions, so tests that drive the async queue from
Hypothesis own an event loop (:class:`LoopRunner`) instead of using pytest-asyncio.

Profiles (choose with ``JOBPOOL_HYPOTHESIS_PROFILE``, default ``ci``):

* ``ci``: bounded examples so the whole suite stays fast on every backend;
* ``long``: many more examples and longer state-machine runs, for local soak runs.

Profiles are applied per test (``hypothesis_settings()``), never loaded globally, so
other suites in the same session keep their own Hypothesis settings.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

from jobpool_async import Backend, PoolQueue
from jobpool_async.backends.base import Clock

from ..backends import backend_factory, drop_postgres_schema, new_schema_name

T = TypeVar("T")

PROFILE_ENV = "JOBPOOL_HYPOTHESIS_PROFILE"

_COMMON: dict[str, Any] = {
    "deadline": None,  # storage latency on a shared machine is noisy
    "database": None,  # no .hypothesis/ directory in the checkout
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("jobpool-ci", max_examples=40, stateful_step_count=50, **_COMMON)
settings.register_profile("jobpool-long", max_examples=500, stateful_step_count=100, **_COMMON)


def profile_name() -> str:
    """The Hypothesis profile chosen by ``JOBPOOL_HYPOTHESIS_PROFILE`` (``ci``/``long``)."""
    name = os.environ.get(PROFILE_ENV, "ci").strip() or "ci"
    if name not in ("ci", "long"):
        raise ValueError(f"{PROFILE_ENV} must be 'ci' or 'long', got {name!r}")
    return name


def hypothesis_settings(**overrides: Any) -> settings:
    """Settings of the chosen profile, with ``overrides``."""
    return settings(settings.get_profile(f"jobpool-{profile_name()}"), **overrides)


def scaled(ci: int, long: int) -> int:
    """A count for the chosen profile (e.g. crash rounds, stress sizes)."""
    return long if profile_name() == "long" else ci


class LoopRunner:
    """Owns an event loop and one fresh store of ``backend_name`` (for Hypothesis tests).

    ``new_queue()`` opens a :class:`PoolQueue` on the store (a second call after
    ``close_queue()`` reopens the same store); ``close()`` tears everything down.
    """

    def __init__(self, backend_name: str, base_dir: Path | None = None) -> None:
        self.backend_name = backend_name
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="jp-rel-", dir=base_dir))
        self.schema = new_schema_name() if backend_name == "postgres" else None
        self._factory = backend_factory(backend_name, self.dir, self.schema)
        self.queue: PoolQueue | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def new_backend(self) -> Backend:
        return self._factory()

    def new_queue(self, clock: Clock | None = None) -> PoolQueue:
        assert self.queue is None, "close the current queue first"
        queue = PoolQueue(self._factory(), clock=clock)
        self.run(queue.open())
        self.queue = queue
        return queue

    def close_queue(self) -> None:
        if self.queue is not None:
            queue, self.queue = self.queue, None
            self.run(queue.close())

    def close(self) -> None:
        try:
            self.close_queue()
            if self.schema is not None:
                self.run(drop_postgres_schema(self.schema))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)
