"""The PostgreSQL backend's class: the contract's calls, each one statement (or one
transaction) on a pooled connection. The statements are built in ``_statements``,
the schema in ``_schema``, notifications in ``_notifications``, self-vacuum in
``_maintenance``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import random
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

from .._sql import (
    CLAIMED_FIELDS,
    JOB,
    JOB_COLUMNS,
    STATUS,
    JobColumns,
    in_list,
    not_moved,
    read_job,
    set_clause,
)
from ..base import (
    ACTIVE,
    ELIGIBLE,
    LEASE_EXPIRED,
    RELEASE,
    ApplyOutcome,
    Backend,
    Change,
    DuplicateJobError,
    Job,
    JobPoolError,
    JobsNotFinalError,
    JobState,
    JobStatus,
    Lease,
    Listener,
    ListQuery,
    Moved,
    Refill,
    Selection,
    SelectOutcome,
    StorageError,
    Transition,
    aggregate,
    check_seconds,
    has_history,
    refill_limit,
)
from ._connections import (
    CONNECTION_LOST,
    HAVE_ASYNCPG,
    INSTALL_HINT,
    alive,
    discard,
    no_reset,
    storage_error_types,
    utc,
)
from ._maintenance import Vacuum
from ._notifications import COMMITTED, MAX_PAYLOAD, Notifications, us
from ._schema import StoreSchema
from ._statements import (
    ACTIVE_IN,
    ASSIGNEE_PREFIX,
    COPY_COLUMNS,
    COPY_INSERT,
    FINAL_IN,
    ID_ORDER,
    LARGE_INSERT,
    MOVED_AT,
    MOVED_ID,
    MOVED_STATUS,
    MOVED_TAGS,
    MOVED_WAIT,
    REFILL_START,
    TYPE_PREFIX,
    WAITING,
    Statements,
    busy_or_idle,
    bytea_parts,
    copy_records,
    key,
    micros_array,
    quote_ident,
    tag_key,
    text_array,
)

if HAVE_ASYNCPG:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy as _PoolConnectionProxy

if TYPE_CHECKING:
    from asyncpg import Connection, Pool, Record
    from asyncpg.pool import PoolConnectionProxy

__all__ = ["LOST_CLAIM_MESSAGE", "PROBE_INTERVAL", "PostgresBackend"]

logger = logging.getLogger("jobpool_async.postgres")
_T = TypeVar("_T")

#: Seconds between a claim's looks for waiting jobs that came due when this process
#: knows of none (notifications tell it of other processes' schedules; this covers
#: notifications lost with the listener connection).
PROBE_INTERVAL = 1.0

#: ``error_message`` of jobs given back after a claim's answer was lost.
LOST_CLAIM_MESSAGE = "claimed, but the answer was lost with the database connection"

_ASSIGNED = JobStatus.RUNNING  # every claim's status (ASSIGN moves all sources there)
#: The statuses in ``jobs_idle_status``, in ``list_jobs`` part order.
_IDLE_STATUSES = sorted(s for s in JobStatus if s not in ACTIVE)

#: Runs of an insert that PostgreSQL aborts as part of a deadlock (see ``_inserting``).
INSERT_ATTEMPTS = 3
#: Seconds an insert aborted as part of a deadlock waits before running again, times
#: the runs so far (a random share of it, at least a fifth: see ``_inserting``).
INSERT_BACKOFF = 0.05


def _job(
    r: Record | Sequence[Any],
    c: JobColumns,
    status: JobStatus,
    assignee_id: str,
    assigned_at: datetime | None,
) -> Job:
    """A job from a row holding its columns at ``c`` (built once per select list), and
    the three columns a claim sets (given: a claim knows them, a read selects them)."""
    return read_job(r, c, status, assignee_id, utc(assigned_at), utc, list)


_new_object = object.__new__
if CLAIMED_FIELDS != (  # the order _claimed unpacks
    "id", "job_type", "job_definition", "tags", "created_at", "started_at", "finalized_at",
    "error_message", "result", "retry_count", "last_retry_at", "scheduled_at", "priority",
    "max_attempts", "attempts",
):  # fmt: skip
    raise RuntimeError("CLAIMED_FIELDS changed: update _claimed")


def _claimed(r: Record | Sequence[Any], start: int, assignee_id: str, now: datetime) -> Job:
    """A job a claim returned, its :data:`CLAIMED_COLUMNS` from column ``start`` (its
    ``started_at`` NULL when it is the claim's ``now``).

    A deliberate twin of ``read_job`` for the claim, the hot path (one call per
    drained job): one slice of the row instead of 15 subscripts by name, and each
    field set on a bare instance (as ``Job.copy`` does) instead of ``Job(...)`` with
    18 keyword arguments (drain hand loop, client instructions per job 210,530 ->
    201,531). ``test_a_claimed_job_reads_as_a_stored_one`` fails if a field is left out."""
    row = r[start : start + 15]
    (job_id, job_type, definition, tags, created, started, finalized, message, result,
     retries, last_retry, scheduled, priority, max_attempts, attempts) = row  # fmt: skip
    job: Job = _new_object(Job)
    job.id = job_id
    job.job_type = job_type
    job.job_definition = definition
    job.tags = list(tags)
    job.status = _ASSIGNED
    job.created_at = created if created.tzinfo is not None else created.replace(tzinfo=UTC)
    job.started_at = now if started is None else utc(started)
    job.finalized_at = None if finalized is None else utc(finalized)
    job.error_message = message
    job.result = result
    job.retry_count = retries
    job.last_retry_at = None if last_retry is None else utc(last_retry)
    job.assignee_id = assignee_id
    job.assigned_at = now
    job.scheduled_at = None if scheduled is None else utc(scheduled)
    job.priority = priority
    job.max_attempts = max_attempts
    job.attempts = attempts
    return job


#: Releases of connections acquired for callers that gave up (kept until done).
_releasing: set[asyncio.Task[None]] = set()


def _give_back(pool: Pool, acquiring: asyncio.Task[PoolConnectionProxy[Record]]) -> None:
    """Done callback of an acquire whose caller gave up on it: its connection, if it
    got one, goes back to the pool."""
    if acquiring.cancelled() or acquiring.exception() is not None:
        return
    task = asyncio.get_running_loop().create_task(_release(pool, acquiring.result()))
    _releasing.add(task)
    task.add_done_callback(_releasing.discard)


async def _release(pool: Pool, conn: PoolConnectionProxy[Record]) -> None:
    with contextlib.suppress(Exception):
        await pool.release(conn)


def _read_job(r: Record) -> Job:
    """A job from a row of :data:`JOB_COLUMNS`."""
    c = JOB
    return _job(r, c, STATUS[r[c.status]], r[c.assignee_id], r[c.assigned_at])


# Lock ordering: every statement that may wait for row locks on several jobs takes
# them in ``id_key`` order, so two batch calls never deadlock: ``apply`` walks its
# input sorted by key in a join that can only be a nested loop over it (see
# ``_statements.LOCK_ORDER``); selections and deletes lock first with a
# ``SELECT … ORDER BY id_key FOR UPDATE`` CTE that the UPDATE/DELETE waits for (so do
# a promotion and the give-back of lost claims, which find their jobs by due time
# and by nonce: ``Statements.key_ordered_update``). Claims use SKIP LOCKED and never
# wait at all. An insert waits for another's uncommitted row of one of its ids, in
# input order (the order its rows are written, which claims walk): two inserts of
# the same ids in other orders may deadlock, and are run again (``_inserting``).


class PostgresBackend(Backend):
    """Jobs in a PostgreSQL database, shared by any number of processes and hosts.

    ``dsn`` is a libpq connection string or ``postgresql://`` URL. ``schema`` names
    the PostgreSQL schema holding this queue's tables (several queues may share one
    database). ``pool_min_size``/``pool_max_size`` size the connection pool (up to 4
    of its connections, and at most ``pool_max_size - 2``, are kept between calls);
    ``command_timeout`` (seconds) bounds each statement.

    ``self_vacuum``: every claim and move leaves a dead row version behind, and dead
    entries at the head of the eligible-jobs index slow every claim until VACUUM
    removes them. The schema asks autovacuum to run early on the jobs table, but a
    server may have autovacuum off. With ``None`` (the default) this backend then
    runs ``VACUUM (ANALYZE)`` on its jobs table itself, in the background, after
    every :data:`VACUUM_MIN_CHANGES` rows it changed (or 2% of the table, if more),
    throttled as autovacuum is (:data:`VACUUM_COST_DELAY_MS`); ``True`` does so even
    with autovacuum on, ``False`` never.
    """

    default_poll_interval: ClassVar[float | None] = 1.0
    #: Its calls await asyncpg's futures (and a pool's acquire, in a task of its own:
    #: see :meth:`_take`), under no ``asyncio.timeout`` of their own task.
    _carry_calls = True
    #: (``Backend._takes_no_tags``: an insert only reads a checked copy's tags, into
    #: the statement's arguments and the notification; no copy is kept or handed out.)
    _takes_no_tags = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "jobpool",
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        command_timeout: float | None = None,
        connect_timeout: float = 10.0,
        self_vacuum: bool | None = None,
    ) -> None:
        if not HAVE_ASYNCPG:
            raise ImportError(INSTALL_HINT)
        if not isinstance(dsn, str) or not dsn:
            raise ValueError("dsn must be a non-empty str")
        if not isinstance(schema, str) or not schema:
            raise ValueError("schema must be a non-empty str")
        if "\x00" in schema or len(schema.encode()) > 63:
            raise ValueError(f"schema must be at most 63 bytes without NUL, got {schema!r}")
        for name, value in (("pool_min_size", pool_min_size), ("pool_max_size", pool_max_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be int, got {type(value).__name__}")
        if pool_min_size < 0 or pool_max_size < 1 or pool_min_size > pool_max_size:
            raise ValueError(
                f"need 0 <= pool_min_size <= pool_max_size and pool_max_size >= 1, "
                f"got {pool_min_size}, {pool_max_size}"
            )
        if command_timeout is not None:
            command_timeout = check_seconds(command_timeout, "command_timeout")
        connect_timeout = check_seconds(connect_timeout, "connect_timeout")
        if self_vacuum is not None and not isinstance(self_vacuum, bool):
            raise TypeError(f"self_vacuum must be bool or None, got {type(self_vacuum).__name__}")
        self._dsn = dsn
        self.schema = schema
        self._self_vacuum = self_vacuum
        self._pool_min = pool_min_size
        self._pool_max = pool_max_size
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._s = quote_ident(schema)
        self._t = f"{self._s}.jobs"
        digest = hashlib.sha256(schema.encode()).hexdigest()
        #: NOTIFY channel of this schema (a plain identifier, well under 63 bytes).
        self.channel = f"jobpool_{digest[:24]}"
        #: ``application_name`` of this backend's connections (see ``pg_stat_activity``).
        self.application_name = f"jobpool_async:{schema}".encode()[:63].decode(errors="ignore")
        lock_key = int.from_bytes(bytes.fromhex(digest[24:40]), "big", signed=True)
        self._tables = StoreSchema(schema, lock_key)
        #: Tags this instance's notifications so its own listener ignores them.
        self._token = secrets.token_hex(8)
        self._sql = Statements(schema, self.channel, self._token)
        self._vacuum = Vacuum(dsn, connect_timeout, self.application_name, self._t)
        self._notes = Notifications(
            dsn=dsn,
            connect_timeout=connect_timeout,
            application_name=self.application_name,
            channel=self.channel,
            token=self._token,
            **self._weak_callbacks(),
        )
        self._pool: Pool | None = None
        #: Pool connections kept between single-statement calls (see :meth:`_fetch`).
        self._hot: list[PoolConnectionProxy[Record]] = []
        #: How many: at most 4, and always 2 left to the pool (transactions, vacuum).
        self._keep = max(0, min(4, pool_max_size - 2))
        self._closed = False
        self._opened = False
        self._claims = 0
        #: Nonces of claims that failed and may have committed (see :meth:`claim`).
        self._orphans: list[str] = []
        #: The earliest time a waiting job comes due, as far as this process knows
        #: (from its own writes and from notifications), and when it last looked.
        self._next_due: datetime | None = None
        self._probed_at = float("-inf")
        self._probe_now = True
        self._learned = 0  # times _learn was told a due time (see _promote)

    def __repr__(self) -> str:
        return f"PostgresBackend(schema={self.schema!r})"

    @property
    def vacuuming(self) -> bool:
        """Whether this backend vacuums its table (decided at open, see the class doc)."""
        return self._vacuum.enabled

    @property
    def vacuum_runs(self) -> int:
        """VACUUM runs completed by this backend (for tests and monitoring)."""
        return self._vacuum.runs

    # --- errors -------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        if self._pool is None:
            raise StorageError(f"PostgreSQL store {self.schema!r} is not open")
        try:
            yield
        except JobPoolError:
            raise
        except storage_error_types() as exc:
            raise StorageError(f"PostgreSQL {what} failed: {type(exc).__name__}: {exc}") from exc

    # --- opening, schema, closing -------------------------------------------------

    async def open(self) -> None:
        if self._opened:
            return
        if self._closed:
            raise StorageError("this PostgresBackend was closed; make a new one")
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._pool_min,
                max_size=self._pool_max,
                command_timeout=self._command_timeout,
                timeout=self._connect_timeout,
                reset=no_reset,
                server_settings={
                    # Every statement here has an index path. A plan cached while the
                    # table was small (or its statistics stale) could otherwise keep a
                    # sequential scan after it grows, until the next ANALYZE.
                    "enable_seqscan": "off",
                    # ...which makes any unavoidable full scan look so costly that the
                    # JIT compiler would start (130 ms for a 5-row stats query): no JIT.
                    "jit": "off",
                    "application_name": self.application_name,
                },
            )
            async with self._pool.acquire() as conn:
                await self._tables.migrate(conn)
                self._vacuum.enabled = self._self_vacuum is True or (
                    self._self_vacuum is None
                    and not await conn.fetchval("SELECT current_setting('autovacuum') = 'on'")
                )
            if self.vacuuming and self._self_vacuum is None:
                logger.info("autovacuum is off on the server: %r vacuums its own table", self)
            await self._notes.open()
        except BaseException as exc:
            await self._shutdown()
            if isinstance(exc, JobPoolError | asyncio.CancelledError):
                raise
            if isinstance(exc, storage_error_types()):
                raise StorageError(
                    f"cannot open PostgreSQL store {self.schema!r}: {type(exc).__name__}: {exc}"
                ) from exc
            raise
        self._opened = True

    async def close(self) -> None:
        self._closed = True
        self._vacuum.closed = True
        self._notes.close()
        await self._shutdown()

    async def _shutdown(self) -> None:
        await self._notes.stop()
        await self._vacuum.stop()
        pool, self._pool = self._pool, None
        hot, self._hot = self._hot, []
        if pool is not None:
            for kept in hot:
                with contextlib.suppress(Exception):
                    await pool.release(kept)
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (Exception, asyncio.CancelledError):
                pool.terminate()
                raise

    async def _fetch(self, sql: str, *args: Any, idempotent: bool = False) -> list[Record]:
        """``fetch`` through :meth:`_call`."""
        rows: list[Record] = await self._call(lambda c: c.fetch(sql, *args), idempotent)
        return rows

    async def _call(
        self, run: Callable[[PoolConnectionProxy[Record]], Awaitable[_T]], idempotent: bool
    ) -> _T:
        """``run(connection)`` on a connection kept between calls (else one from the
        pool), keeping it afterwards: the pool's acquire and release measured about
        60 µs of CPU per call here, a quarter of a whole complete-and-refill call's
        client work.

        A kept or pooled connection may have died since its last use (the server
        restarted, failed over, or ended it with ``pg_terminate_backend``). One found
        dead is dropped unused; one that fails with an error raised before anything
        was sent (asyncpg's ``InternalClientError``, or a plain ``InterfaceError``) is
        dropped and the call run again on another (as many times as the pool has
        connections, plus one: none of those attempts ran anything). A connection
        lost after the statement was sent is dropped too, and the call run once more
        only if ``idempotent`` (it may have committed). Other failures give the
        connection back to the pool as it is.
        """
        attempts = 0
        while True:
            pool = self._pool
            if pool is None:
                raise StorageError(f"PostgreSQL store {self.schema!r} is not open")
            conn = await self._take(pool)
            try:
                out = await run(conn)
            except CONNECTION_LOST as exc:
                await discard(pool, conn)
                attempts += 1
                unsent = isinstance(exc, asyncpg.InternalClientError) or (
                    type(exc) is asyncpg.InterfaceError
                )
                if (unsent and attempts <= self._pool_max + 1) or (idempotent and attempts == 1):
                    logger.info("retrying a call whose connection was lost: %r", exc)
                    continue
                raise
            except BaseException:
                await pool.release(conn)
                raise
            if self._pool is pool and len(self._hot) < self._keep:
                self._hot.append(conn)
            else:
                await pool.release(conn)
            return out

    async def _take(self, pool: Pool) -> PoolConnectionProxy[Record]:
        """A kept connection that is still open, else one from the pool (which
        replaces the connections it finds closed), acquired in a task of its own.

        The queue drives this backend's calls in its callers' tasks
        (``_carry_calls``), so nothing here may await under an ``asyncio.timeout``
        entered in the call's task: the timeout would cancel the caller's task, and a
        cancellation of the caller would never reach it. asyncpg connects under one
        (``connect_timeout``), and a pool's ``acquire`` may connect (a holder not yet
        connected, or one whose connection died): so ``acquire`` runs in a task. The
        other such timeout, the protocol's wait for a cancelled statement before the
        next one, is not met: a connection is kept only after a call succeeded on it,
        and the pool gives one back only after that wait (in ``release``'s own task).
        """
        while self._hot:
            conn = self._hot.pop()
            if alive(conn):
                return conn
            await discard(pool, conn)
        acquiring = asyncio.ensure_future(pool.acquire())  # (an awaitable: a task)
        try:
            return await acquiring
        except BaseException:
            # (the awaiting task cancelled as the acquire finished: not leaked)
            acquiring.add_done_callback(functools.partial(_give_back, pool))
            raise

    # --- notifications ------------------------------------------------------------

    def set_listener(self, listener: Listener | None) -> None:
        self._notes.listener = listener

    def _weak_callbacks(self) -> dict[str, Any]:
        """The listener's callbacks into this backend, holding it by a weak reference:
        bound methods would make a cycle (backend -> notifications -> backend), and a
        closed, dropped backend would wait for the cyclic collector to be freed."""
        ref = weakref.ref(self)

        async def send(channel: str, payload: str) -> None:
            backend = ref()
            if backend is not None:
                await backend._notify(channel, payload)

        def on_due(due: datetime | None) -> None:
            backend = ref()
            if backend is not None:
                backend._learn(due)

        def on_recheck() -> None:
            backend = ref()
            if backend is not None:
                backend._recheck()

        return {"send": send, "on_due": on_due, "on_recheck": on_recheck}

    async def _notify(self, channel: str, payload: str) -> None:
        """``NOTIFY`` on ``channel`` (through :meth:`_call`)."""
        await self._call(lambda c: c.execute("SELECT pg_notify($1, $2)", channel, payload), True)

    async def watch(self, job_id: str, waiting: bool) -> None:
        """Tell the other processes on this store that a ``wait_for`` here starts
        (``waiting``) or stops waiting for ``job_id``: while it waits, they notify
        every move of that job they make (normally a process moving a job it claimed
        itself notifies nobody). Best effort: until they have heard, the waiter polls."""
        payload = self._notes.watch_payload(job_id, waiting)
        if payload is None:
            return  # an id this long is only polled for
        with self._errors("notify"):
            await self._notify(self._notes.watch_channel, payload)

    def _recheck(self) -> None:
        """Something may have been missed: look for due jobs at the next claim."""
        self._probe_now = True

    def _changed_rows(self, count: int) -> None:
        self._vacuum.changed_rows(count)

    # --- the contract -------------------------------------------------------------

    async def insert(self, jobs: Sequence[Job]) -> None:
        records = copy_records(jobs) if len(jobs) >= COPY_INSERT else None
        if records is not None:
            # (every job of a COPY is due now and untagged: one entry, the first job's)
            payload = self._enqueue_payload(jobs[:1], self._token)

            async def run(conn: PoolConnectionProxy[Record]) -> None:
                # COPY cannot notify: the NOTIFY follows it in the same transaction
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        "jobs", records=records, columns=COPY_COLUMNS, schema_name=self.schema
                    )
                    await conn.execute(self._sql.notify, payload)

        else:
            statement = self._insert_statement(jobs, self._token)
            if statement is None:
                return

            async def run(conn: PoolConnectionProxy[Record]) -> None:
                await conn.execute(*statement)

        with self._errors("insert"):
            assert self._pool is not None
            try:
                await self._inserting(lambda: self._call(run, False))
            except (asyncpg.UniqueViolationError, asyncpg.ExclusionViolationError):
                raise await self._duplicate(jobs, None) from None
        self._learn_jobs(jobs)

    @staticmethod
    async def _inserting(run: Callable[[], Awaitable[_T]]) -> _T:
        """``run()``, an insert, run again when PostgreSQL aborts it as part of a
        deadlock (up to :data:`INSERT_ATTEMPTS` runs). An insert waits for another
        transaction's uncommitted row of one of its ids, in the order it writes its
        rows (input order, which claims walk, not key order), so two inserts of the
        same ids in other orders can deadlock. The aborted statement changed nothing;
        run again, it finds the other's rows committed (a duplicate, or skipped).

        It waits a little first: the other insert, woken by the abort, may not have
        run yet (a busy machine). Run again at once, this one could take ids the other
        still has to write and deadlock with it again; a third time, its caller got a
        StorageError (1 in 10 runs of test_inserts_of_the_same_ids_in_opposite_orders_
        survive_a_deadlock on a loaded machine, none in 80 with the wait)."""
        attempt = 1
        while True:
            try:
                return await run()
            except asyncpg.DeadlockDetectedError:
                if attempt >= INSERT_ATTEMPTS:
                    raise
                logger.info("an insert was aborted as part of a deadlock: running it again")
                await asyncio.sleep(random.uniform(0.2, 1.0) * INSERT_BACKOFF * attempt)
                attempt += 1

    def check_connection(self, connection: object) -> None:
        if not isinstance(connection, asyncpg.Connection | _PoolConnectionProxy):
            raise TypeError(
                "connection must be an asyncpg connection (asyncpg.connect() or a pool's "
                f"acquire()), got {type(connection).__name__}"
            )

    async def insert_in(
        self, jobs: Sequence[Job], connection: object, *, ignore: bool = False
    ) -> list[str]:
        """Insert with the caller's connection, in a savepoint of its transaction.

        The rows exist only if the caller's transaction commits, and the enqueue
        notification (``NOTIFY`` is transactional) is delivered then, to every
        process, this one included: unlike :meth:`insert`'s, it does not carry this
        backend's token, since the queue cannot wake its streams before the commit.
        A duplicate id rolls back the savepoint only: the caller's transaction goes on.
        With ``ignore``, ids that exist are skipped. Returns the ids inserted.
        """
        self.check_connection(connection)
        conn = cast("Connection", connection)
        statement = self._insert_statement(jobs, COMMITTED, ignore=ignore)
        if statement is None:
            return []
        with self._errors("insert"):

            async def insert() -> list[Record]:
                async with conn.transaction():  # a savepoint inside the caller's transaction
                    return await conn.fetch(*statement)

            try:
                rows = await self._inserting(insert)
            except (asyncpg.UniqueViolationError, asyncpg.ExclusionViolationError):
                raise await self._duplicate(jobs, conn) from None
        if ignore:
            inserted = set(rows[0][0] or ())
            return [job.id for job in jobs if job.id in inserted]
        return [job.id for job in jobs]

    def _insert_statement(
        self, jobs: Sequence[Job], token: str, *, ignore: bool = False
    ) -> tuple[Any, ...] | None:
        """The insert of ``jobs`` (SQL and arguments), or ``None`` when there are none.

        Its notification payload starts with ``token``: a listener ignores its own.
        With ``ignore``, ids that exist are skipped and the statement returns the ids
        it inserted.
        """
        if not jobs:
            return None
        flat: list[str] = []
        starts: list[int] = []
        ends: list[int] = []
        for job in jobs:
            starts.append(len(flat) + 1)
            flat.extend(job.tags)
            ends.append(len(flat))
        payload = self._enqueue_payload(jobs, token)
        new = not any(has_history(j) for j in jobs)
        # A column of only defaults is sent as NULL (``unnest`` pads it, the statement
        # fills in the default): asyncpg checks the type of every array element, which
        # was a third of an enqueue's client time for these four columns.
        # Ids, types, times and texts as text literals, the definitions as one bytea
        # (see ``_statements``'s PARAMETERS).
        blob, def_ends, def_lengths = bytea_parts([j.job_definition for j in jobs])
        args: list[Any] = [
            text_array([j.id for j in jobs]),
            text_array([j.job_type for j in jobs]),
            blob,
            flat,
            starts if flat else None,
            ends if flat else None,
            micros_array([j.created_at for j in jobs]),
        ]
        if new:
            messages = [j.error_message for j in jobs]
            assignees = [j.assignee_id for j in jobs]
            args += [
                text_array(messages) if any(messages) else None,
                text_array(assignees) if any(assignees) else None,
            ]
        else:
            args += [
                [j.started_at for j in jobs],
                [j.finalized_at for j in jobs],
                [j.error_message for j in jobs],
                [j.result for j in jobs],
                [j.retry_count for j in jobs],
                [j.last_retry_at for j in jobs],
                [j.assignee_id for j in jobs],
                [j.assigned_at for j in jobs],
                [j.scheduled_at for j in jobs],
                [j.priority for j in jobs],
                [j.max_attempts for j in jobs],
            ]
        args += [payload, [tag_key(tag) for tag in flat], def_ends, def_lengths]
        return (self._sql.insert[new, ignore, len(jobs) >= LARGE_INSERT], *args)

    def _enqueue_payload(self, jobs: Sequence[Job], token: str) -> str:
        """The notification payload of an insert of ``jobs``, starting with ``token``
        (a listener ignores its own); learns their schedules (see :meth:`_learn`)."""
        # One entry per tag set of jobs due now, and per tag set of scheduled jobs with
        # the earliest time (listeners wake then, not now: SPEC §8.2).
        later: dict[tuple[str, ...], datetime] = {}
        for job in jobs:
            if job.scheduled_at is not None:
                key = tuple(job.tags)
                if key not in later or job.scheduled_at < later[key]:
                    later[key] = job.scheduled_at
                self._learn(job.scheduled_at)
        now_due = {tuple(j.tags): None for j in jobs if j.scheduled_at is None}
        pending = JobStatus.INITIAL_PENDING.value
        entries: list[list[Any]] = [["", pending, list(ts), None] for ts in now_due]
        entries += [["", pending, list(ts), None, us(at)] for ts, at in later.items()]
        payload = token + " " + json.dumps(entries, separators=(",", ":"))
        return token if len(payload.encode()) > MAX_PAYLOAD else payload

    async def _duplicate(self, jobs: Sequence[Job], conn: Connection | None) -> DuplicateJobError:
        """The error for an insert refused by the unique id index: names the first id of
        ``jobs`` now stored, as seen by ``conn`` (the caller's) or else the pool."""
        sql = f"SELECT id FROM {self._t} WHERE {self._sql.id_match('', '$1')}"
        ids = [j.id for j in jobs]
        existing = await (
            conn.fetch(sql, ids) if conn is not None else self._fetch(sql, ids, idempotent=True)
        )
        found = {r[0] for r in existing}
        dup = next((j.id for j in jobs if j.id in found), None)
        return DuplicateJobError(dup if dup is not None else jobs[0].id)

    def next_due(self) -> datetime | None:
        return self._next_due

    def _learn(self, due: datetime | None) -> None:
        if due is not None:
            self._learned += 1
            if self._next_due is None or due < self._next_due:
                self._next_due = due

    def _learn_jobs(self, jobs: Sequence[Job]) -> None:
        """After an insert committed: its scheduled jobs' earliest time (learned again,
        since a promotion that ran meanwhile may have read the store before the insert
        committed and replaced what was learned before it)."""
        due = [job.scheduled_at for job in jobs if job.scheduled_at is not None]
        if due:
            self._learn(min(due))

    def _should_promote(self, now: datetime) -> bool:
        due = self._next_due
        return (
            (due is not None and due <= now)
            or self._probe_now
            or time.monotonic() - self._probed_at >= PROBE_INTERVAL
        )

    async def _promote(self, now: datetime) -> None:
        """Promote the waiting jobs due at ``now`` (one statement, through the waiting
        index) and read the next due time. It locks them in key order first, as every
        batch here does (the waiting index reads them by due time: a cancel of the
        same jobs could deadlock with it)."""
        t = self._t
        due = f"{WAITING} AND wait_until <= $1::timestamptz"
        sql = f"""
            WITH {self._sql.key_ordered_update("p", due, "wait_until = NULL", "1")}
            SELECT (SELECT count(*) FROM p),
                   (SELECT wait_until FROM {t} WHERE {WAITING} AND wait_until > $1::timestamptz
                    ORDER BY wait_until LIMIT 1)"""
        self._probe_now = False
        self._probed_at = time.monotonic()
        learned = self._learned
        with self._errors("promote"):
            rows = await self._fetch(sql, now, idempotent=True)
        after = utc(rows[0][1])
        if self._learned != learned:  # a due time learned meanwhile (an insert that
            # committed after this statement's snapshot) is not in ``after``: keep it
            known = self._next_due
            if known is not None and (after is None or known < after):
                after = known
        self._next_due = after
        self._changed_rows(int(rows[0][0]))

    async def insert_new(self, jobs: Sequence[Job]) -> list[str]:
        statement = self._insert_statement(jobs, self._token, ignore=True)
        if statement is None:
            return []
        with self._errors("insert"):
            rows = await self._inserting(lambda: self._fetch(*statement))
        self._learn_jobs(jobs)
        inserted = set(rows[0][0] or ())
        return [job.id for job in jobs if job.id in inserted]

    async def claim(
        self, assignee_id: str, tags: Sequence[str], limit: int, now: datetime
    ) -> list[Job]:
        return await self._claim(assignee_id, tags, limit, now)

    async def _claim(
        self,
        assignee_id: str,
        tags: Sequence[str],
        limit: int,
        now: datetime,
        excluding: list[str] | None = None,
    ) -> list[Job]:
        """:meth:`claim`, leaving out the jobs ``excluding`` names (a refill's)."""
        if self._should_promote(now):
            await self._promote(now)
        if self._orphans:
            await self._release_orphans(now)
        assert self._pool is not None
        nonce = self._nonce()
        try:
            with self._errors("claim"):
                rows = await self._fetch(
                    *self._claim_args(assignee_id, tags, limit, now, nonce, excluding)
                )
        except StorageError:
            await self._lost_claim(nonce, now)
            raise
        jobs = [_claimed(r, 0, assignee_id, now) for r in rows if r[0] is not None]
        self._changed_rows(len(jobs))
        if self._notes.watched:
            self._notes.tell([Moved(j.id, _ASSIGNED, j.assigned_at, tuple(j.tags)) for j in jobs])
        if len(jobs) < len(rows):  # SKIPPED: rows updated since the snapshot; again
            jobs += await self._claim_again(assignee_id, tags, limit - len(jobs), now, excluding)
        return jobs

    async def _claim_again(
        self,
        assignee_id: str,
        tags: Sequence[str],
        limit: int,
        now: datetime,
        excluding: list[str] | None = None,
    ) -> list[Job]:
        """A claim for the jobs a claim locked but could not move (see ``SKIPPED``: rows
        another transaction updated after its snapshot). Best effort: those jobs stay
        eligible, so a failure here only leaves them for the stream's next claim."""
        if limit <= 0:
            return []
        logger.debug("a claim skipped rows updated since its snapshot: claiming again")
        try:
            return await self._claim(assignee_id, tags, limit, now, excluding)
        except StorageError:
            return []

    def _nonce(self) -> str:
        self._claims += 1
        return f"{self._token}:{self._claims}"

    def _claim_args(
        self,
        assignee_id: str,
        tags: Sequence[str],
        limit: int,
        now: datetime,
        nonce: str,
        excluding: list[str] | None = None,
    ) -> tuple[Any, ...]:
        sql = self._sql
        if excluding is not None:
            if tags:
                return (
                    sql.claim_tags_excluding,
                    now,
                    assignee_id,
                    limit,
                    nonce,
                    list(tags),
                    excluding,
                )
            return (sql.claim_excluding, now, assignee_id, limit, nonce, excluding)
        if tags:
            return (sql.claim_tags, now, assignee_id, limit, nonce, list(tags))
        return (sql.claim, now, assignee_id, limit, nonce)

    async def _lost_claim(self, nonce: str, now: datetime) -> None:
        """A claim failed: the connection may have died after the commit, before the
        answer came, and then jobs are RUNNING for a claim nobody received. Give them
        back (now, or before the next claim if the server is still away)."""
        self._orphans.append(nonce)
        with contextlib.suppress(StorageError):
            await self._release_orphans(now)

    async def _release_orphans(self, now: datetime) -> None:
        """Move the jobs of claims whose answer was lost back to eligible (RELEASE)."""
        nonces = list(self._orphans)
        sets = set_clause(RELEASE, now="$2::timestamptz", error_message="$3::text")
        held = f"claimed_by = ANY($1::text[]) AND status IN {in_list(RELEASE.sources)}"
        returning = "id, status, tags, claimed_by, assigned_at, wait_until"
        sql = f"""
            WITH {self._sql.key_ordered_update("moved", held, sets, returning)},
            {self._sql.note("moved")}
            SELECT count(*) FROM moved WHERE (SELECT count(*) FROM note) >= 0"""
        with self._errors("release"):
            assert self._pool is not None
            released = await self._call(
                lambda c: c.fetchval(sql, nonces, now, LOST_CLAIM_MESSAGE), True
            )
        done = set(nonces)
        self._orphans = [n for n in self._orphans if n not in done]
        if released:
            logger.warning("gave back %d job(s) of claims lost with the connection", released)

    async def apply(
        self, changes: Sequence[Change], now: datetime, refill: Refill | None = None
    ) -> ApplyOutcome:
        out = ApplyOutcome()
        if not changes:
            return out
        first = changes[0].transition
        groups: dict[int, list[Change]] = {}  # stays empty when all share ``first``
        for change in changes:
            if change.transition is not first:
                for c in changes:
                    groups.setdefault(id(c.transition), []).append(c)
                break
        results: list[tuple[Sequence[Change], Sequence[Any]]]
        with self._errors("update"):
            assert self._pool is not None
            if refill is None:
                if not groups:
                    results = [(changes, await self._fetch(*self._apply_args(changes, now)))]
                else:
                    results = await self._apply_groups(groups.values(), now, None, "")
            else:
                if self._should_promote(now):
                    await self._promote(now)
                if self._orphans:
                    await self._release_orphans(now)
                nonce = self._nonce()
                try:
                    if not groups:
                        args = self._refill_args(changes, now, refill, nonce)
                        results = [(changes, await self._fetch(*args))]
                    else:
                        results = await self._apply_groups(groups.values(), now, refill, nonce)
                except storage_error_types():
                    await self._lost_claim(nonce, now)
                    raise
            assignee = refill.assignee_id if refill is not None else ""
            unmoved: dict[str, Transition] = {}
            skipped = False
            for group, rows in results:
                moved_ids: set[str] = set()
                at = None
                for r in rows:
                    kind = r[0]
                    if kind == 2:
                        out.claimed.append(_claimed(r, REFILL_START, assignee, now))
                    elif kind == 3:
                        skipped = True
                    else:
                        if kind == 1:  # (4: the previous row's assignment time)
                            at = utc(r[MOVED_AT])
                        tags, status = r[MOVED_TAGS], STATUS[r[MOVED_STATUS]]
                        due = r[MOVED_WAIT] if status in ELIGIBLE else None
                        job_id = r[MOVED_ID]
                        out.moved.append(
                            Moved(job_id, status, at, tuple(tags) if tags else (), due)
                        )
                        self._learn(due)
                        moved_ids.add(job_id)
                if len(moved_ids) < len(group):
                    for c in group:
                        if c.job_id not in moved_ids:
                            unmoved.setdefault(c.job_id, c.transition)
            if unmoved:
                await self._explain_unmoved(unmoved, out)
        self._changed_rows(len(out.moved) + len(out.claimed))
        if self._notes.watched:
            claimed = [Moved(j.id, _ASSIGNED, j.assigned_at, tuple(j.tags)) for j in out.claimed]
            self._notes.tell([*out.moved, *claimed])
        if skipped and refill is not None:
            missing = refill_limit(refill, out.moved) - len(out.claimed)
            named = [c.job_id for c in changes]
            out.claimed += await self._claim_again(
                refill.assignee_id, refill.tags, missing, now, named
            )
        return out

    async def _explain_unmoved(self, unmoved: dict[str, Transition], out: ApplyOutcome) -> None:
        """The errors of jobs an apply did not move: gone, or in a status the transition
        does not leave (read now, after the commit; the statement itself returns only
        what it moved, which keeps the common all-moved case cheaper)."""
        rows = await self._fetch(
            f"SELECT id, status FROM {self._t} WHERE {self._sql.id_match('', '$1')}",
            list(unmoved),
            idempotent=True,
        )
        out.errors.update(not_moved(unmoved, {r[0]: r[1] for r in rows}))

    async def _apply_groups(
        self,
        groups: Iterable[list[Change]],
        now: datetime,
        refill: Refill | None,
        nonce: str,
    ) -> list[tuple[Sequence[Change], Sequence[Any]]]:
        """Changes of several transitions in one transaction (then the refill's claim).

        Every named row is locked first, in key order, as a one-statement apply takes
        them: two such calls naming the same jobs in other orders would otherwise lock
        them group by group and could deadlock."""
        groups = list(groups)
        named = [c.job_id for group in groups for c in group]
        lock = self._sql.lock_ids

        async def run(conn: PoolConnectionProxy[Record]) -> list[Any]:
            results: list[tuple[Sequence[Change], Sequence[Any]]] = []
            async with conn.transaction():
                await conn.execute(lock, named)
                for group in groups:
                    results.append((group, await conn.fetch(*self._apply_args(group, now))))
                if refill is not None:
                    moved = [
                        Moved(r[MOVED_ID], STATUS[r[MOVED_STATUS]], None)
                        for _, rows in results
                        for r in rows
                    ]
                    limit = refill_limit(refill, moved)
                    if limit:
                        # (none of the call's own jobs, as in the one-statement path)
                        claimed = await conn.fetch(
                            *self._claim_args(
                                refill.assignee_id, refill.tags, limit, now, nonce, named
                            )
                        )
                        # as rows of kind 2, and 3 for SKIPPED (see Statements.apply)
                        pad = (2,) + (None,) * (REFILL_START - 1)
                        rows = [(*pad, *r) if r[0] is not None else (3,) for r in claimed]
                        results.append(((), rows))
            return results

        return await self._call(run, False)

    def _refill_args(
        self, changes: Sequence[Change], now: datetime, refill: Refill, nonce: str
    ) -> tuple[Any, ...]:
        head, tail = self._apply_parts(changes, now, True, bool(refill.tags))
        ids = refill.job_ids
        # NULL when every change is the stream's own job (the Worker's case)
        mine = all(c.job_id in ids for c in changes)
        args = (*head, refill.assignee_id, None if mine else list(ids), nonce)
        if refill.tags:
            args = (*args, list(refill.tags))
        return (*args, *self._timed_args(changes), refill.extra, *self._guard_args(changes), *tail)

    def _apply_args(self, changes: Sequence[Change], now: datetime) -> tuple[Any, ...]:
        """The SQL and its arguments: an apply without a refill."""
        head, tail = self._apply_parts(changes, now)
        return (*head, *self._timed_args(changes), *self._guard_args(changes), *tail)

    def _apply_parts(
        self, changes: Sequence[Change], now: datetime, refill: bool = False, tags: bool = False
    ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """The SQL and ``$1``-``$4``, and the last two arguments (the results' end
        offsets and lengths). Ids and messages go as text literals, results as one
        ``bytea`` (see ``_statements``'s PARAMETERS); a column of only NULLs as NULL
        (``unnest`` pads it)."""
        results = [c.result for c in changes]
        messages = [c.error_message for c in changes]
        tail: tuple[str | None, str | None] = (None, None)
        blob = None
        if results.count(None) != len(results):
            blob, ends, lengths = bytea_parts(results)
            tail = (ends, lengths)
        head = (
            # a statement of its own once the first VACUUM (ANALYZE) made statistics
            # (see Statements.apply; later ones change its estimates less)
            self._sql.apply(changes[0].transition, refill, tags, min(self._vacuum.runs, 1)),
            text_array([c.job_id for c in changes]),
            blob,
            None if messages.count(None) == len(messages) else text_array(messages),
            now,
        )
        return head, tail

    @staticmethod
    def _guard_args(changes: Sequence[Change]) -> tuple[Any, ...]:
        """The assignments a ``guarded`` move is for (its compare-and-set), else nothing."""
        if not changes[0].transition.guarded:
            return ()
        return ([c.assigned_at for c in changes],)

    @staticmethod
    def _timed_args(changes: Sequence[Change]) -> tuple[Any, ...]:
        """The arrays of ``scheduled_at`` and default attempt limits of timed moves."""
        transition = changes[0].transition
        if not (transition.schedules or transition.exhausted):
            return ()
        return ([c.scheduled_at for c in changes], [c.max_attempts for c in changes])

    async def apply_selected(
        self,
        transition: Transition,
        selection: Selection,
        now: datetime,
        *,
        report_unmatched: bool = False,
        scheduled_at: datetime | None = None,
    ) -> SelectOutcome:
        t = self._t
        cond, sel_args, ids_at = self._sql.selection(selection, t, 2)
        cond_j = self._sql.selection(selection, "j", 2)[0]
        args: list[Any] = [now, *sel_args]
        sched = "NULL"
        if transition.schedules:
            args.append(scheduled_at)
            sched = f"${len(args)}::timestamptz"
        sets = set_clause(transition, now="$1::timestamptz", scheduled_at=sched)
        sql = f"""
            WITH lk AS (SELECT {t}.id_key FROM {t} WHERE {cond}
                        AND {t}.status IN {in_list(transition.sources)}
                        ORDER BY {t}.id_key FOR UPDATE),
            moved AS (
                UPDATE {t} SET {sets}
                WHERE {cond} AND {t}.status IN {in_list(transition.sources)}
                  AND $1::timestamptz IS NOT NULL AND (SELECT count(*) FROM lk) >= 0
                RETURNING id, status, tags, seq, claimed_by, assigned_at, wait_until),
            {self._sql.note("moved")}
            SELECT 1 AS kind, id, status, tags, seq, assigned_at, wait_until FROM moved
            WHERE (SELECT count(*) FROM note) >= 0"""
        if report_unmatched:
            sql += f"""
            UNION ALL
            SELECT 2, j.id, j.status, NULL::text[], j.seq, NULL::timestamptz, NULL::timestamptz
            FROM {t} j
            WHERE {cond_j} AND j.id NOT IN (SELECT id FROM moved)"""
            if ids_at is not None:
                sql += f"""
            UNION ALL
            SELECT 0, x.id, NULL, NULL::text[], x.ord, NULL::timestamptz, NULL::timestamptz
            FROM unnest(${ids_at}::text[])
                WITH ORDINALITY AS x(id, ord)
            WHERE NOT EXISTS (SELECT 1 FROM {t} e
                              WHERE e.id_key = {key("x.id")} AND e.id = x.id)"""
        with self._errors("update"):
            rows = await self._fetch(sql, *args)
        position = {job_id: i for i, job_id in enumerate(selection.job_ids)}

        def order(r: Record) -> tuple[int, int]:
            pos = position.get(r[1])
            return (0, pos) if pos is not None else (1, r[4])

        out = SelectOutcome()
        moved = sorted((r for r in rows if r[0] == 1), key=order)
        for r in moved:
            status = STATUS[r[2]]
            due = r[6] if status in ELIGIBLE else None
            out.moved.append(Moved(r[1], status, utc(r[5]), tuple(r[3]), due))
            self._learn(due)
        if report_unmatched:
            missing = sorted((r for r in rows if r[0] == 0), key=lambda r: int(r[4]))
            others = sorted((r for r in rows if r[0] == 2), key=order)
            out.missing = list(dict.fromkeys(r[1] for r in missing))
            out.unmatched = list(dict.fromkeys([*out.missing, *(r[1] for r in others)]))
        self._changed_rows(len(out.moved))
        if self._notes.watched:
            self._notes.tell(out.moved)
        return out

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        if not job_ids:
            return []
        with self._errors("read"):
            rows = await self._fetch(
                f"SELECT {JOB_COLUMNS} FROM {self._t} WHERE {self._sql.id_match('', '$1')}",
                list(job_ids),
                idempotent=True,
            )
        by_id = {r[JOB.id]: r for r in rows}
        return [_read_job(r) for i in job_ids if (r := by_id.get(i)) is not None]

    async def oldest_created(self, statuses: frozenset[JobStatus]) -> datetime | None:
        if not statuses:
            return None
        parts = " UNION ALL ".join(
            f"(SELECT created_at FROM {self._t} WHERE status = '{s.value}' AND "
            + busy_or_idle(s)
            + " ORDER BY created_at LIMIT 1)"
            for s in sorted(statuses)
        )
        with self._errors("read"):
            assert self._pool is not None
            value = await self._pool.fetchval(f"SELECT min(created_at) FROM ({parts}) x")
        return utc(value)

    async def list_jobs(self, query: ListQuery) -> list[Job]:
        """One statement walking one index newest first from the cursor (several
        statuses: one walk each, merged); the other filters are checked per row."""
        t = self._t
        args: list[Any] = [query.limit]
        conds: list[str] = []
        if query.before is not None:
            args += [query.before[0], tag_key(query.before[1])]
            conds.append(
                f'created_at <= $2 AND (created_at < $2 OR {ID_ORDER} < $3::text COLLATE "C")'
            )
        if query.job_type is not None:
            args.append(query.job_type)
            n = len(args)
            conds.append(f"{TYPE_PREFIX} = left(${n}::text, 200) AND job_type = ${n}")
        if query.tags:
            args.append(list(query.tags))
            conds.append(self._sql.tag_match("tags", f"${len(args)}"))
        cols = f"{JOB_COLUMNS}, created_at AS c, {ID_ORDER} AS k"
        order = f"ORDER BY created_at DESC, {ID_ORDER} DESC LIMIT $1"
        # Each part reads one index newest first: an idle status jobs_idle_status, idle
        # jobs of a type or with tags jobs_idle_type or jobs_idle_tagged, RUNNING and
        # CANCELLING the active-assignee index (sorted). No index holds every idle job:
        # a list without filters merges one walk per status (a fixed few).
        if query.statuses:
            statuses = sorted(query.statuses)
        elif query.tags or query.job_type is not None:
            statuses = []
        else:
            statuses = _IDLE_STATUSES
        wheres = [f"status = '{s.value}' AND {busy_or_idle(s)}" for s in statuses]
        if not query.statuses:
            if not statuses:
                wheres.append(f"status NOT IN {ACTIVE_IN}")
            wheres.append(f"status IN {ACTIVE_IN}")
        parts = [
            f"SELECT {cols} FROM {t} WHERE " + " AND ".join([w, *conds]) + f" {order}"
            for w in wheres
        ]
        if len(parts) == 1:
            sql = parts[0]
        else:
            sql = " UNION ALL ".join(f"({p})" for p in parts) + " ORDER BY c DESC, k DESC LIMIT $1"
        with self._errors("read"):
            assert self._pool is not None
            rows = await self._pool.fetch(sql, *args)
        return [_read_job(r) for r in rows]

    async def job_states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        if not job_ids:
            return {}
        with self._errors("read"):
            match = self._sql.id_match("", "$1")
            rows = await self._fetch(
                f"SELECT id, status, assigned_at FROM {self._t} WHERE {match}",
                list(job_ids),
                idempotent=True,
            )
        return {r[0]: JobState(STATUS[r[1]], utc(r[2])) for r in rows}

    async def count_by_status(self, tags: Sequence[str]) -> tuple[dict[JobStatus, int], int]:
        sql = f"SELECT status, count(*), COALESCE(sum(retry_count), 0) FROM {self._t}"
        args: list[Any] = []
        if tags:
            sql += f" WHERE {self._sql.tag_match('tags', '$1')}"
            args.append(list(tags))
        sql += " GROUP BY status"
        with self._errors("read"):
            rows = await self._fetch(sql, *args, idempotent=True)
        return {STATUS[r[0]]: int(r[1]) for r in rows}, sum(int(r[2]) for r in rows)

    async def delete(self, selection: Selection) -> int:
        t = self._t
        cond, args, _ = self._sql.selection(selection, "j", 1)
        sql = f"""
            WITH sel AS (SELECT j.id_key, j.id, j.status, j.seq FROM {t} j WHERE {cond}
                         ORDER BY j.id_key FOR UPDATE),
            bad AS (SELECT id, seq FROM sel WHERE status NOT IN {FINAL_IN}),
            del AS (DELETE FROM {t} d USING sel WHERE d.id_key = sel.id_key
                    AND NOT EXISTS (SELECT 1 FROM bad) RETURNING d.id)
            SELECT false AS deleted, id, seq FROM bad
            UNION ALL SELECT true, id, 0 FROM del"""
        with self._errors("delete"):
            rows = await self._fetch(sql, *args)
        bad = [r for r in rows if not r[0]]
        if bad:
            position = {job_id: i for i, job_id in enumerate(selection.job_ids)}
            bad.sort(key=lambda r: (0, position[r[1]]) if r[1] in position else (1, r[2]))
            raise JobsNotFinalError([r[1] for r in bad])
        self._changed_rows(len(rows))
        if self._notes.watched and any(r[1] in self._notes.watched for r in rows):
            self._notes.tell(None)
        return len(rows)

    async def delete_completed_before(self, cutoff: datetime) -> int:
        # Completed by the cutoff: created by then too (jobs_idle_status, walked up to
        # the cutoff), or finalized before its creation time (jobs_completed_early).
        t, done, cut = self._t, f"status = '{JobStatus.COMPLETED.value}'", "$1::timestamptz"
        expired = f"{done} AND finalized_at <= {cut}"
        sql = f"""DELETE FROM {t} WHERE id_key IN (
            SELECT id_key FROM {t} WHERE id_key = ANY(ARRAY(
                SELECT id_key FROM {t} WHERE {expired} AND {busy_or_idle(JobStatus.COMPLETED)}
                    AND created_at <= {cut}
                UNION ALL
                SELECT id_key FROM {t} WHERE {expired} AND finalized_at < created_at))
            AND {expired} ORDER BY id_key FOR UPDATE)"""
        with self._errors("delete"):
            assert self._pool is not None
            status = await self._call(lambda c: c.execute(sql, cutoff), False)
        deleted = int(status.rsplit(" ", 1)[-1])
        self._changed_rows(deleted)
        if self._notes.watched and deleted:
            self._notes.tell(None)  # which ones is not known: a re-check notice
        return deleted

    # --- leases -------------------------------------------------------------------

    async def renew_leases(
        self,
        holder: str,
        renew: Sequence[str],
        release: Sequence[str],
        lease: timedelta,
        now: datetime,
    ) -> None:
        """One statement, timed by the server's clock (``now`` is not used)."""
        l_ = f"{self._s}.leases"
        sql = f"""
            WITH up AS (
                INSERT INTO {l_} (assignee_key, holder, assignee_id, first_seen_at,
                                  renewed_at, expires_at)
                SELECT {key("a")}, $1::text, a, now(), now(), now() + $3::interval
                FROM unnest($2::text[]) AS a
                ON CONFLICT (assignee_key, holder) DO UPDATE
                SET renewed_at = EXCLUDED.renewed_at, expires_at = EXCLUDED.expires_at
                RETURNING 1),
            gone AS (
                DELETE FROM {l_} WHERE holder = $1::text
                  AND assignee_key = ANY(ARRAY(SELECT {key("r")} FROM unnest($4::text[]) r))
                  AND assignee_id = ANY($4::text[])
                RETURNING 1)
            SELECT (SELECT count(*) FROM up), (SELECT count(*) FROM gone)"""
        with self._errors("lease renewal"):
            await self._fetch(sql, holder, list(renew), lease, list(release))

    async def list_leases(self) -> list[Lease]:
        sql = (
            "SELECT assignee_id, holder, first_seen_at, renewed_at, expires_at "
            f"FROM {self._s}.leases"
        )
        with self._errors("read"):
            rows = await self._fetch(sql)
        return aggregate((r[0], r[1], r[2], r[3], r[4]) for r in rows)

    async def rescue_expired(
        self, now: datetime, forget_after: timedelta, max_attempts: int | None = None
    ) -> list[Moved]:
        """One transaction: read the jobs of expired assignees (by the server's clock),
        then move exactly those still as read (a compare-and-set, locking in key order
        like every batch here), notifying other processes in the same statement; then
        forget long-expired records."""
        s, t = self._s, self._t
        prefix = ASSIGNEE_PREFIX.format
        read = f"""
            WITH l AS (SELECT min(assignee_id) AS aid FROM {s}.leases
                       GROUP BY assignee_key HAVING max(expires_at) <= now())
            SELECT 1 AS kind, j.id, j.status, j.assignee_id, j.assigned_at
            FROM l JOIN {t} j ON {prefix("j.assignee_id")} = {prefix("l.aid")}
                 AND j.assignee_id = l.aid AND j.status IN {ACTIVE_IN}
            UNION ALL
            SELECT 2, NULL, NULL, NULL, NULL
            WHERE EXISTS (SELECT 1 FROM {s}.leases WHERE expires_at < now() - $1::interval)"""
        sets = set_clause(LEASE_EXPIRED, now="$5::timestamptz", max_attempts="$6::integer")
        write = f"""
            WITH c AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[],
                                            $4::timestamptz[]) AS c(cid, cst, caid, cat)),
            lk AS (SELECT j.id_key FROM {t} j JOIN c ON j.id_key = {key("c.cid")}
                   AND j.id = c.cid ORDER BY j.id_key FOR UPDATE OF j),
            moved AS (
                UPDATE {t} SET {sets} FROM c
                WHERE {t}.id_key = {key("c.cid")} AND {t}.id = c.cid
                  AND {t}.status = c.cst AND {t}.assignee_id = c.caid
                  AND {t}.assigned_at IS NOT DISTINCT FROM c.cat
                  AND {t}.status IN {in_list(LEASE_EXPIRED.sources)}
                  AND NOT EXISTS (SELECT 1 FROM {s}.leases x
                                  WHERE x.assignee_key = {key(f"{t}.assignee_id")}
                                    AND x.expires_at > now())
                  AND (SELECT count(*) FROM lk) >= 0
                RETURNING {t}.id, {t}.status, {t}.tags, {t}.claimed_by, {t}.assigned_at,
                          {t}.wait_until),
            {self._sql.note("moved")}
            SELECT id, status, tags, assigned_at FROM moved
            WHERE (SELECT count(*) FROM note) >= 0"""
        forget = f"""
            DELETE FROM {s}.leases r WHERE r.expires_at < now() - $1::interval
              AND (EXISTS (SELECT 1 FROM {s}.leases o
                           WHERE o.assignee_key = r.assignee_key AND o.expires_at > now())
                   OR NOT EXISTS (SELECT 1 FROM {t} j
                                  WHERE {prefix("j.assignee_id")} = {prefix("r.assignee_id")}
                                    AND j.assignee_id = r.assignee_id
                                    AND j.status IN {ACTIVE_IN}))"""
        moved: list[Moved] = []
        with self._errors("rescue"):
            assert self._pool is not None
            async with self._pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(read, forget_after)
                jobs = [r for r in rows if r[0] == 1]
                if not rows:
                    return []
                await self._after_rescue_read()
                if jobs:
                    done = await conn.fetch(
                        write,
                        [r[1] for r in jobs],
                        [r[2] for r in jobs],
                        [r[3] for r in jobs],
                        [r[4] for r in jobs],
                        now,
                        max_attempts,
                    )
                    moved = [Moved(r[0], STATUS[r[1]], r[3], tuple(r[2] or ())) for r in done]
                if len(jobs) < len(rows):
                    await conn.execute(forget, forget_after)
        self._changed_rows(len(moved))
        return moved
