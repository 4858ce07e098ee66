"""A move seen late never touches a later assignment of the same job (issue #14, item 1).

A call's moves reach the queue's bookkeeping only after the backend call returns. In
that window another stream can claim the job again (a fail made it eligible). The
late move must end only the assignment it was made on, not the new holder's: else
the new holder loses a slot it still uses (a), its cancel listener is never told (b),
and a refilled job not yet handed over is dropped and left RUNNING for ever (c).

Each test holds the failing call's ``apply`` in that window (fault injection), so the
interleaving is forced, not left to timing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from jobpool_async import Job, JobStatus, JobStream, PoolQueue
from jobpool_async.backends.base import Change, Refill
from jobpool_async.testing import DEADLINE, PauseAfter, PauseAfterApply, until

from ._helpers import HoldWakes, job, new_id

S = JobStatus


def failing(job_id: str) -> Callable[[list[Change], Refill | None], bool]:
    """Pause the plain apply of ``fail_job(job_id)``."""
    return lambda changes, refill: (
        (refill is None and [(c.job_id, c.transition.target) for c in changes])
        == [(job_id, S.FAILED_RETRY)]
    )


async def handed_and_failed_late(
    queue: PoolQueue,
) -> tuple[Job, PauseAfterApply, asyncio.Task[None]]:
    """A job handed to a stream (then closed), failed by a call now held after its
    write: the job is FAILED_RETRY in the store, the queue has not seen it yet."""
    tag = new_id("tag")
    x = job(tags=[tag])
    await queue.enqueue_job(x)
    async with queue.stream_jobs("a", tags=[tag]) as a:
        (first,) = await asyncio.wait_for(a.__anext__(), DEADLINE)
    assert first.id == x.id
    pause = PauseAfterApply(queue.backend, failing(x.id))
    fail = asyncio.ensure_future(queue.fail_job(x.id, "boom"))
    await pause.held()
    assert (await queue.get_job(x.id)).status is S.FAILED_RETRY
    return first, pause, fail


async def reclaim(queue: PoolQueue, x: Job) -> JobStream:
    stream = queue.stream_jobs("b", tags=x.tags, max_assigned_jobs=1)
    (again,) = await asyncio.wait_for(stream.__anext__(), DEADLINE)
    assert again.id == x.id and again.assigned_at != x.assigned_at
    return stream


async def test_a_late_move_leaves_the_new_holder_at_its_slot_limit(queue: PoolQueue) -> None:
    x, pause, fail = await handed_and_failed_late(queue)
    async with await reclaim(queue, x) as b:
        pause.go()
        await asyncio.wait_for(fail, DEADLINE)
        await queue.enqueue_job(job(tags=list(x.tags)))
        await queue.cancel_jobs(job_ids=[x.id])  # CANCELLING still takes b's only slot
        nxt = asyncio.ensure_future(b.__anext__())
        try:
            await until(lambda: nxt.done() or b._waiting, "b waits or takes a job")
            assert not nxt.done(), "b was handed a second job while its first is CANCELLING"
            await queue.acknowledge_cancellation({x.id: True})
            (second,) = await asyncio.wait_for(nxt, DEADLINE)
        finally:
            nxt.cancel()
        assert second.id != x.id
        running = [
            j
            for j in await queue.get_jobs([x.id, second.id])
            if j.status in (S.RUNNING, S.CANCELLING)
        ]
        assert [j.id for j in running] == [second.id]


async def test_a_late_move_does_not_hide_a_cancel_from_the_new_holder(queue: PoolQueue) -> None:
    x, pause, fail = await handed_and_failed_late(queue)
    heard: list[str] = []
    async with await reclaim(queue, x) as b:
        b.add_cancel_listener(heard.append)
        pause.go()
        await asyncio.wait_for(fail, DEADLINE)
        result = await queue.cancel_jobs(job_ids=[x.id])
        assert result.cancelled == [x.id]
        assert heard == [x.id], "b's cancel listener was not told"


async def test_a_late_move_does_not_drop_a_refilled_job_before_hand_over(queue: PoolQueue) -> None:
    tag = new_id("tag")
    x, held = job(tags=[tag]), job(tags=[tag])
    await queue.enqueue_jobs([x, held])
    async with queue.stream_jobs("a", tags=[tag]) as a:
        (first,) = await asyncio.wait_for(a.__anext__(), DEADLINE)
    assert first.id == x.id

    # b waits for a slot; its wake-up is held so that the late move lands between
    # the refill claiming x for b and b handing x over.
    b = queue.stream_jobs("b", tags=[tag], max_assigned_jobs=1)
    wakes = HoldWakes(queue, b)
    async with b:
        (mine,) = await asyncio.wait_for(b.__anext__(), DEADLINE)
        assert mine.id == held.id
        nxt = asyncio.ensure_future(b.__anext__())
        try:
            await until(lambda: b._waiting, "b waits for a slot")
            pause = PauseAfterApply(queue.backend, failing(x.id))
            fail = asyncio.ensure_future(queue.fail_job(x.id, "boom"))
            await pause.held()
            await queue.complete_job(held.id, b"")  # refills b with x, in the same call
            await until(lambda: wakes.wakes == 1, "b woke with x ready")
            assert [j.id for j in b._ready] == [x.id]
            pause.go()
            await asyncio.wait_for(fail, DEADLINE)  # the late move of x's old assignment
            wakes.release()
            await until(lambda: nxt.done() or wakes.waits > 1, "b returns or waits again")
            assert nxt.done(), "the refilled job was dropped before hand-over"
            assert [j.id for j in nxt.result()] == [x.id]
        finally:
            nxt.cancel()
        assert b.assigned_job_ids == [x.id]
    assert (await queue.get_job(x.id)).status is S.RUNNING  # handed over: the caller owns it
    await queue.complete_job(x.id, b"")


async def test_a_move_whose_caller_was_cancelled_still_frees_the_slot(queue: PoolQueue) -> None:
    """The task completing a job is cancelled after the store moved the job and before
    the queue saw it: the move is still seen, the stream's slot frees."""
    tag = new_id("tag")
    x, y = job(tags=[tag]), job(tags=[tag])
    await queue.enqueue_job(x)
    async with queue.stream_jobs("a", tags=[tag], max_assigned_jobs=1) as a:
        (first,) = await asyncio.wait_for(a.__anext__(), DEADLINE)
        assert first.id == x.id
        pause = PauseAfterApply(queue.backend, lambda changes, refill: True)
        completing = asyncio.ensure_future(queue.complete_job(x.id, b""))
        await pause.held()
        completing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await completing
        pause.go()
        await queue.enqueue_job(y)
        nxt = asyncio.ensure_future(a.__anext__())
        try:
            await until(lambda: nxt.done() or a._waiting, "a takes y or waits")
            assert nxt.done(), "the completed job still takes the stream's only slot"
            assert [j.id for j in nxt.result()] == [y.id]
        finally:
            nxt.cancel()


async def test_a_cancel_whose_caller_was_cancelled_still_reaches_the_listener(
    queue: PoolQueue,
) -> None:
    tag = new_id("tag")
    x = job(tags=[tag])
    await queue.enqueue_job(x)
    heard: list[str] = []
    async with queue.stream_jobs("a", tags=[tag]) as a:
        a.add_cancel_listener(heard.append)
        await asyncio.wait_for(a.__anext__(), DEADLINE)
        pause = PauseAfter(queue.backend, "apply_selected")
        cancelling = asyncio.ensure_future(queue.cancel_jobs(job_ids=[x.id]))
        await pause.held()
        cancelling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cancelling
        pause.go()
        await until(lambda: bool(heard), "the listener hears the cancel")
        assert heard == [x.id]


async def test_a_slot_an_in_flight_refill_will_fill_is_not_filled_twice(queue: PoolQueue) -> None:
    """A fail frees the waiting stream's only slot and its refill claims the stream's
    next job; before that call is seen, another stream claims the failed job again,
    which tells the first stream its old assignment ended. The stream must not fill
    that slot itself too: the refill's job is already on its way."""
    tag = new_id("tag")
    y, z = job(tags=[tag]), job(tags=[tag])
    await queue.enqueue_job(y)
    s = queue.stream_jobs("s", tags=[tag], max_assigned_jobs=1)
    wakes = HoldWakes(queue, s)
    wakes.release()  # count only
    async with s:
        (first,) = await asyncio.wait_for(s.__anext__(), DEADLINE)
        assert first.id == y.id
        await queue.enqueue_job(z)
        nxt = asyncio.ensure_future(s.__anext__())
        pause = PauseAfterApply(queue.backend, lambda changes, refill: refill is not None)
        try:
            await until(lambda: s._waiting, "s waits for a slot")
            failing = asyncio.ensure_future(queue.fail_job(y.id, "again"))
            await pause.held()  # y FAILED_RETRY; z claimed for s by the refill
            w = job(tags=[tag])  # created after the fail: y is older
            await queue.enqueue_job(w)
            async with queue.stream_jobs("b", tags=[tag]) as b:
                (again,) = await asyncio.wait_for(b.__anext__(), DEADLINE)
                assert again.id == y.id
                await until(lambda: nxt.done() or wakes.waits >= 2, "s takes a job or waits")
                assert not nxt.done(), f"s filled the refill's slot itself: {nxt.result()}"
                pause.go()
                await asyncio.wait_for(failing, DEADLINE)
                (got,) = await asyncio.wait_for(nxt, DEADLINE)
                assert got.id == z.id
                mine = [
                    j.id
                    for j in await queue.get_jobs([y.id, z.id, w.id])
                    if j.assignee_id == "s" and j.status in (S.RUNNING, S.CANCELLING)
                ]
                assert mine == [z.id]
                await queue.complete_job(y.id, b"")
        finally:
            pause.go()
            nxt.cancel()


async def test_a_job_that_left_the_stream_before_its_give_back_is_not_given_back(
    queue: PoolQueue,
) -> None:
    """A refilled job not yet handed over leaves the stream (its worker is declared
    lost) and another stream claims it; when the first stream then closes, its
    give-back must not fail the other stream's run."""
    tag = new_id("tag")
    y, z = job(tags=[tag]), job(tags=[tag])
    await queue.enqueue_jobs([y, z])
    s = queue.stream_jobs("s", tags=[tag], max_assigned_jobs=1)
    wakes = HoldWakes(queue, s)
    (first,) = await asyncio.wait_for(s.__anext__(), DEADLINE)
    assert first.id == y.id
    nxt = asyncio.ensure_future(s.__anext__())
    await until(lambda: s._waiting, "s waits for a slot")
    await queue.complete_job(y.id, b"")  # refills s with z
    await until(lambda: wakes.wakes == 1, "s woke with z ready")
    assert [j.id for j in s._ready] == [z.id]
    assert await queue.mark_worker_unresponsive("s") == 1  # z: UNKNOWN_RETRY
    async with queue.stream_jobs("b", tags=[tag]) as b:
        (again,) = await asyncio.wait_for(b.__anext__(), DEADLINE)
        assert again.id == z.id
        closing = asyncio.ensure_future(s.aclose())
        await until(lambda: s.closed, "s closes")
        wakes.release()
        await asyncio.wait_for(closing, DEADLINE)
        nxt.cancel()
        now = await queue.get_job(z.id)
        assert (now.status, now.assignee_id) == (S.RUNNING, "b"), now
        assert b.assigned_job_ids == [z.id]
        await queue.complete_job(z.id, b"by b")
