"""asyncpg connections of the PostgreSQL backend: which errors mean a connection is
lost, how a dead one is given back, and the plain connections made outside the pool
(the listener's, a VACUUM's)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING

try:
    import asyncpg

    HAVE_ASYNCPG = True
except ImportError:  # pragma: no cover - exercised in a subprocess test
    HAVE_ASYNCPG = False

if TYPE_CHECKING:
    from asyncpg import Connection, Pool, Record
    from asyncpg.pool import PoolConnectionProxy

INSTALL_HINT = "PostgresBackend needs asyncpg: pip install 'jobpool_async[postgres]'"


def utc(value: datetime | None) -> datetime | None:
    """A timestamp read back, timezone-aware: asyncpg decodes PostgreSQL's ±infinity
    (how it stores ``datetime.min``/``datetime.max`` in UTC) as *naive*
    ``datetime.min``/``datetime.max``; every other value comes back in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def alive(conn: PoolConnectionProxy[Record]) -> bool:
    """Whether a connection kept between calls is still usable. When its socket
    closes, asyncpg takes the connection back into the pool and detaches the proxy,
    whose every method then raises ``InterfaceError``."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


async def discard(pool: Pool, conn: PoolConnectionProxy[Record]) -> None:
    """Give back a connection that failed at the connection level: closed first,
    so the pool opens a fresh one in its place."""
    with contextlib.suppress(Exception):
        if alive(conn):
            conn.terminate()
        await pool.release(conn)


async def no_reset(conn: Connection) -> None:
    """Pool release hook: this backend keeps no session state, so skip ``RESET ALL``.

    asyncpg still rolls back any transaction left open before calling it.
    """


async def connect(dsn: str, connect_timeout: float, application_name: str) -> Connection:
    """A connection of its own, outside the pool (the listener's, a VACUUM's)."""
    conn: Connection = await asyncpg.connect(
        dsn, timeout=connect_timeout, server_settings={"application_name": application_name}
    )
    return conn


async def close_conn(conn: Connection) -> None:
    """Close ``conn``, or terminate it if that does not finish within 5 seconds."""
    try:
        await asyncio.wait_for(conn.close(), 5)
    except Exception:
        conn.terminate()


#: Errors that mean the connection itself is gone or unusable (see ``_call``).
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    (
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        asyncpg.PostgresConnectionError,
        asyncpg.AdminShutdownError,
        asyncpg.CrashShutdownError,
        asyncpg.CannotConnectNowError,
        OSError,
    )
    if HAVE_ASYNCPG
    else ()
)


def storage_error_types() -> tuple[type[BaseException], ...]:
    """The errors a storage call may raise that become a ``StorageError``."""
    return (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        OSError,
        TimeoutError,
    )
