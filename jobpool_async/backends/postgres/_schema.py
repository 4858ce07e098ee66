"""The PostgreSQL store's schema: its tables, functions and indexes, created on open
under an advisory lock, and the in-place upgrade of a store an older version wrote.

Several processes may open one store at once: the first creates or upgrades it,
the others wait for the lock and find it done.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..base import (
    JobStatus,
    StorageError,
)
from ._statements import (
    ACTIVE_IN,
    ASSIGNEE_PREFIX,
    DUE,
    ORDER,
    TAG_KEY_MAX,
    TAGGED,
    TYPE_PREFIX,
    WAITING,
    quote_ident,
)

if TYPE_CHECKING:
    from asyncpg import Record
    from asyncpg.pool import PoolConnectionProxy

__all__ = ["SCHEMA_VERSION", "StoreSchema"]

logger = logging.getLogger("jobpool_async.postgres")

#: The schema version this code writes; a store with a newer one is refused.
SCHEMA_VERSION = 7

#: The text columns every index compares (the primary key; the status every partial
#: index's condition reads; the type and assignee prefixes), in ``COLLATE "C"`` since
#: version 7: byte order, not the database's collation, whose comparisons go through
#: ``strcoll`` (even ``C.UTF-8``'s in PostgreSQL 15). That was 2.7% of the server's
#: instructions per drained job (benchmarks/results/pg-session11.md). Every statement
#: that locks rows in key order sorts them in ``"C"`` too (see LOCK_ORDER).
_KEY_COLUMNS = ("id_key", "status", "job_type", "assignee_id")

#: The defaults of the columns a ``COPY`` insert of new jobs leaves out (it writes
#: only ``_statements.COPY_COLUMNS``): a new job's values.
COPY_DEFAULTS = {
    "tags": "'{}'", "tag_keys": "'{}'", "status": f"'{JobStatus.INITIAL_PENDING.value}'",
    "error_message": "''", "retry_count": "0", "assignee_id": "''",
}  # fmt: skip


def default(column: str) -> str:
    """The ``DEFAULT`` clause of ``column`` in the jobs table's definition."""
    return f"DEFAULT {COPY_DEFAULTS[column]}"


#: Called (awaited) at steps 1-6 of an upgrade, inside its transaction (tests: a crash).
_UPGRADE_HOOK: Callable[[int], Awaitable[None]] | None = None


async def _upgrade_step(step: int) -> None:
    if _UPGRADE_HOOK is not None:
        await _UPGRADE_HOOK(step)


class StoreSchema:
    """The tables of the store in PostgreSQL schema ``schema``; ``lock_key`` is the
    advisory lock that serializes opening it."""

    def __init__(self, schema: str, lock_key: int) -> None:
        self.schema = schema
        self._s = quote_ident(schema)
        self._t = f"{self._s}.jobs"
        self._lock_key = lock_key

    async def migrate(self, conn: PoolConnectionProxy[Record]) -> None:
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
                await self._copy_defaults(conn)
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
                    SELECT coalesce(array_agg(CASE WHEN octet_length(k) <= {TAG_KEY_MAX} THEN k
                        ELSE 'sha256:' || encode(sha256(convert_to(k, 'UTF8')), 'hex') END),
                        '{{}}'::text[])
                    FROM unnest($1) AS k $fn$;
                CREATE FUNCTION {s}.id_key(text) RETURNS text
                    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
                    SELECT CASE WHEN octet_length($1) <= {TAG_KEY_MAX} THEN $1
                        ELSE 'sha256:' || encode(sha256(convert_to($1, 'UTF8')), 'hex') END $fn$;
                -- The text keys compare as bytes (COLLATE "C"; see _KEY_COLUMNS).
                CREATE TABLE {t} (
                    id_key text COLLATE "C" PRIMARY KEY,
                    id text NOT NULL,
                    seq bigserial NOT NULL,
                    job_type text COLLATE "C" NOT NULL,
                    job_definition bytea NOT NULL,
                    tags text[] NOT NULL {default("tags")},
                    tag_keys text[] NOT NULL {default("tag_keys")},
                    status text COLLATE "C" NOT NULL {default("status")},
                    created_at timestamptz NOT NULL,
                    started_at timestamptz,
                    finalized_at timestamptz,
                    error_message text NOT NULL {default("error_message")},
                    result bytea,
                    retry_count bigint NOT NULL {default("retry_count")},
                    last_retry_at timestamptz,
                    assignee_id text COLLATE "C" NOT NULL {default("assignee_id")},
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
                {self._completed_index_sql()}
                {self._listing_indexes_sql(conn)}
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

    async def _copy_defaults(self, conn: PoolConnectionProxy[Record]) -> None:
        """Give the columns a ``COPY`` insert leaves out their defaults (see
        :data:`COPY_DEFAULTS`), if a store made before them lacks any. Only the catalog
        changes (no row is rewritten; code that writes every column, as older versions
        do, is unaffected), so the store version stays; the ``ALTER`` waits for the
        statements running on the table, once per store."""
        missing = await conn.fetchval(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = $1::regclass "
            "AND attname = ANY($2::text[]) AND NOT atthasdef",
            self._t,
            list(COPY_DEFAULTS),
        )
        if missing:
            await conn.execute(
                f"ALTER TABLE {self._t} "
                + ", ".join(f"ALTER COLUMN {c} SET DEFAULT {v}" for c, v in COPY_DEFAULTS.items())
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
                    WHERE {DUE} AND tag_keys <> '{{}}';"""

    def _eligible_indexes_sql(self) -> str:
        """Due eligible jobs in selection order (priority descending, due key, seq), and
        eligible jobs waiting for their schedule by ``wait_until``: a claim reads only
        the first; jobs scheduled for later are never in its way."""
        t = self._t
        return f"""
                CREATE INDEX jobs_eligible ON {t} ({ORDER}) WHERE {DUE};
                CREATE INDEX jobs_waiting ON {t} (wait_until) WHERE {WAITING};"""

    def _listing_indexes_sql(self, conn: PoolConnectionProxy[Record]) -> str:
        """The B-tree indexes ``list_jobs`` walks newest first: per status, per type (a
        prefix: an entry is limited to about 2.7 kB) and, for lists by tag, all jobs
        with tags, each by ``created_at`` (jobs created at the same instant are put in
        id order by an incremental sort of just those; the id in the key made each
        index about 7% dearer), all without RUNNING/CANCELLING jobs (``list_jobs``
        reads those through ``jobs_active_assignee``: one per busy slot, then sorts
        them). Every move writes a new row version, with an entry in every index whose
        condition it meets, so these indexes cost writes on the hot path: leaving out
        the running version saves a third of them, and a list without filters merges
        one walk of ``jobs_idle_status`` per status (a fixed few) instead of walking an
        index of every job, which cost each job without tags two entries (version 5).
        A list by tag without a status walks ``jobs_idle_tagged``, or the GIN tag
        index for a rare tag, as the planner finds cheaper (merging one walk per status
        was slow when a status held many jobs, none with the tag).
        Run when the schema is created and by the upgrade to version 5 (older stores
        may hold the first ones, or none: each is dropped or created if needed).

        With them, statistics of the type prefix (PostgreSQL 14 and later): the planner
        keeps none for the expression of a partial index, so it took every type for
        0.5% of the jobs and planned a list by a common type as a read of all its
        jobs and a sort (3,478 buffers for a page of 100 at 100,000 jobs, a quarter of
        them of the type; 50 with the statistics)."""
        t, s = self._t, self._s
        idle = f"WHERE status NOT IN {ACTIVE_IN}"
        stats = ""
        if conn.get_server_version().major >= 14:
            stats = f"CREATE STATISTICS IF NOT EXISTS {s}.jobs_type ON ({TYPE_PREFIX}) FROM {t};"
        return f"""
                DROP INDEX IF EXISTS {s}.jobs_list;
                DROP INDEX IF EXISTS {s}.jobs_list_status;
                DROP INDEX IF EXISTS {s}.jobs_list_type;
                DROP INDEX IF EXISTS {s}.jobs_idle_list;
                CREATE INDEX IF NOT EXISTS jobs_idle_status ON {t} (status, created_at) {idle};
                CREATE INDEX IF NOT EXISTS jobs_idle_type ON {t}
                    ({TYPE_PREFIX}, created_at) {idle};
                CREATE INDEX IF NOT EXISTS jobs_idle_tagged ON {t} (created_at)
                    {idle} AND {TAGGED};
                {stats}"""

    def _completed_index_sql(self) -> str:
        """The index ``cleanup_expired_jobs`` needs besides ``jobs_idle_status``: completed
        jobs finalized before their (caller-given) creation time, by ``finalized_at``.
        A completed job created before it was finalized (nearly every job) is found by a
        walk of ``jobs_idle_status`` up to the cutoff instead (finalized by the cutoff, it
        was created by then), so a completion writes no entry here. Until version 6 this
        was ``jobs_completed``, every completed job by ``finalized_at``: one index entry
        per job more, about a tenth of the server's CPU per job in the drain (an index
        entry costs a new row version 5-6% of it: benchmarks/results/pg-session9.md)."""
        done = JobStatus.COMPLETED.value
        return f"""CREATE INDEX jobs_completed_early ON {self._t} (finalized_at)
                    WHERE status = '{done}' AND finalized_at < created_at;"""

    def _assignee_index_sql(self) -> str:
        """The index of active jobs by assignee (``mark_worker_unresponsive``), on a
        prefix of the id: a B-tree entry is limited to about 2.7 kB and an assignee id
        is not (queries also compare the whole id). Every claim adds an entry; with the
        hash index of version 2, which takes ids of any length, a Worker's
        complete-and-claim statement measured 2-3% slower (likely because all of one
        worker's entries fall in one hash bucket, dead ones included until vacuum)."""
        return f"""CREATE INDEX jobs_active_assignee ON {self._t}
                    ({ASSIGNEE_PREFIX.format("assignee_id")}) WHERE status IN {ACTIVE_IN};"""

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
                        WHERE {DUE} AND tag_keys <> '{{}}';"""
                + self._eligible_indexes_sql()
            )
            await _upgrade_step(2)
        if version < 5:  # 5: lists by tag walk jobs_idle_tagged, not jobs_idle_list
            await conn.execute(self._listing_indexes_sql(conn))
            await _upgrade_step(3)
        if version < 6:  # 6: cleanup walks jobs_idle_status; jobs_completed is gone
            await conn.execute(f"DROP INDEX {s}.jobs_completed;" + self._completed_index_sql())
            await _upgrade_step(5)
        if version < 7:  # 7: the text keys compare as bytes (no table rewrite; every
            # index and the type statistics are built again)
            await conn.execute(
                f"ALTER TABLE {t} "
                + ", ".join(f'ALTER COLUMN {c} TYPE text COLLATE "C"' for c in _KEY_COLUMNS)
            )
            await _upgrade_step(6)
        await conn.execute(f"UPDATE {s}.jobpool_version SET version = {SCHEMA_VERSION}")
        await _upgrade_step(4)
        logger.info("upgraded store %r from version %d to %d", self.schema, version, SCHEMA_VERSION)
