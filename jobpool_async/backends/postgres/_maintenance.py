"""Self-vacuum of the PostgreSQL backend: ``VACUUM (ANALYZE)`` of its jobs table in
the background, after enough rows changed, when the server's autovacuum is off
(or when asked to). See :class:`~jobpool_async.backends.postgres.PostgresBackend`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ._connections import close_conn, connect

__all__ = ["ANALYZED_COLUMNS", "VACUUM_COST_DELAY_MS", "VACUUM_MIN_CHANGES", "Vacuum"]

logger = logging.getLogger("jobpool_async.postgres")

#: Rows changed between the VACUUMs a self-vacuuming backend runs (at least).
VACUUM_MIN_CHANGES = 10_000

#: Its VACUUM pauses as autovacuum's does (PostgreSQL's default for autovacuum; a
#: plain VACUUM does not pause): on a big table it takes longer, but leaves the
#: server to the claims. With 1,000,000 jobs stored, claims ran at 90% of the
#: empty-store rate with the pauses (benchmarks/results/full-scale.json).
VACUUM_COST_DELAY_MS = 2

#: The columns its ``ANALYZE`` reads: those the backend's queries filter on, whose
#: statistics choose their plans (``status``; ``job_type``, which carries the
#: ``jobs_type`` statistics of the indexed type prefix; the tags, for lists and claims
#: by tag; the times of listing pages, cleanup and promotion). The others (payloads,
#: results, messages, ids found through the unique key, the assignee found through
#: its prefix) never pick a plan, and the index expressions that a full ``ANALYZE``
#: also reads all belong to partial indexes, whose statistics the planner does not
#: use. Statistics of all 23 columns cost half the server CPU of the self-vacuum of a
#: 10,000-job table: 57-76 ms against 29-30 ms, 7% of the CPU of draining those jobs
#: (benchmarks/results/pg-session10.md).
ANALYZED_COLUMNS = (
    "status", "job_type", "tags", "tag_keys", "created_at", "finalized_at", "wait_until"
)  # fmt: skip


class Vacuum:
    """Counts the rows a backend changed (each leaves a dead row version) and, when
    ``enabled``, vacuums ``table`` after every :data:`VACUUM_MIN_CHANGES` of them (or
    2% of the table, if more), on a connection of its own."""

    def __init__(self, dsn: str, connect_timeout: float, application_name: str, table: str):
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._application_name = application_name
        self._t = table
        #: Whether to vacuum (decided when the backend opens).
        self.enabled = False
        self._changed = 0
        self._vacuum_after = VACUUM_MIN_CHANGES
        self._vacuum_task: asyncio.Task[None] | None = None
        #: Set when the backend closes: no VACUUM starts after that.
        self.closed = False
        #: VACUUM runs completed (for tests and monitoring).
        self.runs = 0

    def changed_rows(self, count: int) -> None:
        """Count rows changed (dead versions made); start a VACUUM when enough are."""
        if not self.enabled or count <= 0:
            return
        self._changed += count
        if self._changed >= self._vacuum_after and self._vacuum_task is None and not self.closed:
            self._changed = 0
            self._vacuum_task = asyncio.get_running_loop().create_task(self._vacuum())

    async def stop(self) -> None:
        """Stop a VACUUM under way."""
        task, self._vacuum_task = self._vacuum_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _vacuum(self) -> None:
        """``VACUUM (ANALYZE)`` the jobs table (statistics of :data:`ANALYZED_COLUMNS`) on a
        connection of its own (not the pool's: it may take a while on a big table, and
        VACUUM cannot run in a transaction)."""
        try:
            conn = await connect(self._dsn, self._connect_timeout, self._application_name)
            try:
                await conn.execute(f"SET vacuum_cost_delay = '{VACUUM_COST_DELAY_MS}ms'")
                columns = ", ".join(ANALYZED_COLUMNS)
                await conn.execute(f"VACUUM (ANALYZE) {self._t} ({columns})")
                rows = await conn.fetchval(
                    "SELECT reltuples FROM pg_class WHERE oid = $1::regclass", self._t
                )
                self._vacuum_after = max(VACUUM_MIN_CHANGES, int((rows or 0) * 0.02))
                self.runs += 1
            finally:
                await close_conn(conn)
        except asyncio.CancelledError:
            raise
        except (Exception, TimeoutError) as exc:  # housekeeping: never fail a caller
            logger.warning("VACUUM of %s failed: %s", self._t, exc)
        finally:
            self._vacuum_task = None
