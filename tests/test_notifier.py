"""The notifier's synchronous wake-up: taking the condition's lock without waiting.

``publish_soon`` (called from done callbacks) notifies at once when the lock is
free, and falls back to a task otherwise. Taking the lock that way must never
jump the queue of a task already granted it, nor leave a stale waiter behind.
"""

from __future__ import annotations

import asyncio

from jobpool_async._notifier import Notifier, _acquire_now


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
