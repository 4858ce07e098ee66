"""PostgreSQL backend on asyncpg: many processes and hosts share one queue.

* Tables live in their own PostgreSQL schema (``schema=``), created and versioned
  on :meth:`PostgresBackend.open` under an advisory lock, so several processes may
  open the same store at once.
* Claiming is one ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED LIMIT n)
  RETURNING …`` statement over a partial index of eligible jobs in selection order.
* Every move is a compare-and-set on the current status inside its statement; the
  ``SET`` clauses are compiled from the transition table (``_sql.py``).
* Waking across processes is pushed with ``LISTEN/NOTIFY``: every statement that
  makes jobs eligible, frees slots or cancels sends ``pg_notify`` inside itself, so
  the notification is delivered exactly when the change commits. A dedicated
  listener connection hands the moves to the queue; it reconnects by itself and
  then asks the queue to re-check.
* Leases (SPEC §8.4) live in the ``leases`` table, one row per assignee and holder;
  their times come from the server's ``now()``, so hosts with skewed clocks agree
  on expiry. The table is created in place (``CREATE TABLE IF NOT EXISTS``) when
  a store written before leases existed is opened; older code ignores it, so the
  store version is unchanged.

asyncpg is the optional ``postgres`` extra: ``pip install 'jobpool_async[postgres]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

from .._errors import (
    DuplicateJobError,
    InvalidTransitionError,
    JobNotFoundError,
    JobPoolError,
    JobsNotFinalError,
    StorageError,
)
from .._leases import Lease, aggregate
from .._listing import ListQuery
from .._models import ACTIVE, ELIGIBLE, FINAL, Job, JobStatus, check_seconds, has_history
from .._transitions import ASSIGN, LEASE_EXPIRED, RELEASE, Transition
from ._sql import CLAIMED_COLUMNS, in_list, set_clause
from .base import (
    ApplyOutcome,
    Backend,
    Change,
    JobState,
    Listener,
    Moved,
    Refill,
    Selection,
    SelectOutcome,
    refill_limit,
)

try:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy as _PoolConnectionProxy

    _HAVE_ASYNCPG = True
except ImportError:  # pragma: no cover - exercised in a subprocess test
    _HAVE_ASYNCPG = False

if TYPE_CHECKING:
    from asyncpg import Connection, Pool, Record
    from asyncpg.pool import PoolConnectionProxy

__all__ = ["SCHEMA_VERSION", "VACUUM_COST_DELAY_MS", "VACUUM_MIN_CHANGES", "PostgresBackend"]

logger = logging.getLogger("jobpool_async.postgres")
_T = TypeVar("_T")

#: The schema version this code writes; a store with a newer one is refused.
SCHEMA_VERSION = 4

#: Seconds between a claim's looks for waiting jobs that came due when this process
#: knows of none (notifications tell it of other processes' schedules; this covers
#: notifications lost with the listener connection).
PROBE_INTERVAL = 1.0

#: Rows changed between the VACUUMs a self-vacuuming backend runs (at least).
VACUUM_MIN_CHANGES = 10_000

#: Its VACUUM pauses as autovacuum's does (PostgreSQL's default for autovacuum; a
#: plain VACUUM does not pause): on a big table it takes longer, but leaves the
#: server to the claims. With 1,000,000 jobs stored, claims ran at 90% of the
#: empty-store rate with the pauses (benchmarks/results/full-scale.json).
VACUUM_COST_DELAY_MS = 2

#: ``error_message`` of jobs given back after a claim's answer was lost.
LOST_CLAIM_MESSAGE = "claimed, but the answer was lost with the database connection"

_INSTALL_HINT = "PostgresBackend needs asyncpg: pip install 'jobpool_async[postgres]'"

#: NOTIFY payloads above this many bytes are replaced by a bare "re-check" notice
#: (PostgreSQL's limit is 8000 bytes).
_MAX_PAYLOAD = 7000
#: How many job ids other processes' ``wait_for`` calls may have us watch for.
_MAX_WATCHED = 100_000
#: The token of notifications sent by an insert in the caller's transaction: no
#: backend's own (tokens are hex), so every listener, this process's too, acts on it.
_COMMITTED = "committed"

_COLS = (
    "id, job_type, job_definition, tags, status, created_at, started_at, finalized_at, "
    "error_message, result, retry_count, last_retry_at, assignee_id, assigned_at, "
    "scheduled_at, priority, max_attempts, attempts"
)
_STATUS = {s.value: s for s in JobStatus}
_UTC_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: SQL of a ``timestamptz`` as exact integer microseconds since the epoch (for NOTIFY
#: payloads: JSON has no timestamp type, and a float would lose the microseconds).
_EPOCH_US = "CASE WHEN isfinite({0}) THEN (extract(epoch FROM {0}) * 1000000)::bigint END"
_TAG_KEY_MAX = 256


def tag_key(tag: str) -> str:
    """The indexed form of a tag: itself when short, else its SHA-256 (B-tree and GIN
    entries are limited to about 2.7 kB). Must equal the schema's ``tag_keys()``."""
    raw = tag.encode("utf-8")
    if len(raw) <= _TAG_KEY_MAX:
        return tag
    return "sha256:" + hashlib.sha256(raw).hexdigest()


_ELIGIBLE = in_list(ELIGIBLE)
#: Eligible and due (not waiting for its schedule): what a claim may take.
_DUE = f"status IN {_ELIGIBLE} AND wait_until IS NULL"
_WAITING = f"status IN {_ELIGIBLE} AND wait_until IS NOT NULL"
#: Selection order (SPEC §8.2): the eligible index's columns.
_ORDER = "priority DESC, COALESCE(scheduled_at, last_retry_at, created_at), seq"
_ACTIVE = in_list(ACTIVE)
_FINAL = in_list(FINAL)
_RUNNING = JobStatus.RUNNING.value
_ASSIGNED = JobStatus.RUNNING  # every claim's status (ASSIGN moves all sources there)


def _key(text: str) -> str:
    """SQL for the indexed key of the text expression ``text``: the schema's
    ``id_key()``/``tag_keys()`` rule written inline. A call of that SQL function
    is not inlined by the planner (it is ``STRICT``, its ``CASE`` is not), and each
    call costs microseconds; a batch statement makes several per job."""
    return (
        f"(CASE WHEN octet_length({text}) <= {_TAG_KEY_MAX} THEN {text} "
        f"ELSE 'sha256:' || encode(sha256(convert_to({text}, 'UTF8')), 'hex') END)"
    )


#: The indexed prefix of an assignee id (at most 800 bytes in UTF-8).
_ASSIGNEE_PREFIX = "left({}, 200)"
#: ``list_jobs`` order among jobs created at the same instant: by id key, byte order
#: (which is code point order, as on the other backends, for ids of up to 256 bytes).
_ID_ORDER = 'id_key COLLATE "C"'
#: The indexed prefix of a job type (at most 800 bytes in UTF-8).
_TYPE_PREFIX = "left(job_type, 200)"


def _quote_ident(name: str) -> str:
    """A double-quoted SQL identifier (embedded quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


#: SQL types of :data:`CLAIMED_COLUMNS`, for the NULL padding of rows that carry no job.
_CLAIMED_TYPES = (
    "text", "text", "bytea", "text[]", "timestamptz", "timestamptz", "timestamptz",
    "text", "bytea", "bigint", "timestamptz", "timestamptz", "smallint", "integer", "integer",
)  # fmt: skip


def _claimed_returning(table: str) -> str:
    """:data:`CLAIMED_COLUMNS`, each qualified by ``table`` (for ``RETURNING``)."""
    return ", ".join(f"{table}.{c.strip()}" for c in CLAIMED_COLUMNS.split(","))


def _utc(value: datetime | None) -> datetime | None:
    """A timestamp read back, timezone-aware: asyncpg decodes PostgreSQL's ±infinity
    (how it stores ``datetime.min``/``datetime.max`` in UTC) as *naive*
    ``datetime.min``/``datetime.max``; every other value comes back in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _us(value: datetime) -> int:
    """Microseconds since the epoch (the inverse of :func:`_from_us`)."""
    return (value - _UTC_EPOCH) // timedelta(microseconds=1)


def _busy_or_idle(status: JobStatus) -> str:
    """The index condition a query for ``status`` repeats so the planner may use the
    partial index that holds it (``jobs_active_assignee`` or a ``jobs_idle_*``)."""
    return f"status IN {_ACTIVE}" if status in ACTIVE else f"status NOT IN {_ACTIVE}"


def _to_us(value: datetime | None) -> int | None:
    """:func:`_us`, with ``None`` kept."""
    return None if value is None else _us(value)


def _from_us(value: int | None) -> datetime | None:
    """A datetime from :data:`_EPOCH_US` microseconds (``None`` stays ``None``)."""
    return None if value is None else _UTC_EPOCH + timedelta(microseconds=value)


def _job(
    r: Record | Sequence[Any],
    at: int,
    status: JobStatus,
    assignee_id: str,
    assigned_at: datetime | None,
) -> Job:
    """A job from the :data:`CLAIMED_COLUMNS` of a row, starting at column ``at``, and
    the three columns a claim sets (given: a claim knows them, a read selects them)."""
    return Job(
        id=r[at],
        job_type=r[at + 1],
        job_definition=r[at + 2],
        tags=list(r[at + 3]),
        status=status,
        created_at=_utc(r[at + 4]),  # type: ignore[arg-type]
        started_at=_utc(r[at + 5]),
        finalized_at=_utc(r[at + 6]),
        error_message=r[at + 7],
        result=r[at + 8],
        retry_count=r[at + 9],
        last_retry_at=_utc(r[at + 10]),
        assignee_id=assignee_id,
        assigned_at=_utc(assigned_at),
        scheduled_at=_utc(r[at + 11]),
        priority=r[at + 12],
        max_attempts=r[at + 13],
        attempts=r[at + 14],
    )


def _alive(conn: PoolConnectionProxy[Record]) -> bool:
    """Whether a connection kept between calls is still usable. When its socket
    closes, asyncpg takes the connection back into the pool and detaches the proxy,
    whose every method then raises ``InterfaceError``."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


async def _discard(pool: Pool, conn: PoolConnectionProxy[Record]) -> None:
    """Give back a connection that failed at the connection level: closed first,
    so the pool opens a fresh one in its place."""
    with contextlib.suppress(Exception):
        if _alive(conn):
            conn.terminate()
        await pool.release(conn)


#: Called (awaited) at steps 1-3 of an upgrade, inside its transaction (tests: a crash).
_UPGRADE_HOOK: Callable[[int], Awaitable[None]] | None = None


async def _upgrade_step(step: int) -> None:
    if _UPGRADE_HOOK is not None:
        await _UPGRADE_HOOK(step)


async def _no_reset(conn: Connection) -> None:
    """Pool release hook: this backend keeps no session state, so skip ``RESET ALL``.

    asyncpg still rolls back any transaction left open before calling it.
    """


# Lock ordering: every statement that may wait for row locks on several jobs takes
# them in ``id_key`` order, so two batch calls never deadlock: ``apply`` walks its
# input sorted by key; selections and deletes lock first with a
# ``SELECT … ORDER BY id_key FOR UPDATE`` CTE that the UPDATE/DELETE waits for.
# Claims use SKIP LOCKED and never wait at all.


#: Errors that mean the connection itself is gone or unusable (see ``_call``).
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    (
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        asyncpg.PostgresConnectionError,
        asyncpg.AdminShutdownError,
        asyncpg.CrashShutdownError,
        asyncpg.CannotConnectNowError,
        OSError,
    )
    if _HAVE_ASYNCPG
    else ()
)


def _storage_error_types() -> tuple[type[BaseException], ...]:
    return (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        OSError,
        TimeoutError,
    )


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
        if not _HAVE_ASYNCPG:
            raise ImportError(_INSTALL_HINT)
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
        #: Whether this backend vacuums its table (decided at open, see the class doc).
        self.vacuuming = False
        self._changed = 0
        self._vacuum_after = VACUUM_MIN_CHANGES
        self._vacuum_task: asyncio.Task[None] | None = None
        #: VACUUM runs completed by this backend (for tests and monitoring).
        self.vacuum_runs = 0
        self._pool_min = pool_min_size
        self._pool_max = pool_max_size
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._s = _quote_ident(schema)
        self._t = f"{self._s}.jobs"
        digest = hashlib.sha256(schema.encode()).hexdigest()
        #: NOTIFY channel of this schema (a plain identifier, well under 63 bytes).
        self.channel = f"jobpool_{digest[:24]}"
        #: ``application_name`` of this backend's connections (see ``pg_stat_activity``).
        self.application_name = f"jobpool_async:{schema}".encode()[:63].decode(errors="ignore")
        self._lock_key = int.from_bytes(bytes.fromhex(digest[24:40]), "big", signed=True)
        #: Tags this instance's notifications so its own listener ignores them.
        self._token = secrets.token_hex(8)
        #: ``wait_for`` across processes: NOTIFY channel where queues say which jobs they
        #: wait for, the jobs other processes wait for (with counts), and the notices
        #: this instance is sending about moves of those jobs.
        self._watch_channel = f"{self.channel}_w"
        self._watched: dict[str, int] = {}
        self._telling: set[asyncio.Task[None]] = set()
        self._pool: Pool | None = None
        #: Pool connections kept between single-statement calls (see :meth:`_fetch`).
        self._hot: list[PoolConnectionProxy[Record]] = []
        #: How many: at most 4, and always 2 left to the pool (transactions, vacuum).
        self._keep = max(0, min(4, pool_max_size - 2))
        self._listen_conn: Connection | None = None
        self._listener: Listener | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._listen_lost = asyncio.Event()
        self._closed = False
        self._opened = False
        self._sql_cache: dict[tuple[int, bool, bool], tuple[Transition, str]] = {}
        self._claims = 0
        #: Nonces of claims that failed and may have committed (see :meth:`claim`).
        self._orphans: list[str] = []
        #: The earliest time a waiting job comes due, as far as this process knows
        #: (from its own writes and from notifications), and when it last looked.
        self._next_due: datetime | None = None
        self._probed_at = float("-inf")
        self._probe_now = True
        #: By (new jobs only, ignore existing ids).
        self._insert_sqls = {
            (new, ignore): self._build_insert_sql(full=not new, ignore=ignore)
            for new in (False, True)
            for ignore in (False, True)
        }
        self._claim_sql = self._build_claim_sql(False)
        self._claim_tags_sql = self._build_claim_sql(True)

    def __repr__(self) -> str:
        return f"PostgresBackend(schema={self.schema!r})"

    # --- errors -------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        if self._pool is None:
            raise StorageError(f"PostgreSQL store {self.schema!r} is not open")
        try:
            yield
        except JobPoolError:
            raise
        except _storage_error_types() as exc:
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
                reset=_no_reset,
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
                await self._migrate(conn)
                self.vacuuming = self._self_vacuum is True or (
                    self._self_vacuum is None
                    and not await conn.fetchval("SELECT current_setting('autovacuum') = 'on'")
                )
            if self.vacuuming and self._self_vacuum is None:
                logger.info("autovacuum is off on the server: %r vacuums its own table", self)
            self._listen_conn = await self._connect_listener()
        except BaseException as exc:
            await self._shutdown()
            if isinstance(exc, JobPoolError | asyncio.CancelledError):
                raise
            if isinstance(exc, _storage_error_types()):
                raise StorageError(
                    f"cannot open PostgreSQL store {self.schema!r}: {type(exc).__name__}: {exc}"
                ) from exc
            raise
        self._opened = True
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _migrate(self, conn: PoolConnectionProxy[Record]) -> None:
        """Create the schema if missing, or check its version, under an advisory lock."""
        s, t = self._s, self._t
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self._lock_key)
            tables = {
                r[0]
                for r in await conn.fetch(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
                    self.schema,
                )
            }
            if "jobpool_version" in tables:
                row = await conn.fetchrow(f"SELECT max(version) FROM {s}.jobpool_version")
                version = row[0] if row is not None else None
                if version is None:
                    raise StorageError(f"schema {self.schema!r}: jobpool_version table is empty")
                if version > SCHEMA_VERSION:
                    raise StorageError(
                        f"schema {self.schema!r} has jobpool store version {version}, newer "
                        f"than this library understands ({SCHEMA_VERSION}); upgrade jobpool_async"
                    )
                if "jobs" not in tables:
                    raise StorageError(f"schema {self.schema!r}: jobs table is missing")
                if version < SCHEMA_VERSION:
                    await self._upgrade(conn, version)
                await conn.execute(self._listing_indexes_sql())
                await conn.execute(self._leases_table_sql())
                return
            if tables:
                raise StorageError(
                    f"schema {self.schema!r} holds other tables and is not a jobpool store"
                )
            await conn.execute(
                f"""
                CREATE SCHEMA IF NOT EXISTS {s};
                -- Tags and ids may be any length: B-tree and GIN entries may not (about
                -- 2.7 kB). So both are indexed by short keys, written once at insert: the
                -- text itself when short, else its SHA-256 (id_key, the primary key, and
                -- tag_keys); queries also compare the real text. id_key() and tag_keys()
                -- make the same keys for query parameters.
                CREATE FUNCTION {s}.tag_keys(text[]) RETURNS text[]
                    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
                    SELECT coalesce(array_agg(CASE WHEN octet_length(k) <= {_TAG_KEY_MAX} THEN k
                        ELSE 'sha256:' || encode(sha256(convert_to(k, 'UTF8')), 'hex') END),
                        '{{}}'::text[])
                    FROM unnest($1) AS k $fn$;
                CREATE FUNCTION {s}.id_key(text) RETURNS text
                    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
                    SELECT CASE WHEN octet_length($1) <= {_TAG_KEY_MAX} THEN $1
                        ELSE 'sha256:' || encode(sha256(convert_to($1, 'UTF8')), 'hex') END $fn$;
                CREATE TABLE {t} (
                    id_key text PRIMARY KEY,
                    id text NOT NULL,
                    seq bigserial NOT NULL,
                    job_type text NOT NULL,
                    job_definition bytea NOT NULL,
                    tags text[] NOT NULL,
                    tag_keys text[] NOT NULL,
                    status text NOT NULL,
                    created_at timestamptz NOT NULL,
                    started_at timestamptz,
                    finalized_at timestamptz,
                    error_message text NOT NULL,
                    result bytea,
                    retry_count bigint NOT NULL,
                    last_retry_at timestamptz,
                    assignee_id text NOT NULL,
                    assigned_at timestamptz,
                    claimed_by text,
                    scheduled_at timestamptz,
                    priority smallint NOT NULL DEFAULT 0,
                    max_attempts integer,
                    attempts integer NOT NULL DEFAULT 0,
                    wait_until timestamptz
                );
                {self._eligible_indexes_sql()}
                {self._tag_indexes_sql()}
                {self._assignee_index_sql()}
                CREATE INDEX jobs_completed ON {t} (finalized_at)
                    WHERE status = '{JobStatus.COMPLETED.value}';
                {self._listing_indexes_sql()}
                -- A queue table churns: every move leaves a dead row version, and dead
                -- entries at the head of the eligible index slow every claim until
                -- vacuum removes them. So vacuum it far more often than the default.
                ALTER TABLE {t} SET (autovacuum_vacuum_scale_factor = 0.01,
                    autovacuum_vacuum_threshold = 1000,
                    autovacuum_vacuum_insert_scale_factor = 0.05,
                    autovacuum_analyze_scale_factor = 0.02);
                CREATE TABLE {s}.jobpool_version (version integer NOT NULL);
                INSERT INTO {s}.jobpool_version (version) VALUES ({SCHEMA_VERSION});
                {self._leases_table_sql()}
                """
            )

    def _leases_table_sql(self) -> str:
        """The lease records: one row per assignee and holder (a queue), keyed by the
        assignee's short key (an id may be longer than a B-tree entry allows)."""
        return f"""CREATE TABLE IF NOT EXISTS {self._s}.leases (
                    assignee_key text NOT NULL,
                    holder text NOT NULL,
                    assignee_id text NOT NULL,
                    first_seen_at timestamptz NOT NULL,
                    renewed_at timestamptz NOT NULL,
                    expires_at timestamptz NOT NULL,
                    PRIMARY KEY (assignee_key, holder));"""

    def _tag_indexes_sql(self) -> str:
        """The GIN indexes over tag keys. Only jobs with tags are in them (``tag_keys <>
        '{}'``, which every tag filter adds): a job without tags would otherwise add an
        "empty" GIN entry on insert and on every move, which cost about 15% of an insert."""
        t = self._t
        return f"""
                CREATE INDEX jobs_tags ON {t} USING gin (tag_keys) WHERE tag_keys <> '{{}}';
                CREATE INDEX jobs_eligible_tags ON {t} USING gin (tag_keys)
                    WHERE {_DUE} AND tag_keys <> '{{}}';"""

    def _eligible_indexes_sql(self) -> str:
        """Due eligible jobs in selection order (priority descending, due key, seq), and
        eligible jobs waiting for their schedule by ``wait_until``: a claim reads only
        the first; jobs scheduled for later are never in its way."""
        t = self._t
        return f"""
                CREATE INDEX jobs_eligible ON {t} ({_ORDER}) WHERE {_DUE};
                CREATE INDEX jobs_waiting ON {t} (wait_until) WHERE {_WAITING};"""

    def _listing_indexes_sql(self) -> str:
        """The B-tree indexes ``list_jobs`` walks newest first: all jobs, per status and per
        type (a prefix: an entry is limited to about 2.7 kB), each by ``created_at`` (jobs
        created at the same instant are put in id order by an incremental sort of just
        those; the id in the key made each index about 7% dearer), all without
        RUNNING/CANCELLING jobs (``list_jobs`` reads those through
        ``jobs_active_assignee``: one per busy slot, then sorts them). Every move writes
        a new row version, with an entry in every index whose condition it meets, so
        these indexes cost writes on the hot path; leaving out the running version
        saves a third. (A list by tag without a status walks ``jobs_idle_list``, or the
        GIN tag index for a rare tag, as the planner finds cheaper; merging one walk
        per status instead was slow when a status held no job with the tag.)
        Created with the schema and, on open, in stores made before them (older code
        keeps them up to date, so no version change); the first ones are dropped."""
        t, s = self._t, self._s
        idle = f"WHERE status NOT IN {_ACTIVE}"
        return f"""
                DROP INDEX IF EXISTS {s}.jobs_list;
                DROP INDEX IF EXISTS {s}.jobs_list_status;
                DROP INDEX IF EXISTS {s}.jobs_list_type;
                CREATE INDEX IF NOT EXISTS jobs_idle_list ON {t} (created_at) {idle};
                CREATE INDEX IF NOT EXISTS jobs_idle_status ON {t} (status, created_at) {idle};
                CREATE INDEX IF NOT EXISTS jobs_idle_type ON {t}
                    ({_TYPE_PREFIX}, created_at) {idle};"""

    def _assignee_index_sql(self) -> str:
        """The index of active jobs by assignee (``mark_worker_unresponsive``), on a
        prefix of the id: a B-tree entry is limited to about 2.7 kB and an assignee id
        is not (queries also compare the whole id). Every claim adds an entry; with the
        hash index of version 2, which takes ids of any length, a Worker's
        complete-and-claim statement measured 2-3% slower (likely because all of one
        worker's entries fall in one hash bucket, dead ones included until vacuum)."""
        return f"""CREATE INDEX jobs_active_assignee ON {self._t}
                    ({_ASSIGNEE_PREFIX.format("assignee_id")}) WHERE status IN {_ACTIVE};"""

    async def _upgrade(self, conn: PoolConnectionProxy[Record], version: int) -> None:
        """Bring a store of an older version up to :data:`SCHEMA_VERSION` (inside
        :meth:`_migrate`'s locked transaction, so all or nothing)."""
        s, t = self._s, self._t
        if version < 4:  # 4: schedules, priorities, attempts (SPEC §8): columns first
            await conn.execute(
                f"""ALTER TABLE {t} ADD COLUMN scheduled_at timestamptz,
                        ADD COLUMN priority smallint NOT NULL DEFAULT 0,
                        ADD COLUMN max_attempts integer,
                        ADD COLUMN attempts integer NOT NULL DEFAULT 0,
                        ADD COLUMN wait_until timestamptz"""
            )
            await _upgrade_step(1)
        if version < 2:  # 2: the GIN indexes leave out jobs without tags
            await conn.execute(
                f"DROP INDEX {s}.jobs_tags; DROP INDEX {s}.jobs_eligible_tags;"
                + self._tag_indexes_sql()
            )
        if version < 3:  # 3: the assignee index is a B-tree, not a hash index
            await conn.execute(f"DROP INDEX {s}.jobs_active_assignee;" + self._assignee_index_sql())
        if version < 4:  # 4: the eligible indexes in the new order, and the waiting one
            await conn.execute(
                f"""DROP INDEX {s}.jobs_eligible; DROP INDEX {s}.jobs_eligible_tags;
                    CREATE INDEX jobs_eligible_tags ON {t} USING gin (tag_keys)
                        WHERE {_DUE} AND tag_keys <> '{{}}';"""
                + self._eligible_indexes_sql()
            )
            await _upgrade_step(2)
        await conn.execute(f"UPDATE {s}.jobpool_version SET version = {SCHEMA_VERSION}")
        await _upgrade_step(3)
        logger.info("upgraded store %r from version %d to %d", self.schema, version, SCHEMA_VERSION)

    async def close(self) -> None:
        self._closed = True
        self._listener = None
        for task in list(self._telling):  # notices for waiters elsewhere: moot now
            task.cancel()
        await asyncio.gather(*self._telling, return_exceptions=True)
        await self._shutdown()

    async def _shutdown(self) -> None:
        for task in (self._supervisor, self._vacuum_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._supervisor = self._vacuum_task = None
        conn, self._listen_conn = self._listen_conn, None
        if conn is not None:
            await self._close_conn(conn)
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
            except _CONNECTION_LOST as exc:
                await _discard(pool, conn)
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
        replaces the connections it finds closed)."""
        while self._hot:
            conn = self._hot.pop()
            if _alive(conn):
                return conn
            await _discard(pool, conn)
        return await pool.acquire()

    @staticmethod
    async def _close_conn(conn: Connection) -> None:
        try:
            await asyncio.wait_for(conn.close(), 5)
        except Exception:
            conn.terminate()

    # --- vacuuming -----------------------------------------------------------------

    def _changed_rows(self, count: int) -> None:
        """Count rows changed (dead versions made); start a VACUUM when enough are."""
        if not self.vacuuming or count <= 0:
            return
        self._changed += count
        if self._changed >= self._vacuum_after and self._vacuum_task is None and not self._closed:
            self._changed = 0
            self._vacuum_task = asyncio.get_running_loop().create_task(self._vacuum())

    async def _vacuum(self) -> None:
        """``VACUUM (ANALYZE)`` the jobs table on a connection of its own (not the pool's:
        it may take a while on a big table, and VACUUM cannot run in a transaction)."""
        try:
            conn: Connection = await asyncpg.connect(
                self._dsn,
                timeout=self._connect_timeout,
                server_settings={"application_name": self.application_name},
            )
            try:
                await conn.execute(f"SET vacuum_cost_delay = '{VACUUM_COST_DELAY_MS}ms'")
                await conn.execute(f"VACUUM (ANALYZE) {self._t}")
                rows = await conn.fetchval(
                    "SELECT reltuples FROM pg_class WHERE oid = $1::regclass", self._t
                )
                self._vacuum_after = max(VACUUM_MIN_CHANGES, int((rows or 0) * 0.02))
                self.vacuum_runs += 1
            finally:
                await self._close_conn(conn)
        except asyncio.CancelledError:
            raise
        except (Exception, TimeoutError) as exc:  # housekeeping: never fail a caller
            logger.warning("VACUUM of %s failed: %s", self._t, exc)
        finally:
            self._vacuum_task = None

    # --- listening ----------------------------------------------------------------

    def set_listener(self, listener: Listener | None) -> None:
        self._listener = listener

    async def _connect_listener(self) -> Connection:
        conn: Connection = await asyncpg.connect(
            self._dsn,
            timeout=self._connect_timeout,
            server_settings={"application_name": self.application_name},
        )
        try:
            await conn.add_listener(self.channel, self._on_notify)
            await conn.add_listener(self._watch_channel, self._on_watch)
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

    async def watch(self, job_id: str, waiting: bool) -> None:
        """Tell the other processes on this store that a ``wait_for`` here starts
        (``waiting``) or stops waiting for ``job_id``: while it waits, they notify
        every move of that job they make (normally a process moving a job it claimed
        itself notifies nobody). Best effort: until they have heard, the waiter polls."""
        payload = f"{self._token} {'+' if waiting else '-'}{job_id}"
        if len(payload.encode("utf-8", "surrogatepass")) > _MAX_PAYLOAD:
            return  # an id this long is only polled for
        with self._errors("notify"):
            await self._call(
                lambda c: c.execute("SELECT pg_notify($1, $2)", self._watch_channel, payload),
                True,
            )

    def _on_watch(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        if not isinstance(payload, str) or payload.startswith(self._token):
            return
        _, _, body = payload.partition(" ")
        if not body:
            return
        job_id, watched = body[1:], self._watched
        if body[0] == "+":
            if len(watched) >= _MAX_WATCHED:  # waiters that died without saying so
                watched.clear()
            watched[job_id] = watched.get(job_id, 0) + 1
        elif body[0] == "-":
            left = watched.pop(job_id, 0) - 1
            if left > 0:
                watched[job_id] = left

    def _tell(self, moved: Sequence[Moved] | None) -> None:
        """Notify the moves of jobs other processes wait for (``None``: some watched
        job was deleted, a bare re-check notice), from a task: the call that moved
        them does not wait, and a failure here only leaves the waiters to their poll."""
        tok = self._token
        if moved is None:
            payload = tok
        else:
            hits = [
                [m.job_id, m.status.value, list(m.tags), _to_us(m.assigned_at)]
                for m in moved
                if m.job_id in self._watched
            ]
            if not hits:
                return
            payload = f"{tok} {json.dumps(hits)}"
            if len(payload.encode("utf-8", "surrogatepass")) > _MAX_PAYLOAD:
                payload = tok

        async def send() -> None:
            with contextlib.suppress(StorageError, *_storage_error_types()):
                await self._call(
                    lambda c: c.execute("SELECT pg_notify($1, $2)", self.channel, payload), True
                )

        task = asyncio.get_running_loop().create_task(send())
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        listener = self._listener
        if listener is None or not isinstance(payload, str) or payload.startswith(self._token):
            return
        _, sep, body = payload.partition(" ")
        moved: list[Moved] | None = None
        if sep:
            try:
                moved = []
                for job_id, status, tags, at, *rest in json.loads(body):
                    due = _from_us(rest[0]) if rest else None
                    moved.append(
                        Moved(str(job_id), _STATUS[status], _from_us(at), tuple(tags or ()), due)
                    )
                    self._learn(due)
            except (ValueError, TypeError, KeyError):
                logger.warning("unreadable notification on %s; re-checking", channel)
                moved = None
        else:
            self._probe_now = True
        try:
            listener(moved)
        except Exception:  # the queue's bug must not kill the listener connection
            logger.exception("PostgreSQL notification listener failed")

    async def _supervise(self) -> None:
        """Keep the listener connection alive; after a reconnect, ask for a re-check."""
        delay = 0.05
        while not self._closed:
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
            self._probe_now = True  # schedules may have been missed too
            listener = self._listener
            if listener is not None:  # notifications may have been missed meanwhile
                try:
                    listener(None)
                except Exception:
                    logger.exception("PostgreSQL notification listener failed")

    # --- SQL building -------------------------------------------------------------

    def _note(self, source: str) -> str:
        """A CTE sending one NOTIFY for the moved rows of ``source`` that others care about.

        Others care about jobs becoming eligible (they may claim them), and about
        jobs claimed by another instance leaving RUNNING or being cancelled (that
        instance's stream frees a slot or tells its cancel listeners). A move of a
        job this instance claimed itself is already seen by its own queue, so a
        worker completing its own jobs sends no notification at all (and its
        commits are not serialized by PostgreSQL's notification queue lock).
        """
        tok = self._token
        return f"""note AS (
            SELECT pg_notify('{self.channel}',
                             CASE WHEN octet_length(p) <= {_MAX_PAYLOAD} THEN p ELSE '{tok}' END)
            FROM (SELECT '{tok} ' || json_agg(json_build_array(
                                  id, status, tags, {_EPOCH_US.format("assigned_at")},
                                  CASE WHEN status IN {_ELIGIBLE}
                                       THEN {_EPOCH_US.format("wait_until")} END
                              ))::text AS p
                  FROM {source}
                  WHERE status IN {_ELIGIBLE}
                     OR (status <> '{_RUNNING}'
                         AND (claimed_by IS NULL OR claimed_by NOT LIKE '{tok}:%'))) s
            WHERE p IS NOT NULL)"""

    def _build_claim_sql(self, with_tags: bool) -> str:
        """One statement: lock the oldest eligible matching jobs, skipping locked ones, and
        move them to RUNNING (compare-and-set on the status again, in the same statement)."""
        t = self._t
        tag_cond = f"AND {self._tag_match('tags', '$5')}" if with_tags else ""
        sets = set_clause(ASSIGN, now="$1::timestamptz", assignee_id="$2::text")
        return f"""
            WITH picked AS (
                SELECT id_key AS pid FROM {t}
                WHERE {_DUE} {tag_cond}
                ORDER BY {_ORDER}
                LIMIT $3
                FOR UPDATE SKIP LOCKED)
            UPDATE {t} SET {sets}, claimed_by = $4::text
            WHERE {t}.id_key = ANY(ARRAY(SELECT pid FROM picked))
              -- the compare-and-set, written so the planner looks the rows up by key
              -- rather than walking the eligible index
              AND ({t}.status IN {in_list(ASSIGN.sources)}) IS TRUE
            RETURNING {_claimed_returning(t)}"""

    def _build_insert_sql(self, full: bool, ignore: bool = False) -> str:
        """Insert a batch from parallel arrays (tags as slices of one flat array), in input
        order (so ``seq`` follows it), and send the enqueue notification, in one statement.

        ``full`` binds every column; otherwise (new jobs whose history fields are unset,
        the usual case) those columns are literals: six fewer arrays to encode and unnest.
        ``ignore`` skips ids that exist (``ON CONFLICT DO NOTHING``) and returns the
        inserted ids.
        """
        if full:
            history = (
                "u.started_at, u.finalized_at, u.err, u.res, u.rc, u.lra, u.aid, u.aat, "
                "u.sched, u.prio, u.maxa, 0, u.sched"
            )
            arrays = """$7::timestamptz[], $8::timestamptz[], $9::timestamptz[],
                        $10::text[], $11::bytea[], $12::bigint[], $13::timestamptz[],
                        $14::text[], $15::timestamptz[], $16::timestamptz[], $17::smallint[],
                        $18::integer[]"""
            names = (
                "created_at, started_at, finalized_at, err, res, rc, lra, aid, aat, sched, prio, "
                "maxa"
            )
            payload, keys = "$19", "$20"
        else:
            history = "NULL, NULL, u.err, NULL, 0, NULL, u.aid, NULL, NULL, 0, NULL, 0, NULL"
            arrays = "$7::timestamptz[], $8::text[], $9::text[]"
            names = "created_at, err, aid"
            payload, keys = "$10", "$11"
        return f"""
            WITH ins AS (
                INSERT INTO {self._t} ({_COLS}, wait_until, tag_keys, id_key)
                SELECT u.id, u.job_type, u.def, ($4::text[])[u.ts:u.te],
                       '{JobStatus.INITIAL_PENDING.value}', u.created_at, {history},
                       ({keys}::text[])[u.ts:u.te], {_key("u.id")}
                FROM unnest($1::text[], $2::text[], $3::bytea[], $5::int[], $6::int[],
                            {arrays})
                     WITH ORDINALITY AS u(id, job_type, def, ts, te, {names}, ord)
                ORDER BY u.ord
                {"ON CONFLICT (id_key) DO NOTHING RETURNING id" if ignore else "RETURNING 1"})
            SELECT {"array_agg(id)" if ignore else "count(*)"},
                   pg_notify('{self.channel}', {payload}::text) FROM ins"""

    def _apply_sql(self, transition: Transition, refill: bool = False, tags: bool = False) -> str:
        """One statement moving jobs by ``transition``: ``$1`` ids, ``$2`` results, ``$3``
        messages, ``$4`` now. Rows: ``kind`` 1, id, new status, tags (NULL when the
        transition makes nothing eligible) for each job it moved; a job it did not move
        has no row (:meth:`apply` then reads why).

        With ``refill``, the :class:`Refill` claim too, in the same statement (one round
        trip, one commit): ``$5`` assignee, ``$6`` the stream's job ids (NULL: all of
        ``$1``), ``$7`` the claim's nonce, ``$8`` its tags (with ``tags``). It takes one
        job per freed slot and sees the statement's snapshot, so it never picks a row
        this statement moved. Its rows are of kind 2 and carry :data:`CLAIMED_COLUMNS`
        from column 5 on.
        """
        key = (id(transition), refill, tags)
        cached = self._sql_cache.get(key)
        if cached is not None and cached[0] is transition:
            return cached[1]
        t = self._t
        timed = transition.schedules or bool(transition.exhausted)
        first = 5 if not refill else (9 if tags else 8)  # the timed arrays' placeholders
        sets = set_clause(
            transition,
            now="c.cnow",
            result="c.cres",
            error_message="c.cerr",
            scheduled_at="c.csched" if timed else "NULL",
            max_attempts="c.cmax" if timed else "NULL",
        )
        unnest, names = "$1::text[], $2::bytea[], $3::text[]", "cid, cres, cerr"
        if timed:
            unnest += f", ${first}::timestamptz[], ${first + 1}::integer[]"
            names += ", csched, cmax"
        wait_out = "wait_until" if transition.schedules else "NULL::timestamptz"
        claim = rest = claimed = ""
        # Tags matter only for a job that became eligible (streams to wake); not
        # reading them back otherwise saves decoding an array per job.
        tags_out = "tags" if set(transition.moves.values()) & ELIGIBLE else "NULL::text[]"
        if refill:
            assign = set_clause(ASSIGN, now="$4::timestamptz", assignee_id="$5::text")
            tag_cond = f"AND {self._tag_match('tags', '$8')}" if tags else ""
            rest = ", " + ", ".join(f"NULL::{kind}" for kind in _CLAIMED_TYPES)
            claim = f""",
            picked AS (
                SELECT id_key AS pid FROM {t}
                WHERE {_DUE} {tag_cond}
                ORDER BY {_ORDER}
                LIMIT (SELECT count(*) FROM moved
                       WHERE ($6::text[] IS NULL OR moved.id = ANY($6::text[]))
                         AND moved.status NOT IN {_ACTIVE})
                FOR UPDATE SKIP LOCKED),
            claimed AS (
                UPDATE {t} SET {assign}, claimed_by = $7::text
                WHERE {t}.id_key = ANY(ARRAY(SELECT pid FROM picked))
                  AND ({t}.status IN {in_list(ASSIGN.sources)}) IS TRUE
                RETURNING {_claimed_returning(t)})"""
            claimed = f"""
            UNION ALL
            SELECT 2, NULL, NULL, NULL, NULL::timestamptz, NULL::timestamptz, {CLAIMED_COLUMNS}
            FROM claimed"""
        sql = f"""
            WITH c AS (SELECT u.*, $4::timestamptz AS cnow
                       FROM unnest({unnest}) AS u({names})
                       ORDER BY {_key("u.cid")}),
            moved AS (
                UPDATE {t} SET {sets}
                FROM c WHERE {t}.id_key = {_key("c.cid")} AND {t}.id = c.cid
                  AND {t}.status IN {in_list(transition.sources)}
                RETURNING {t}.id, {t}.status, {t}.tags, {t}.claimed_by, {t}.assigned_at,
                          {t}.wait_until),
            {self._note("moved")}{claim}
            SELECT 1 AS kind, id, status, {tags_out}, assigned_at, {wait_out}{rest} FROM moved
            WHERE (SELECT count(*) FROM note) >= 0{claimed}"""
        self._sql_cache[key] = (transition, sql)
        return sql

    def _id_match(self, prefix: str, param: str) -> str:
        """Jobs whose id is in the text array ``param``, found by their short keys."""
        keys = f"ARRAY(SELECT {_key('x')} FROM unnest({param}::text[]) AS x)"
        return f"({prefix}id_key = ANY({keys}) AND {prefix}id = ANY({param}::text[]))"

    def _tag_match(self, column: str, param: str) -> str:
        """Jobs carrying every tag in ``param``: the GIN index on short tag keys finds
        candidates, the comparison of the real tags decides (a hash never does)."""
        keys_column = column[: -len("tags")] + "tag_keys"
        wanted = f"{self._s}.tag_keys({param}::text[])"
        return (
            f"({keys_column} <> '{{}}' AND {keys_column} @> {wanted} "
            f"AND {column} @> {param}::text[])"
        )

    def _selection_sql(
        self, selection: Selection, alias: str, first: int
    ) -> tuple[str, list[Any], int | None]:
        """A WHERE condition for ``selection`` on ``alias``, with placeholders from ``$first``.

        Returns the condition, its arguments, and the placeholder number of the id list.
        """
        if selection.everything:
            return "TRUE", [], None
        if selection.assignee_id is not None:
            prefix = _ASSIGNEE_PREFIX.format
            cond = (
                f"({prefix(f'{alias}.assignee_id')} = {prefix(f'${first}::text')} "
                f"AND {alias}.assignee_id = ${first}::text AND {alias}.status IN {_ACTIVE})"
            )
            return cond, [selection.assignee_id], None
        parts: list[str] = []
        args: list[Any] = []
        ids_at: int | None = None
        if selection.job_ids:
            ids_at = first + len(args)
            args.append(list(selection.job_ids))
            parts.append(self._id_match(f"{alias}.", f"${ids_at}"))
        if selection.tags:
            args.append(list(selection.tags))
            parts.append(self._tag_match(f"{alias}.tags", f"${first + len(args) - 1}"))
        return ("(" + " OR ".join(parts) + ")" if parts else "FALSE"), args, ids_at

    # --- the contract -------------------------------------------------------------

    async def insert(self, jobs: Sequence[Job]) -> None:
        statement = self._insert_statement(jobs, self._token)
        if statement is None:
            return
        with self._errors("insert"):
            assert self._pool is not None
            try:
                await self._call(lambda c: c.execute(*statement), False)
            except (asyncpg.UniqueViolationError, asyncpg.ExclusionViolationError):
                raise await self._duplicate(jobs, None) from None

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
        statement = self._insert_statement(jobs, _COMMITTED, ignore=ignore)
        if statement is None:
            return []
        with self._errors("insert"):
            try:
                async with conn.transaction():  # a savepoint inside the caller's transaction
                    rows = await conn.fetch(*statement)
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
        seen: set[str] = set()
        for job in jobs:
            if job.id in seen:
                raise DuplicateJobError(job.id)
            seen.add(job.id)
        if not jobs:
            return None
        flat: list[str] = []
        starts: list[int] = []
        ends: list[int] = []
        tagsets: dict[tuple[str, ...], None] = {}
        for job in jobs:
            starts.append(len(flat) + 1)
            flat.extend(job.tags)
            ends.append(len(flat))
            tagsets[tuple(job.tags)] = None
        # One entry per tag set of jobs due now, and per tag set of scheduled jobs with
        # the earliest time (listeners wake then, not now: SPEC §8.2).
        later: dict[tuple[str, ...], datetime] = {}
        for job in jobs:
            if job.scheduled_at is not None:
                key = tuple(job.tags)
                if key not in later or job.scheduled_at < later[key]:
                    later[key] = job.scheduled_at
                self._learn(job.scheduled_at)
        pending = JobStatus.INITIAL_PENDING.value
        now_due = (
            tagsets if not later else {tuple(j.tags): None for j in jobs if j.scheduled_at is None}
        )
        entries: list[list[Any]] = [["", pending, list(ts), None] for ts in now_due]
        entries += [["", pending, list(ts), None, _us(at)] for ts, at in later.items()]
        payload = token + " " + json.dumps(entries, separators=(",", ":"))
        if len(payload.encode()) > _MAX_PAYLOAD:
            payload = token
        new = not any(has_history(j) for j in jobs)
        args: list[Any] = [
            [j.id for j in jobs],
            [j.job_type for j in jobs],
            [j.job_definition for j in jobs],
            flat,
            starts,
            ends,
            [j.created_at for j in jobs],
        ]
        if new:
            args += [[j.error_message for j in jobs], [j.assignee_id for j in jobs]]
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
        args += [payload, [tag_key(tag) for tag in flat]]
        return (self._insert_sqls[new, ignore], *args)

    async def _duplicate(self, jobs: Sequence[Job], conn: Connection | None) -> DuplicateJobError:
        """The error for an insert refused by the unique id index: names the first id of
        ``jobs`` now stored, as seen by ``conn`` (the caller's) or else the pool."""
        sql = f"SELECT id FROM {self._t} WHERE {self._id_match('', '$1')}"
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
        if due is not None and (self._next_due is None or due < self._next_due):
            self._next_due = due

    def _should_promote(self, now: datetime) -> bool:
        due = self._next_due
        return (
            (due is not None and due <= now)
            or self._probe_now
            or time.monotonic() - self._probed_at >= PROBE_INTERVAL
        )

    async def _promote(self, now: datetime) -> None:
        """Promote the waiting jobs due at ``now`` (one statement, through the waiting
        index) and read the next due time."""
        t = self._t
        sql = f"""
            WITH p AS (UPDATE {t} SET wait_until = NULL
                       WHERE {_WAITING} AND wait_until <= $1::timestamptz RETURNING 1)
            SELECT (SELECT count(*) FROM p),
                   (SELECT wait_until FROM {t} WHERE {_WAITING} AND wait_until > $1::timestamptz
                    ORDER BY wait_until LIMIT 1)"""
        self._probe_now = False
        self._probed_at = time.monotonic()
        with self._errors("promote"):
            rows = await self._fetch(sql, now, idempotent=True)
        self._next_due = _utc(rows[0][1])
        self._changed_rows(int(rows[0][0]))

    async def insert_new(self, jobs: Sequence[Job]) -> list[str]:
        statement = self._insert_statement(jobs, self._token, ignore=True)
        if statement is None:
            return []
        with self._errors("insert"):
            rows = await self._fetch(*statement)
        inserted = set(rows[0][0] or ())
        return [job.id for job in jobs if job.id in inserted]

    async def claim(
        self, assignee_id: str, tags: Sequence[str], limit: int, now: datetime
    ) -> list[Job]:
        if self._should_promote(now):
            await self._promote(now)
        if self._orphans:
            await self._release_orphans(now)
        assert self._pool is not None
        nonce = self._nonce()
        try:
            with self._errors("claim"):
                rows = await self._fetch(*self._claim_args(assignee_id, tags, limit, now, nonce))
        except StorageError:
            await self._lost_claim(nonce, now)
            raise
        self._changed_rows(len(rows))
        jobs = [_job(r, 0, _ASSIGNED, assignee_id, now) for r in rows]
        if self._watched:
            self._tell([Moved(j.id, _ASSIGNED, j.assigned_at, tuple(j.tags)) for j in jobs])
        return jobs

    def _nonce(self) -> str:
        self._claims += 1
        return f"{self._token}:{self._claims}"

    def _claim_args(
        self, assignee_id: str, tags: Sequence[str], limit: int, now: datetime, nonce: str
    ) -> tuple[Any, ...]:
        if tags:
            return (self._claim_tags_sql, now, assignee_id, limit, nonce, list(tags))
        return (self._claim_sql, now, assignee_id, limit, nonce)

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
        sql = f"""
            WITH moved AS (
                UPDATE {self._t} SET {sets}
                WHERE claimed_by = ANY($1::text[]) AND status IN {in_list(RELEASE.sources)}
                RETURNING id, status, tags, claimed_by, assigned_at, wait_until),
            {self._note("moved")}
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
                except _storage_error_types():
                    await self._lost_claim(nonce, now)
                    raise
            assignee = refill.assignee_id if refill is not None else ""
            unmoved: dict[str, Transition] = {}
            for group, rows in results:
                moved_ids: set[str] = set()
                for r in rows:
                    if r[0] == 2:
                        out.claimed.append(_job(r, 6, _ASSIGNED, assignee, now))
                    else:
                        tags, status = r[3], _STATUS[r[2]]
                        due = r[5] if status in ELIGIBLE else None
                        out.moved.append(
                            Moved(r[1], status, _utc(r[4]), tuple(tags) if tags else (), due)
                        )
                        self._learn(due)
                        moved_ids.add(r[1])
                if len(moved_ids) < len(group):
                    for c in group:
                        if c.job_id not in moved_ids:
                            unmoved.setdefault(c.job_id, c.transition)
            if unmoved:
                await self._explain_unmoved(unmoved, out)
        self._changed_rows(len(out.moved) + len(out.claimed))
        if self._watched:
            claimed = [Moved(j.id, _ASSIGNED, j.assigned_at, tuple(j.tags)) for j in out.claimed]
            self._tell([*out.moved, *claimed])
        return out

    async def _explain_unmoved(self, unmoved: dict[str, Transition], out: ApplyOutcome) -> None:
        """The errors of jobs an apply did not move: gone, or in a status the transition
        does not leave (read now, after the commit; the statement itself returns only
        what it moved, which keeps the common all-moved case cheaper)."""
        rows = await self._fetch(
            f"SELECT id, status FROM {self._t} WHERE {self._id_match('', '$1')}",
            list(unmoved),
            idempotent=True,
        )
        current = {r[0]: _STATUS[r[1]] for r in rows}
        for job_id, transition in unmoved.items():
            status = current.get(job_id)
            if status is None:
                out.errors[job_id] = JobNotFoundError(job_id)
            else:
                out.errors[job_id] = InvalidTransitionError(job_id, status, transition.target)

    async def _apply_groups(
        self,
        groups: Iterable[list[Change]],
        now: datetime,
        refill: Refill | None,
        nonce: str,
    ) -> list[tuple[Sequence[Change], Sequence[Any]]]:
        """Changes of several transitions in one transaction (then the refill's claim)."""
        groups = list(groups)

        async def run(conn: PoolConnectionProxy[Record]) -> list[Any]:
            results: list[tuple[Sequence[Change], Sequence[Any]]] = []
            async with conn.transaction():
                for group in groups:
                    results.append((group, await conn.fetch(*self._apply_args(group, now))))
                if refill is not None:
                    moved = [Moved(r[1], _STATUS[r[2]], r[4]) for _, rows in results for r in rows]
                    limit = refill_limit(refill, moved)
                    if limit:
                        claimed = await conn.fetch(
                            *self._claim_args(refill.assignee_id, refill.tags, limit, now, nonce)
                        )
                        # as rows of kind 2 (see _apply_sql)
                        results.append(
                            ((), [(2, None, None, None, None, None, *r) for r in claimed])
                        )
            return results

        return await self._call(run, False)

    def _refill_args(
        self, changes: Sequence[Change], now: datetime, refill: Refill, nonce: str
    ) -> tuple[Any, ...]:
        base = self._apply_args(changes, now, True, bool(refill.tags))
        ids = refill.job_ids
        # NULL when every change is the stream's own job (the Worker's case)
        args = (*base, refill.assignee_id, None if ids.issuperset(base[1]) else list(ids), nonce)
        if refill.tags:
            args = (*args, list(refill.tags))
        return (*args, *self._timed_args(changes))

    def _apply_args(
        self, changes: Sequence[Change], now: datetime, refill: bool = False, tags: bool = False
    ) -> tuple[Any, ...]:
        """The SQL and ``$1``-``$4``. A column of only NULLs is sent as NULL (``unnest``
        pads it): asyncpg checks every array element's type, a noticeable cost."""
        results = [c.result for c in changes]
        messages = [c.error_message for c in changes]
        transition = changes[0].transition
        return (
            self._apply_sql(transition, refill, tags),
            [c.job_id for c in changes],
            None if results.count(None) == len(results) else results,
            None if messages.count(None) == len(messages) else messages,
            now,
            *(() if refill else self._timed_args(changes)),
        )

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
        cond, sel_args, ids_at = self._selection_sql(selection, t, 2)
        cond_j = self._selection_sql(selection, "j", 2)[0]
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
            {self._note("moved")}
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
                              WHERE e.id_key = {_key("x.id")} AND e.id = x.id)"""
        with self._errors("update"):
            rows = await self._fetch(sql, *args)
        position = {job_id: i for i, job_id in enumerate(selection.job_ids)}

        def order(r: Record) -> tuple[int, int]:
            pos = position.get(r[1])
            return (0, pos) if pos is not None else (1, r[4])

        out = SelectOutcome()
        moved = sorted((r for r in rows if r[0] == 1), key=order)
        for r in moved:
            status = _STATUS[r[2]]
            due = r[6] if status in ELIGIBLE else None
            out.moved.append(Moved(r[1], status, _utc(r[5]), tuple(r[3]), due))
            self._learn(due)
        if report_unmatched:
            missing = sorted((r for r in rows if r[0] == 0), key=lambda r: int(r[4]))
            others = sorted((r for r in rows if r[0] == 2), key=order)
            out.missing = list(dict.fromkeys(r[1] for r in missing))
            out.unmatched = list(dict.fromkeys([*out.missing, *(r[1] for r in others)]))
        self._changed_rows(len(out.moved))
        if self._watched:
            self._tell(out.moved)
        return out

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        if not job_ids:
            return []
        with self._errors("read"):
            rows = await self._fetch(
                f"SELECT {CLAIMED_COLUMNS}, status, assignee_id, assigned_at FROM {self._t} "
                f"WHERE {self._id_match('', '$1')}",
                list(job_ids),
                idempotent=True,
            )
        by_id = {r[0]: r for r in rows}
        return [
            _job(r, 0, _STATUS[r[15]], r[16], r[17])
            for i in job_ids
            if (r := by_id.get(i)) is not None
        ]

    async def oldest_created(self, statuses: frozenset[JobStatus]) -> datetime | None:
        if not statuses:
            return None
        parts = " UNION ALL ".join(
            f"(SELECT created_at FROM {self._t} WHERE status = '{s.value}' AND "
            + _busy_or_idle(s)
            + " ORDER BY created_at LIMIT 1)"
            for s in sorted(statuses)
        )
        with self._errors("read"):
            assert self._pool is not None
            value = await self._pool.fetchval(f"SELECT min(created_at) FROM ({parts}) x")
        return _utc(value)

    async def list_jobs(self, query: ListQuery) -> list[Job]:
        """One statement walking one index newest first from the cursor (several
        statuses: one walk each, merged); the other filters are checked per row."""
        t = self._t
        args: list[Any] = [query.limit]
        conds: list[str] = []
        if query.before is not None:
            args += [query.before[0], tag_key(query.before[1])]
            conds.append(
                f'created_at <= $2 AND (created_at < $2 OR {_ID_ORDER} < $3::text COLLATE "C")'
            )
        if query.job_type is not None:
            args.append(query.job_type)
            n = len(args)
            conds.append(f"{_TYPE_PREFIX} = left(${n}::text, 200) AND job_type = ${n}")
        if query.tags:
            args.append(list(query.tags))
            conds.append(self._tag_match("tags", f"${len(args)}"))
        cols = (
            f"{CLAIMED_COLUMNS}, status, assignee_id, assigned_at, "
            f"created_at AS c, {_ID_ORDER} AS k"
        )
        order = f"ORDER BY created_at DESC, {_ID_ORDER} DESC LIMIT $1"
        # Each part reads one index newest first: idle statuses (or all idle jobs) a
        # jobs_idle_* index, RUNNING/CANCELLING the active-assignee index (sorted).
        if query.statuses:
            wheres = [
                f"status = '{s.value}' AND {_busy_or_idle(s)}" for s in sorted(query.statuses)
            ]
        else:
            wheres = [f"status NOT IN {_ACTIVE}", f"status IN {_ACTIVE}"]
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
        return [_job(r, 0, _STATUS[r[15]], r[16], r[17]) for r in rows]

    async def job_states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        if not job_ids:
            return {}
        with self._errors("read"):
            rows = await self._fetch(
                f"SELECT id, status, assigned_at FROM {self._t} WHERE {self._id_match('', '$1')}",
                list(job_ids),
                idempotent=True,
            )
        return {r[0]: JobState(_STATUS[r[1]], _utc(r[2])) for r in rows}

    async def count_by_status(self, tags: Sequence[str]) -> tuple[dict[JobStatus, int], int]:
        sql = f"SELECT status, count(*), COALESCE(sum(retry_count), 0) FROM {self._t}"
        args: list[Any] = []
        if tags:
            sql += f" WHERE {self._tag_match('tags', '$1')}"
            args.append(list(tags))
        sql += " GROUP BY status"
        with self._errors("read"):
            rows = await self._fetch(sql, *args, idempotent=True)
        return {_STATUS[r[0]]: int(r[1]) for r in rows}, sum(int(r[2]) for r in rows)

    async def delete(self, selection: Selection) -> int:
        t = self._t
        cond, args, _ = self._selection_sql(selection, "j", 1)
        sql = f"""
            WITH sel AS (SELECT j.id_key, j.id, j.status, j.seq FROM {t} j WHERE {cond}
                         ORDER BY j.id_key FOR UPDATE),
            bad AS (SELECT id, seq FROM sel WHERE status NOT IN {_FINAL}),
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
        if self._watched and any(r[1] in self._watched for r in rows):
            self._tell(None)
        return len(rows)

    async def delete_completed_before(self, cutoff: datetime) -> int:
        sql = (
            f"DELETE FROM {self._t} WHERE id_key IN (SELECT id_key FROM {self._t} "
            f"WHERE status = '{JobStatus.COMPLETED.value}' AND finalized_at <= $1::timestamptz "
            "ORDER BY id_key FOR UPDATE)"
        )
        with self._errors("delete"):
            assert self._pool is not None
            status = await self._call(lambda c: c.execute(sql, cutoff), False)
        deleted = int(status.rsplit(" ", 1)[-1])
        self._changed_rows(deleted)
        if self._watched and deleted:
            self._tell(None)  # which ones is not known: a re-check notice
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
                SELECT {_key("a")}, $1::text, a, now(), now(), now() + $3::interval
                FROM unnest($2::text[]) AS a
                ON CONFLICT (assignee_key, holder) DO UPDATE
                SET renewed_at = EXCLUDED.renewed_at, expires_at = EXCLUDED.expires_at
                RETURNING 1),
            gone AS (
                DELETE FROM {l_} WHERE holder = $1::text
                  AND assignee_key = ANY(ARRAY(SELECT {_key("r")} FROM unnest($4::text[]) r))
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
        prefix = _ASSIGNEE_PREFIX.format
        read = f"""
            WITH l AS (SELECT min(assignee_id) AS aid FROM {s}.leases
                       GROUP BY assignee_key HAVING max(expires_at) <= now())
            SELECT 1 AS kind, j.id, j.status, j.assignee_id, j.assigned_at
            FROM l JOIN {t} j ON {prefix("j.assignee_id")} = {prefix("l.aid")}
                 AND j.assignee_id = l.aid AND j.status IN {_ACTIVE}
            UNION ALL
            SELECT 2, NULL, NULL, NULL, NULL
            WHERE EXISTS (SELECT 1 FROM {s}.leases WHERE expires_at < now() - $1::interval)"""
        sets = set_clause(LEASE_EXPIRED, now="$5::timestamptz", max_attempts="$6::integer")
        write = f"""
            WITH c AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[],
                                            $4::timestamptz[]) AS c(cid, cst, caid, cat)),
            lk AS (SELECT j.id_key FROM {t} j JOIN c ON j.id_key = {_key("c.cid")}
                   AND j.id = c.cid ORDER BY j.id_key FOR UPDATE OF j),
            moved AS (
                UPDATE {t} SET {sets} FROM c
                WHERE {t}.id_key = {_key("c.cid")} AND {t}.id = c.cid
                  AND {t}.status = c.cst AND {t}.assignee_id = c.caid
                  AND {t}.assigned_at IS NOT DISTINCT FROM c.cat
                  AND {t}.status IN {in_list(LEASE_EXPIRED.sources)}
                  AND NOT EXISTS (SELECT 1 FROM {s}.leases x
                                  WHERE x.assignee_key = {_key(f"{t}.assignee_id")}
                                    AND x.expires_at > now())
                  AND (SELECT count(*) FROM lk) >= 0
                RETURNING {t}.id, {t}.status, {t}.tags, {t}.claimed_by, {t}.assigned_at,
                          {t}.wait_until),
            {self._note("moved")}
            SELECT id, status, tags, assigned_at FROM moved
            WHERE (SELECT count(*) FROM note) >= 0"""
        forget = f"""
            DELETE FROM {s}.leases r WHERE r.expires_at < now() - $1::interval
              AND (EXISTS (SELECT 1 FROM {s}.leases o
                           WHERE o.assignee_key = r.assignee_key AND o.expires_at > now())
                   OR NOT EXISTS (SELECT 1 FROM {t} j
                                  WHERE {prefix("j.assignee_id")} = {prefix("r.assignee_id")}
                                    AND j.assignee_id = r.assignee_id
                                    AND j.status IN {_ACTIVE}))"""
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
                    moved = [Moved(r[0], _STATUS[r[1]], r[3], tuple(r[2] or ())) for r in done]
                if len(jobs) < len(rows):
                    await conn.execute(forget, forget_after)
        self._changed_rows(len(moved))
        return moved
