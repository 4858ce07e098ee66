"""Leases (SPEC §8.4): a dead worker's jobs come back without anyone calling anything.

A :class:`~jobpool_async.PoolQueue` keeps a lease in storage on every ``assignee_id``
it streams for, one record per (assignee, holder) where the holder is the queue.
One background task per queue (:class:`LeaseKeeper`) renews them all in one
storage write every ``lease / 3``, and, while the queue has open streams, looks
for expired assignees every ``lease / 2`` or less (jittered) and *rescues* their
jobs: ``RUNNING`` → ``UNKNOWN_RETRY``, ``CANCELLING`` → ``UNKNOWN_STOPPED``, each
as a compare-and-set on (status, assignee, assignment time), so a job that moved
meanwhile is never touched. Claims and completions never wait for a lease write:
only the first ``__anext__`` of an assignee's first stream waits for its record,
so no job is ever assigned to an assignee that has no lease to expire.

The backends share the pure helpers here (:func:`plan_rescue`, :func:`aggregate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import secrets
import socket
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ._errors import QueueClosedError

if TYPE_CHECKING:
    from ._queue import JobStream, PoolQueue

__all__ = [
    "DEFAULT_LEASE",
    "MIN_LEASE",
    "Lease",
    "LeaseKeeper",
    "LeaseRow",
    "RescuePlan",
    "aggregate",
    "check_lease",
    "plan_rescue",
    "unique_id",
]

logger = logging.getLogger("jobpool_async.leases")

#: The lease a :class:`PoolQueue` keeps unless told otherwise.
DEFAULT_LEASE = timedelta(seconds=30)
#: Shorter leases would be renewed faster than a storage round trip.
MIN_LEASE = timedelta(milliseconds=10)
#: Expired leases whose assignee has no job left are forgotten after this many leases.
FORGET_AFTER_LEASES = 10
#: A failed renewal is retried after this fraction of the lease (not a whole third).
_RETRY_FRACTION = 1 / 12

#: One stored lease record: (assignee_id, holder, first_seen_at, renewed_at, expires_at).
LeaseRow = tuple[str, str, datetime, datetime, datetime]


@dataclass(frozen=True, slots=True)
class Lease:
    """A worker's lease as stored: live while ``expires_at`` is in the future.

    ``holders`` names the queues renewing it (``host:pid:random`` each); several
    processes streaming for one ``assignee_id`` share its lease. ``first_seen_at``
    is the earliest, ``renewed_at`` and ``expires_at`` the latest of the holders'
    records. Times come from the store's clock where it has one (PostgreSQL),
    else from the renewing process's clock.
    """

    assignee_id: str
    holders: tuple[str, ...]
    first_seen_at: datetime
    renewed_at: datetime
    expires_at: datetime


def unique_id() -> str:
    """``host:pid:random``: unique across hosts, processes and objects of one process."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def check_lease(value: object) -> timedelta | None:
    """A ``lease`` option: ``None`` (off), a ``timedelta`` or seconds, positive and finite."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        lease = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"lease must be a finite duration, got {value!r}")
        lease = timedelta(seconds=value)
    else:
        raise TypeError(f"lease must be a timedelta, seconds or None, got {type(value).__name__}")
    if lease <= timedelta(0):
        raise ValueError(f"lease must be positive, got {value!r}")
    if lease < MIN_LEASE:
        raise ValueError(f"lease must be at least {MIN_LEASE.total_seconds()} s, got {value!r}")
    return lease


def aggregate(rows: Iterable[LeaseRow]) -> list[Lease]:
    """One :class:`Lease` per assignee from its holders' records, sorted by assignee."""
    by: dict[str, list[LeaseRow]] = {}
    for row in rows:
        by.setdefault(row[0], []).append(row)
    out = []
    for assignee in sorted(by):
        group = sorted(by[assignee], key=lambda r: r[1])
        out.append(
            Lease(
                assignee,
                tuple(r[1] for r in group),
                min(r[2] for r in group),
                max(r[3] for r in group),
                max(r[4] for r in group),
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class RescuePlan:
    """What a rescue's read found (record-store backends decide it in Python)."""

    #: Assignees whose every record has expired at ``now``: their jobs are rescued.
    expired: frozenset[str]
    #: Records to delete: expired before ``now - forget_after``, of an assignee that
    #: is alive through another record, or that had expired as a whole that long ago
    #: (deleted only if it then has no job left).
    forget: tuple[tuple[str, str], ...]


def plan_rescue(rows: Iterable[LeaseRow], now: datetime, forget_after: timedelta) -> RescuePlan:
    """Which assignees have expired at ``now`` and which records can be forgotten."""
    latest: dict[str, datetime] = {}
    listed = list(rows)
    for assignee, _, _, _, expires in listed:
        if assignee not in latest or expires > latest[assignee]:
            latest[assignee] = expires
    cutoff = now - forget_after
    expired = frozenset(a for a, expires in latest.items() if expires <= now)
    forget = tuple(
        (assignee, holder)
        for assignee, holder, _, _, expires in listed
        if expires < cutoff and (latest[assignee] > now or latest[assignee] < cutoff)
    )
    return RescuePlan(expired, forget)


class LeaseKeeper:
    """The one background task of a queue that renews its leases and rescues.

    A lease on an assignee is kept from its first stream until no stream of it is
    open and none of the jobs its streams handed over is still RUNNING/CANCELLING,
    or until the queue closes. Renewals are batched: one backend call per period
    for every assignee at once.
    """

    def __init__(self, queue: PoolQueue, lease: timedelta) -> None:
        #: Weak: the queue owns its keeper, and a strong reference back would make a
        #: cycle that keeps a closed (or dropped) queue and its store alive until the
        #: cyclic garbage collector runs.
        self._queue_ref = weakref.ref(queue)
        self.lease = lease
        #: This queue's name in the lease records.
        self.holder = unique_id()
        #: Where "now" comes from for backends without a clock of their own: the
        #: queue's clock (PostgreSQL always uses the server's ``now()``).
        self.clock: Callable[[], datetime] = queue.clock.now
        #: Renewal writes made (each one backend call, whatever the number of assignees).
        self.renewals = 0
        self._streams: dict[str, set[JobStream]] = {}
        self._written: set[str] = set()
        self._next_write: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._rescue_lock = asyncio.Lock()
        self._closed = False

    @property
    def _queue(self) -> PoolQueue:
        queue = self._queue_ref()
        if queue is None:  # dropped without close(): nothing is left to keep
            raise QueueClosedError("the queue is closed")
        return queue

    @property
    def forget_after(self) -> timedelta:
        return self.lease * FORGET_AFTER_LEASES

    def add_stream(self, stream: JobStream) -> None:
        """A new stream: its assignee's lease is renewed from now on."""
        self._streams.setdefault(stream.assignee_id, set()).add(stream)

    def holds(self, assignee_id: str) -> bool:
        """Whether this queue's record of ``assignee_id`` is written."""
        return assignee_id in self._written

    async def ensure(self, assignee_id: str) -> None:
        """Return once ``assignee_id``'s lease record is written (at once if it is)."""
        if assignee_id in self._written:
            return
        if self._closed:
            raise QueueClosedError("the queue is closed")
        if self._next_write is None:
            self._next_write = asyncio.get_running_loop().create_future()
        future = self._next_write
        self._start()
        self._wake.set()
        await asyncio.shield(future)

    def _start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"jobpool leases {self.holder}"
            )

    def _rescue_delay(self) -> float:
        """At most ``lease / 2``, jittered down by up to a fifth, so queues that
        started together do not all look at once."""
        return self.lease.total_seconds() / 2 * random.uniform(0.8, 1.0)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.lease.total_seconds() / 3
        next_renew = loop.time() + period
        next_rescue = loop.time() + self._rescue_delay()
        while not self._closed and self._queue_ref() is not None:
            wait = min(next_renew, next_rescue) - loop.time()
            if not self._wake.is_set() and wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
            self._wake.clear()
            if self._closed:
                break
            if self._next_write is not None or loop.time() >= next_renew:
                ok = await self._renew()
                next_renew = loop.time() + (period if ok else period * 3 * _RETRY_FRACTION)
            if loop.time() >= next_rescue:
                queue = self._queue_ref()
                if queue is None:
                    break
                if queue._streams:
                    with contextlib.suppress(Exception):  # logged in _rescue_logged
                        await self._rescue_logged()
                next_rescue = loop.time() + self._rescue_delay()

    def discard(self, stream: JobStream) -> None:
        """A stream closed: forget it unless a job it handed over is still running."""
        streams = self._streams.get(stream.assignee_id)
        if streams is not None and not stream._held:
            streams.discard(stream)

    async def _collect(self) -> list[str]:
        """The assignees to renew: those with an open stream, or with a closed one whose
        handed-over jobs have not all left RUNNING/CANCELLING (read from storage when
        no stream of it is open, since another process may have moved them)."""
        renew = []
        for assignee, streams in list(self._streams.items()):
            if not any(not s.closed for s in streams):
                for stream in [s for s in streams if s._held]:
                    with contextlib.suppress(Exception):  # kept; checked next time
                        await self._queue._refresh(stream)
            streams = {s for s in streams if not s.closed or s._held}
            if streams:
                self._streams[assignee] = streams
                renew.append(assignee)
            else:
                del self._streams[assignee]
        return renew

    async def _renew(self) -> bool:
        """One write: renew every held assignee, drop the released ones."""
        future, self._next_write = self._next_write, None
        try:
            renew = await self._collect()
            release = sorted(self._written.difference(renew))
            if renew or release:
                await self._queue.backend.renew_leases(
                    self.holder, sorted(renew), release, self.lease, self.clock()
                )
                self.renewals += 1
        except Exception as exc:
            logger.warning("renewing the leases of %s failed (retrying): %s", self.holder, exc)
            if future is not None and not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: a stream that gave up waiting is fine
            return False
        self._written = set(renew)
        if future is not None and not future.done():
            future.set_result(None)
        return True

    async def _rescue_logged(self) -> int:
        try:
            return await self.rescue()
        except QueueClosedError:
            return 0
        except Exception:
            logger.warning("rescuing the jobs of expired leases failed", exc_info=True)
            raise

    async def rescue(self) -> int:
        """Move the jobs of expired assignees (one backend call); wake who can take them."""
        async with self._rescue_lock:
            policy = self._queue.retry
            moved = await self._queue.backend.rescue_expired(
                self.clock(),
                self.forget_after,
                policy.max_attempts if policy is not None else None,
            )
        if moved:
            logger.warning(
                "rescued %d job(s) of worker(s) whose lease expired: %s",
                len(moved),
                sorted({m.job_id for m in moved})[:20],
            )
            await self._queue._observe(moved)
        return len(moved)

    async def close(self) -> None:
        """Stop renewing; forget the records of assignees with no job still running.

        Assignees with jobs still RUNNING/CANCELLING keep their record, which expires
        in ``lease``: those jobs are then rescued as if this process had died.
        """
        self._closed = True
        self._wake.set()
        future, self._next_write = self._next_write, None
        if future is not None and not future.done():
            future.set_exception(QueueClosedError("the queue is closed"))
            future.exception()
        if self._task is not None:
            await asyncio.wait({self._task})
        keep = {a for a, streams in self._streams.items() if any(s._held for s in streams)}
        release = sorted(self._written - keep)
        if release:
            try:
                await self._queue.backend.renew_leases(
                    self.holder, [], release, self.lease, self.clock()
                )
            except Exception as exc:  # they expire by themselves
                logger.warning("releasing the leases of %s failed: %s", self.holder, exc)
        self._written.clear()
        self._streams.clear()  # (each refers to the queue: nothing to keep after this)
