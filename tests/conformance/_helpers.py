"""Helpers for the project's own conformance tests beyond the shipped kit's
(:mod:`jobpool_async.testing`): fault injection that reaches into the queue."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from jobpool_async import Job, JobStream, PoolQueue


def new_id(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def job(**kwargs: Any) -> Job:
    return Job(id=new_id(), job_type="test", **kwargs)


class HoldWakes:
    """Fault injection: when ``stream`` is woken in ``__anext__``, it stays held right
    there (as if its task had not been scheduled yet) until ``release()``. Counts
    its waits (entered) and wakes (returned from the notifier)."""

    def __init__(self, queue: PoolQueue, stream: JobStream) -> None:
        self.waits = self.wakes = 0
        self._gate = asyncio.Event()
        self._sub = stream._sub
        self._inner = queue._notifier.wait
        queue._notifier.wait = self._wait  # type: ignore[method-assign]

    async def _wait(self, sub: Any, poll_interval: float | None) -> bool:
        mine = sub is self._sub
        self.waits += mine
        woke = await self._inner(sub, poll_interval)
        if mine:
            self.wakes += 1
            await self._gate.wait()
        return woke

    def release(self) -> None:
        self._gate.set()
