"""The queue's handling of storage shared with other processes, backend-independent.

Two ``PoolQueue`` objects on one ``MemoryBackend`` stand in for two processes on one
store: neither sees the other's moves directly, so only polling (or a backend's
pushed events) can tell them. The real multi-process tests live with each backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from jobpool_async import Job, JobStatus, MemoryBackend, PoolQueue
from jobpool_async.backends.base import JobState, Listener, Moved

DEADLINE = 10.0


class SharedStore(MemoryBackend):
    """A memory store two queues share, polled like a file or a server would be."""

    default_poll_interval = 0.05

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Listener] = []

    async def close(self) -> None:
        return None

    def set_listener(self, listener: Listener | None) -> None:
        if listener is not None:
            self.listeners.append(listener)

    def push(self, moved: Sequence[Moved] | None) -> None:
        for listener in self.listeners:
            listener(moved)


@pytest.fixture
async def two_queues() -> AsyncIterator[tuple[PoolQueue, PoolQueue, SharedStore]]:
    store = SharedStore()
    a, b = PoolQueue(store), PoolQueue(store)
    async with a, b:
        yield a, b, store


async def test_a_stream_sees_another_queues_enqueue_by_polling(
    two_queues: tuple[PoolQueue, PoolQueue, SharedStore],
) -> None:
    a, b, _ = two_queues
    assert a.poll_interval == 0.05
    async with a.stream_jobs("w") as stream:
        waiting = asyncio.ensure_future(stream.__anext__())
        await asyncio.wait({waiting}, timeout=0.01)
        await b.enqueue_job(Job(id="from-b", job_type="t"))
        (job,) = await asyncio.wait_for(waiting, DEADLINE)
        assert job.id == "from-b"


async def test_a_slot_freed_elsewhere_is_freed_at_the_next_poll(
    two_queues: tuple[PoolQueue, PoolQueue, SharedStore],
) -> None:
    a, b, _ = two_queues
    await a.enqueue_jobs([Job(id="one", job_type="t"), Job(id="two", job_type="t")])
    async with a.stream_jobs("w", max_assigned_jobs=1) as stream:
        (first,) = await asyncio.wait_for(stream.__anext__(), DEADLINE)
        waiting = asyncio.ensure_future(stream.__anext__())
        await b.complete_job(first.id, b"done by b")
        (second,) = await asyncio.wait_for(waiting, DEADLINE)
        assert second.id == "two"
        assert stream.assigned_job_ids == ["two"]


async def test_a_cancellation_made_elsewhere_reaches_the_cancel_listener(
    two_queues: tuple[PoolQueue, PoolQueue, SharedStore],
) -> None:
    a, b, _ = two_queues
    await a.enqueue_job(Job(id="c", job_type="t"))
    heard = asyncio.Event()
    async with a.stream_jobs("w", max_assigned_jobs=1) as stream:
        stream.add_cancel_listener(lambda job_id: heard.set())
        await asyncio.wait_for(stream.__anext__(), DEADLINE)
        waiting = asyncio.ensure_future(stream.__anext__())
        assert (await b.cancel_jobs(job_ids=["c"])).cancelled == ["c"]
        await asyncio.wait_for(heard.wait(), DEADLINE)
        await b.acknowledge_cancellation({"c": True})
        await b.enqueue_job(Job(id="next", job_type="t"))
        (nxt,) = await asyncio.wait_for(waiting, DEADLINE)
        assert nxt.id == "next"


async def test_a_reused_id_is_not_mistaken_for_the_held_job(
    two_queues: tuple[PoolQueue, PoolQueue, SharedStore],
) -> None:
    a, b, _ = two_queues
    await a.enqueue_job(Job(id="same", job_type="t"))
    async with a.stream_jobs("w", max_assigned_jobs=1) as stream:
        await asyncio.wait_for(stream.__anext__(), DEADLINE)
        await b.complete_job("same", b"")
        await b.delete_jobs(job_ids=["same"])
        await b.enqueue_job(Job(id="same", job_type="t"))
        async with b.stream_jobs("other") as other:
            await asyncio.wait_for(other.__anext__(), DEADLINE)
        await b.enqueue_job(Job(id="free-slot", job_type="t"))
        (job,) = await asyncio.wait_for(stream.__anext__(), DEADLINE)
        assert job.id == "free-slot", "the old assignment ended; the new one is not ours"


async def test_a_claim_ends_the_earlier_assignment_another_stream_still_records() -> None:
    """Another process failed A's job (A has not polled yet) and B, in A's process,
    claimed it again: that claim ends A's assignment, so A's slot is free at once."""
    store = SharedStore()
    a, b = PoolQueue(store, poll_interval=30.0), PoolQueue(store, poll_interval=30.0)
    async with a, b:
        await a.enqueue_job(Job(id="x", job_type="t", tags=["x"]))
        async with a.stream_jobs("A", max_assigned_jobs=1) as first:
            await asyncio.wait_for(first.__anext__(), DEADLINE)
            await b.fail_job("x", "failed elsewhere")  # A is not told: no push, no poll
            assert first.assigned_job_ids == ["x"]
            async with a.stream_jobs("B", tags=["x"]) as second:
                (again,) = await asyncio.wait_for(second.__anext__(), DEADLINE)
                assert again.id == "x"
                assert first.assigned_job_ids == []
                assert second.assigned_job_ids == ["x"]
                await a.enqueue_job(Job(id="next", job_type="t"))
                (job,) = await asyncio.wait_for(first.__anext__(), DEADLINE)
                assert job.id == "next"


async def test_a_cancel_seen_by_polling_is_told_once_however_often_it_is_seen(
    two_queues: tuple[PoolQueue, PoolQueue, SharedStore],
) -> None:
    """Each poll sees the job still CANCELLING; the listener hears it once."""
    a, b, store = two_queues
    looks = 0
    job_states = store.job_states

    async def counted(job_ids: Sequence[str]) -> dict[str, JobState]:
        nonlocal looks
        looks += 1
        return await job_states(job_ids)

    store.job_states = counted  # type: ignore[method-assign]
    await a.enqueue_job(Job(id="c", job_type="t"))
    heard: list[str] = []
    async with a.stream_jobs("w", max_assigned_jobs=1) as stream:
        stream.add_cancel_listener(heard.append)
        await asyncio.wait_for(stream.__anext__(), DEADLINE)
        waiting = asyncio.ensure_future(stream.__anext__())
        await b.cancel_jobs(job_ids=["c"])
        async with asyncio.timeout(DEADLINE):
            while looks < 4:  # noqa: ASYNC110 - polling with a deadline
                await asyncio.sleep(0.01)
        assert heard == ["c"]
        waiting.cancel()


async def test_pushed_events_wake_streams_without_polling() -> None:
    store = SharedStore()
    a, b = PoolQueue(store, poll_interval=30.0), PoolQueue(store, poll_interval=30.0)
    async with a, b:
        await a.enqueue_job(Job(id="held", job_type="t"))
        heard: list[str] = []
        async with a.stream_jobs("w", max_assigned_jobs=1) as stream:
            stream.add_cancel_listener(heard.append)
            (held,) = await asyncio.wait_for(stream.__anext__(), DEADLINE)
            waiting = asyncio.ensure_future(stream.__anext__())
            await b.cancel_jobs(job_ids=["held"])
            store.push([Moved("held", JobStatus.CANCELLING, held.assigned_at)])
            for _ in range(100):
                if heard:
                    break
                await asyncio.sleep(0.01)
            assert heard == ["held"]
            await b.stop_job("held")
            await b.enqueue_job(Job(id="pushed", job_type="t", tags=["x"]))
            store.push(
                [
                    Moved("held", JobStatus.STOPPED, held.assigned_at),
                    Moved("pushed", JobStatus.INITIAL_PENDING, None, ("x",)),
                ]
            )
            (job,) = await asyncio.wait_for(waiting, 5.0)
            assert job.id == "pushed"
            await b.enqueue_job(Job(id="after-recheck", job_type="t"))
            waiting = asyncio.ensure_future(stream.__anext__())
            await b.complete_job("pushed", b"")
            store.push(None)
            (job,) = await asyncio.wait_for(waiting, 5.0)
            assert job.id == "after-recheck"


def test_poll_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        PoolQueue(MemoryBackend(), poll_interval=0)
    with pytest.raises(TypeError, match="Backend"):
        PoolQueue("memory://")  # type: ignore[arg-type]
