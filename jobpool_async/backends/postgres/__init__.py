"""PostgreSQL backend on asyncpg: many processes and hosts share one queue.

* Tables live in their own PostgreSQL schema (``schema=``), created and versioned
  on :meth:`PostgresBackend.open` under an advisory lock, so several processes may
  open the same store at once.
* Claiming is one ``UPDATE … WHERE ctid IN (SELECT ctid … FOR UPDATE SKIP LOCKED
  LIMIT n) RETURNING …`` statement over a partial index of eligible jobs in
  selection order (the locked rows are fetched again by tuple id, not by key).
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
* An enqueue of :data:`COPY_INSERT` new jobs or more (without tags, messages or
  time fields) is a binary ``COPY`` and its ``NOTIFY`` in one transaction; the
  columns it leaves out take the table's defaults (:data:`COPY_DEFAULTS`).

The package, by concern: ``_backend`` (the class and its calls), ``_statements``
(the SQL text), ``_schema`` (tables, indexes, store upgrades), ``_notifications``
(LISTEN/NOTIFY and its supervision), ``_maintenance`` (self-vacuum),
``_connections`` (asyncpg connection handling).

asyncpg is the optional ``postgres`` extra: ``pip install 'jobpool_async[postgres]'``.
"""

from ._backend import LOST_CLAIM_MESSAGE, PROBE_INTERVAL, PostgresBackend
from ._maintenance import VACUUM_COST_DELAY_MS, VACUUM_MIN_CHANGES
from ._schema import COPY_DEFAULTS, SCHEMA_VERSION
from ._statements import COPY_INSERT

__all__ = [
    "COPY_DEFAULTS",
    "COPY_INSERT",
    "LOST_CLAIM_MESSAGE",
    "PROBE_INTERVAL",
    "SCHEMA_VERSION",
    "VACUUM_COST_DELAY_MS",
    "VACUUM_MIN_CHANGES",
    "PostgresBackend",
]
