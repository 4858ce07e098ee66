"""LISTEN/NOTIFY of the PostgreSQL backend: the listener connection, kept alive and
reconnected by a supervisor task; the moves other processes notify, handed to the
queue; and ``wait_for`` across processes (which jobs others wait for, and the
notices about their moves).

Every notification payload starts with the sending backend instance's token, so a
listener ignores its own; the body is JSON ``[[id, status, tags, assigned_at_us,
due_us?], ...]`` (microseconds since the epoch), or nothing: a bare "re-check".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .._sql import STATUS
from ..base import (
    Listener,
    Moved,
    StorageError,
)
from ._connections import close_conn, connect, storage_error_types

if TYPE_CHECKING:
    from asyncpg import Connection

logger = logging.getLogger("jobpool_async.postgres")

#: NOTIFY payloads above this many bytes are replaced by a bare "re-check" notice
#: (PostgreSQL's limit is 8000 bytes).
MAX_PAYLOAD = 7000
#: How many job ids other processes' ``wait_for`` calls may have us watch for.
MAX_WATCHED = 100_000
#: The token of notifications sent by an insert in the caller's transaction: no
#: backend's own (tokens are hex), so every listener, this process's too, acts on it.
COMMITTED = "committed"

UTC_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def us(value: datetime) -> int:
    """Microseconds since the epoch (the inverse of :func:`from_us`)."""
    return (value - UTC_EPOCH) // timedelta(microseconds=1)


def to_us(value: datetime | None) -> int | None:
    """:func:`us`, with ``None`` kept."""
    return None if value is None else us(value)


def from_us(value: int | None) -> datetime | None:
    """A datetime from ``EPOCH_US`` microseconds (``None`` stays ``None``)."""
    return None if value is None else UTC_EPOCH + timedelta(microseconds=value)


class Notifications:
    """The listening side of one backend instance, and its notices for waiters elsewhere.

    ``send(channel, payload)`` sends a notification (through the backend's pool);
    ``on_due`` is told the due time of every waiting job a notification names;
    ``on_recheck`` is called when something may have been missed (a bare notice, a
    reconnect), so the backend looks for jobs that came due.
    """

    def __init__(
        self,
        *,
        dsn: str,
        connect_timeout: float,
        application_name: str,
        channel: str,
        token: str,
        send: Callable[[str, str], Awaitable[None]],
        on_due: Callable[[datetime | None], None],
        on_recheck: Callable[[], None],
    ) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self.application_name = application_name
        self.channel = channel
        self._token = token
        self._send = send
        self._learn = on_due
        self._recheck = on_recheck
        #: ``wait_for`` across processes: NOTIFY channel where queues say which jobs they
        #: wait for, the jobs other processes wait for (with counts), and the notices
        #: this instance is sending about moves of those jobs.
        self.watch_channel = f"{channel}_w"
        self.watched: dict[str, int] = {}
        self._telling: set[asyncio.Task[None]] = set()
        #: The queue's callback for moves made elsewhere.
        self.listener: Listener | None = None
        self._listen_conn: Connection | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._listen_lost = asyncio.Event()
        self.closed = False

    async def open(self) -> None:
        """Connect the listener (raises if it cannot), then keep it connected."""
        self._listen_conn = await self._connect_listener()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    def close(self) -> None:
        """For good: no more listening, and the notices under way are moot."""
        self.closed = True
        self.listener = None
        for task in list(self._telling):  # notices for waiters elsewhere: moot now
            task.cancel()

    async def stop(self) -> None:
        """Wait for the cancelled notices; stop the supervisor; close the listener."""
        await asyncio.gather(*self._telling, return_exceptions=True)
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        conn, self._listen_conn = self._listen_conn, None
        if conn is not None:
            await close_conn(conn)

    async def _connect_listener(self) -> Connection:
        conn = await connect(self._dsn, self._connect_timeout, self.application_name)
        try:
            await conn.add_listener(self.channel, self._on_notify)
            await conn.add_listener(self.watch_channel, self._on_watch)
        except BaseException:
            conn.terminate()
            raise
        self._listen_lost.clear()
        conn.add_termination_listener(self._on_listen_lost)
        return conn

    def _on_listen_lost(self, conn: Any) -> None:
        current = self._listen_conn
        if current is None or current is conn:  # not a late call about a replaced one
            self._listen_lost.set()

    # --- wait_for across processes ---------------------------------------------------

    def watch_payload(self, job_id: str, waiting: bool) -> str | None:
        """The notice that a ``wait_for`` here starts (``waiting``) or stops waiting for
        ``job_id``, or ``None`` for an id too long to send (only polled for)."""
        payload = f"{self._token} {'+' if waiting else '-'}{job_id}"
        if len(payload.encode("utf-8", "surrogatepass")) > MAX_PAYLOAD:
            return None
        return payload

    def _on_watch(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        if not isinstance(payload, str) or payload.startswith(self._token):
            return
        _, _, body = payload.partition(" ")
        if not body:
            return
        job_id, watched = body[1:], self.watched
        if body[0] == "+":
            if len(watched) >= MAX_WATCHED:  # waiters that died without saying so
                watched.clear()
            watched[job_id] = watched.get(job_id, 0) + 1
        elif body[0] == "-":
            left = watched.pop(job_id, 0) - 1
            if left > 0:
                watched[job_id] = left

    def tell(self, moved: Sequence[Moved] | None) -> None:
        """Notify the moves of jobs other processes wait for (``None``: some watched
        job was deleted, a bare re-check notice), from a task: the call that moved
        them does not wait, and a failure here only leaves the waiters to their poll."""
        tok = self._token
        if moved is None:
            payload = tok
        else:
            hits = [
                [m.job_id, m.status.value, list(m.tags), to_us(m.assigned_at)]
                for m in moved
                if m.job_id in self.watched
            ]
            if not hits:
                return
            payload = f"{tok} {json.dumps(hits)}"
            if len(payload.encode("utf-8", "surrogatepass")) > MAX_PAYLOAD:
                payload = tok

        async def send() -> None:
            with contextlib.suppress(StorageError, *storage_error_types()):
                await self._send(self.channel, payload)

        task = asyncio.get_running_loop().create_task(send())
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    # --- listening ----------------------------------------------------------------

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        listener = self.listener
        if listener is None or not isinstance(payload, str) or payload.startswith(self._token):
            return
        _, sep, body = payload.partition(" ")
        moved: list[Moved] | None = None
        if sep:
            try:
                moved = []
                for job_id, status, tags, at, *rest in json.loads(body):
                    due = from_us(rest[0]) if rest else None
                    moved.append(
                        Moved(str(job_id), STATUS[status], from_us(at), tuple(tags or ()), due)
                    )
                    self._learn(due)
            except (ValueError, TypeError, KeyError):
                logger.warning("unreadable notification on %s; re-checking", channel)
                moved = None
        else:
            self._recheck()
        try:
            listener(moved)
        except Exception:  # the queue's bug must not kill the listener connection
            logger.exception("PostgreSQL notification listener failed")

    async def _supervise(self) -> None:
        """Keep the listener connection alive; after a reconnect, ask for a re-check."""
        delay = 0.05
        while not self.closed:
            conn = self._listen_conn
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        await self._listen_lost.wait()
                if not self._listen_lost.is_set() and not conn.is_closed():
                    try:  # keepalive: notice a silently dead connection
                        await conn.fetchval("SELECT 1", timeout=5)
                        continue
                    except (Exception, TimeoutError):
                        pass
                logger.warning("PostgreSQL listener connection lost; reconnecting")
                self._listen_conn = None
                conn.terminate()
            try:
                self._listen_conn = await self._connect_listener()
            except (Exception, TimeoutError) as exc:
                logger.debug("listener reconnect failed: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            self._recheck()  # schedules may have been missed too
            listener = self.listener
            if listener is not None:  # notifications may have been missed meanwhile
                try:
                    listener(None)
                except Exception:
                    logger.exception("PostgreSQL notification listener failed")
