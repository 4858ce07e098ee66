"""Waking streams: one :class:`asyncio.Condition` per queue, with targeted flags.

A stream waits on the condition until its own flag is raised (or it is closed, or
its poll timeout passes). Publishers raise the flags of exactly the streams that
could act now — those whose tag filter matches a newly eligible job, or whose
slot was freed — and then notify the condition. Raising the flag before the
notify, and checking it under the condition's lock, means no wake is ever lost:
a stream that was busy claiming when the event happened finds its flag raised and
claims again at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

__all__ = ["Notifier", "Subscription"]


def _acquire_now(cond: asyncio.Condition) -> bool:
    """Take ``cond``'s lock without waiting, from synchronous code; False if that
    would mean waiting. ``Lock.acquire()`` returns without suspending when the lock
    is free and nobody queues for it, so its coroutine is run one step: it either
    finishes (taken) or asks to wait, and is then closed, which withdraws it.

    This saves a refill's wake-up a task and an event-loop turn (see
    ``PoolQueue._refilled``)."""
    if cond.locked():
        return False
    step = cond.acquire()
    try:
        step.send(None)
    except StopIteration:
        return True
    step.close()
    return False


class Subscription:
    """One stream's place in the notifier."""

    __slots__ = ("closed", "flag", "tags")

    def __init__(self, tags: frozenset[str]) -> None:
        self.tags = tags
        self.flag = False
        self.closed = False


class Notifier:
    """Pushes wake-ups to waiting streams; no polling in-process."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._subs: set[Subscription] = set()
        self._pending_notify: asyncio.Task[None] | None = None

    def subscribe(self, tags: frozenset[str]) -> Subscription:
        sub = Subscription(tags)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.closed = True
        self._subs.discard(sub)

    def mark(
        self,
        *,
        tagsets: Iterable[Iterable[str]] = (),
        subs: Iterable[Subscription] = (),
        everyone: bool = False,
    ) -> bool:
        """Raise the flags of the subscriptions that should wake; True if any was raised."""
        raised = False
        for sub in subs:
            sub.flag = raised = True
        if everyone:
            for sub in self._subs:
                sub.flag = raised = True
            return raised
        tagsets = [frozenset(ts) for ts in tagsets]
        if tagsets:
            for sub in self._subs:
                if not sub.flag and any(sub.tags.issubset(ts) for ts in tagsets):
                    sub.flag = raised = True
        return raised

    async def notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def publish(
        self,
        *,
        tagsets: Iterable[Iterable[str]] = (),
        subs: Iterable[Subscription] = (),
        everyone: bool = False,
    ) -> None:
        if self.mark(tagsets=tagsets, subs=subs, everyone=everyone) and self._cond._waiters:
            await self.notify()

    def publish_soon(
        self,
        *,
        tagsets: Iterable[Iterable[str]] = (),
        subs: Iterable[Subscription] = (),
        everyone: bool = False,
    ) -> None:
        """From synchronous code (callbacks): raise flags now, and notify now if the
        condition's lock is free (the usual case), else from a task."""
        raised = False
        for sub in subs:  # (``mark``'s, inline: the usual call raises a stream's flag)
            sub.flag = raised = True
        if everyone or tagsets:
            raised = self.mark(tagsets=tagsets, everyone=everyone) or raised
        if not raised or self._pending_notify is not None or not self._cond._waiters:
            # (No stream waits on the condition: the flags raised are all a stream
            # needs, since ``wait`` tests its flag under the lock before waiting.)
            return
        if _acquire_now(self._cond):
            try:
                self._cond.notify_all()
            finally:
                self._cond.release()
        else:
            self._pending_notify = asyncio.get_running_loop().create_task(self._notify_later())

    async def _notify_later(self) -> None:
        self._pending_notify = None
        await self.notify()

    async def wait(self, sub: Subscription, poll_interval: float | None) -> bool:
        """Wait until ``sub`` is flagged or closed; False if ``poll_interval`` passed first."""
        async with self._cond:
            if sub.flag or sub.closed:
                return True
            if poll_interval is None:  # (no timeout context: one per wait, for nothing)
                await self._cond.wait_for(lambda: sub.flag or sub.closed)
                return True
            try:
                async with asyncio.timeout(poll_interval):
                    await self._cond.wait_for(lambda: sub.flag or sub.closed)
            except TimeoutError:
                return False
            return True
