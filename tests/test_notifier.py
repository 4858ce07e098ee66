"""The notifier's synchronous wake-up: taking the condition's lock without waiting.

``publish_soon`` (called from done callbacks) notifies at once when the lock is
free, and falls back to a task otherwise. Taking the lock that way must never
jump the queue of a task already granted it, nor leave a stale waiter behind.
"""

from __future__ import annotations

import asyncio

from jobpool_async import Job, MemoryBackend, PoolQueue
from jobpool_async._notifier import Notifier, _acquire_now
from jobpool_async.testing import next_batch, until


async def test_a_free_lock_is_taken_at_once() -> None:
    cond = asyncio.Condition()
    assert _acquire_now(cond)
    assert cond.locked()
    cond.release()
    assert not cond.locked()


async def test_a_held_lock_is_refused_and_no_waiter_is_left_behind() -> None:
    cond = asyncio.Condition()
    await cond.acquire()
    assert not _acquire_now(cond)
    cond.release()
    # nothing stale queued: the next acquire does not wait
    await asyncio.wait_for(cond.acquire(), 1)
    cond.release()


async def test_a_task_granted_the_lock_keeps_its_turn() -> None:
    cond = asyncio.Condition()
    await cond.acquire()
    got = asyncio.Event()

    async def waiter() -> None:
        async with cond:
            got.set()

    task = asyncio.ensure_future(waiter())
    await asyncio.sleep(0)  # it now queues for the lock
    cond.release()  # granted to the waiter, which has not run yet
    assert not cond.locked()
    assert not _acquire_now(cond)
    await asyncio.wait_for(task, 1)
    assert got.is_set()
    assert not cond.locked()


async def test_publish_soon_wakes_a_waiter_whether_or_not_the_lock_is_free() -> None:
    notifier = Notifier()
    for hold_lock in (False, True):
        sub = notifier.subscribe(frozenset())
        waiting = asyncio.ensure_future(notifier.wait(sub, None))
        await asyncio.sleep(0)
        assert not waiting.done()
        if hold_lock:
            await notifier._cond.acquire()
        notifier.publish_soon(subs=[sub])
        if hold_lock:
            await asyncio.sleep(0)
            assert not waiting.done()  # it must wait for the lock (a task notifies later)
            notifier._cond.release()
        assert await asyncio.wait_for(waiting, 1) is True
        notifier.unsubscribe(sub)


# --- flags raised with no stream waiting on the condition (f0794a4) -------------------
#
# ``publish``/``publish_soon`` skip the lock and ``notify_all`` when the condition has
# no waiters. That is safe only because a stream tests its flag under the condition's
# lock after every suspension and before it waits: a stream queued for the lock, or
# woken and taking the lock again, is not among the condition's waiters, and must
# still see a flag raised meanwhile.


def _queued_for_lock(cond: asyncio.Condition) -> bool:
    """Whether a task waits for ``cond``'s lock (not on the condition itself)."""
    lock: asyncio.Lock = cond._lock  # type: ignore[attr-defined]
    return bool(lock._waiters)


async def test_a_waiter_queued_for_the_lock_sees_a_flag_raised_without_notify() -> None:
    notifier = Notifier()
    sub = notifier.subscribe(frozenset())
    await notifier._cond.acquire()
    waiting = asyncio.ensure_future(notifier.wait(sub, None))
    await until(lambda: _queued_for_lock(notifier._cond), "the wait queues for the lock")
    assert not notifier._cond._waiters  # (so the flag below is not notified)
    notifier.publish_soon(subs=[sub])
    notifier._cond.release()
    assert await asyncio.wait_for(waiting, 1) is True


async def test_a_woken_waiter_retaking_the_lock_sees_a_flag_raised_without_notify() -> None:
    notifier = Notifier()
    a, b = notifier.subscribe(frozenset({"a"})), notifier.subscribe(frozenset({"b"}))
    wait_a = asyncio.ensure_future(notifier.wait(a, None))
    wait_b = asyncio.ensure_future(notifier.wait(b, None))
    await until(lambda: len(notifier._cond._waiters) == 2, "both wait on the condition")
    notifier.publish_soon(subs=[b])  # notify_all: a wakes too, its flag not raised
    await notifier._cond.acquire()  # (free: taken before either woken waiter runs)
    await until(lambda: not notifier._cond._waiters, "both left the condition's waiters")
    assert not wait_a.done() and not wait_b.done()  # both queue for the lock now
    notifier.publish_soon(subs=[a])  # no waiter on the condition: flag only
    notifier._cond.release()
    assert await asyncio.wait_for(wait_b, 1) is True
    assert await asyncio.wait_for(wait_a, 1) is True


async def test_a_stream_queued_for_the_notifier_lock_takes_a_job_enqueued_meanwhile() -> None:
    async with PoolQueue(MemoryBackend()) as queue:
        stream = queue.stream_jobs("w")
        cond = queue._notifier._cond
        await cond.acquire()
        try:
            pending = asyncio.ensure_future(next_batch(stream))
            await until(lambda: _queued_for_lock(cond), "the stream queues for the lock")
            assert not cond._waiters
            # (a task: an enqueue that notifies would wait for the lock held here)
            enqueue = asyncio.ensure_future(queue.enqueue_job(Job(id="j", job_type="t")))
            await until(lambda: stream._sub.flag, "the enqueue raises the stream's flag")
        finally:
            cond.release()
        assert [job.id for job in await pending] == ["j"]
        assert await asyncio.wait_for(enqueue, 1) == "j"
        await stream.aclose()
