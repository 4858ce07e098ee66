"""SQLite backend: one file in WAL mode, shared safely by several processes.

Built on aiosqlite, which owns one connection and the one thread it runs in. Every
backend call runs as **one function in that thread** (one ``await``, one hop):
the whole transaction — ``BEGIN IMMEDIATE``, its statements and ``COMMIT`` — or a
single self-committing statement such as the claim's ``UPDATE … RETURNING``.
A thread hop costs more than the SQL of a typical call, so this is what makes the
backend fast; see ``docs/sqlite.md`` for the measurements.

Storage layout (schema version :data:`SCHEMA_VERSION`, marked by
``PRAGMA application_id`` so foreign databases are recognised and left alone):

* ``jobs``: one row per job; ``seq`` (the rowid) is the job's priority cluster and
  its place in enqueue order (:data:`_ORDER_BITS`; the counter is ``jobs_order``),
  so rows of one priority are stored together; datetimes are INTEGER microseconds
  since the Unix epoch (exact round trip, UTC); tags are a JSON array in the order
  given. ``list_state`` is a small code of the status (:data:`_STATE_CODES`; NULL
  while RUNNING/CANCELLING), set by every statement that moves a job (store version
  6): the partial indexes below are keyed and filtered by it instead of by
  expressions over ``status``, which SQLite evaluated for the old and the new row of
  every move.
* ``job_tags(seq, tag, sort_key, created_at, prio)``: one row per (job, tag);
  ``sort_key`` is the job's due key while the job is eligible and due and NULL
  otherwise, kept in step by triggers on ``jobs`` within the same statement;
  ``prio`` its priority.
* ``wait_until``: set (to ``scheduled_at``) while an eligible job waits for its
  schedule; a claim at or after that time first clears it ("promotes" the job).
* Partial indexes: due eligible jobs in selection order (priority descending, due
  key, seq; globally and per tag), waiting jobs by ``wait_until``, active jobs per
  assignee, completed jobs finalized before their creation time by ``finalized_at``
  (the others are found through the listing index by status, store version 7).
  Claiming reads only the eligible-jobs index, so its cost does not grow with the
  number of finished jobs, nor with the number of jobs scheduled for later.
* Listing (:meth:`SQLiteBackend.list_jobs`): every job by ``(created_at, id)``,
  per type likewise, per idle status by priority then ``(created_at, id)`` (a page
  merges the priorities' runs), and per tag by ``job_tags.created_at``. Stores
  made before listing existed get these on open (:data:`_LISTING`), without a
  version change, because older code keeps every part up to date too (the indexes
  by themselves; ``job_tags.created_at`` through a trigger that fills it when an
  older insert leaves it NULL).

* ``leases(assignee_id, holder, first_seen_at, renewed_at, expires_at)``: one row per
  assignee and queue holding its lease (SPEC §8.4). Added in place, when missing, to
  a store written before leases existed (older code ignores it, so the schema
  version is unchanged).

Stores of versions 1-6 are upgraded in place on open, in one transaction
(:func:`_upgrade`).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

import aiosqlite

from ._files import check_parent
from ._sql import (
    CLAIMED_FIELDS,
    JOB,
    JOB_COLUMNS,
    JOB_FIELDS,
    STATUS,
    not_moved,
    read_job,
    set_clause,
)
from .base import (
    ACTIVE,
    ASSIGN,
    ELIGIBLE,
    LEASE_EXPIRED,
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
    LeaseRow,
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
    plan_rescue,
    refill_limit,
)

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "SQLiteBackend"]

T = TypeVar("T")

#: ``PRAGMA application_id`` of a jobpool store ("JPOL"): tells our files from others.
APPLICATION_ID: Final = 0x4A504F4C
#: ``PRAGMA user_version`` of the schema this module creates and reads.
SCHEMA_VERSION: Final = 7

#: Pages the WAL may grow to before a commit checkpoints it (SQLite's default: 1000).
#: Each checkpoint syncs the WAL and the database file; every job is written three
#: times (insert, claim, completion), so at the default a busy queue checkpoints every
#: few hundred jobs. 10,000 pages (about 40 MB of WAL at 4 KiB pages) measured about 7%
#: less SQLite work per job over 200,000 jobs; durability is unchanged (a commit is in
#: the WAL either way).
WAL_AUTOCHECKPOINT_PAGES: Final = 10_000
#: Page cache per connection in KiB (SQLite's default: 2,000).
CACHE_KIB: Final = 16_384

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_new_object: Final = object.__new__
_tuple_new: Final = tuple.__new__
_US: Final = timedelta(microseconds=1)


def _one_of(statuses: frozenset[JobStatus], column: str = "status") -> str:
    """``(status = 'a' OR status = 'b')``: like ``IN``, but SQLite builds no temporary
    index for it on every execution (measured: ~1 µs per row and list with ``IN``)."""
    return "(" + " OR ".join(f"{column} = '{s.value}'" for s in sorted(statuses)) + ")"


#: By status: the conditions of the indexes of store versions 2-5 (what the upgrades
#: from them create and drop) and of the ``jobs_tag_eligibility`` trigger.
_ELIG_STATUS = _one_of(ELIGIBLE)
_IDLE = f"NOT {_one_of(ACTIVE)}"
#: The code of an idle status: ``jobs.list_state`` (NULL while RUNNING/CANCELLING), the
#: key of ``jobs_list_prio``; a small number (one byte in the index, where the status
#: name took up to 15), COMPLETED's the largest. Completions then add
#: their entries at the index's right edge, SQLite's cheapest insert; with COMPLETED
#: sorted before INITIAL_PENDING (by name) they went into the middle of the index, next
#: to the oldest pending jobs, and split pages there once those were never claimed
#: (a million jobs scheduled for later cost the claim cycle 15-25% that way).
_STATE_CODES: Final = {
    s: i
    for i, s in enumerate(
        [
            JobStatus.INITIAL_PENDING,
            JobStatus.FAILED_RETRY,
            JobStatus.UNKNOWN_RETRY,
            JobStatus.STOPPED,
            JobStatus.UNSCHEDULED,
            JobStatus.UNKNOWN_STOPPED,
            JobStatus.DISCARDED,
            JobStatus.COMPLETED,
        ],
        1,
    )
}


def _state(column: str = "status") -> str:
    """The code of the status in ``column`` (NULL if active): what ``list_state`` holds,
    and the key of the listing indexes of store versions 3-5."""
    whens = " ".join(f"WHEN '{s.value}' THEN {code}" for s, code in _STATE_CODES.items())
    return f"CASE {column} {whens} END"


#: Eligible (INITIAL_PENDING, FAILED_RETRY, UNKNOWN_RETRY: the lowest codes) and
#: active (RUNNING, CANCELLING: no code), by ``list_state`` (store version 6): the
#: conditions of ``jobs_eligible``, ``jobs_waiting`` and ``jobs_active``. SQLite
#: checks an index's condition for the old and the new row of every move; by status
#: each took two or three text comparisons.
_LAST_ELIGIBLE: Final = max(_STATE_CODES[s] for s in ELIGIBLE)
if {s for s, code in _STATE_CODES.items() if code <= _LAST_ELIGIBLE} != ELIGIBLE:
    raise RuntimeError("the eligible statuses must have the lowest codes")  # pragma: no cover
if set(_STATE_CODES) != set(JobStatus) - ACTIVE:
    raise RuntimeError("every idle status needs a code, and no active one")  # pragma: no cover
_ELIG: Final = f"list_state <= {_LAST_ELIGIBLE}"
_ACTIVE: Final = "list_state IS NULL"


def _listed_by_state(status: JobStatus, prefix: str = "") -> str:
    """The condition that walks ``jobs_list_prio`` for an idle ``status`` (it repeats
    the index's condition, so SQLite uses it)."""
    return f"{prefix}{_LISTED} AND {prefix}list_state = {_STATE_CODES[status]}"


#: Idle: the jobs in ``jobs_list_prio``.
_LISTED: Final = "list_state IS NOT NULL"


#: Idle jobs by status, newest first (store versions 3 and 4). Jobs sat in it by
#: enqueue time, so claims and completions taking jobs by priority changed entries all
#: over it (mixed priorities: 15.8 pages written per commit of the claim cycle,
#: against 4.2 with one priority).
_LIST_STATE_4: Final = (
    f"CREATE INDEX IF NOT EXISTS jobs_list_state ON jobs ({_state()}, created_at, id) WHERE {_IDLE}"
)
#: Idle jobs (not RUNNING/CANCELLING: those are listed through ``jobs_active``) by
#: status and priority, newest first within a priority (store version 5). A claim
#: takes the entries of one priority and its completion adds them to one priority's
#: run of COMPLETED, each next to each other (one or two pages per commit, as with one
#: priority); a listing merges the runs of the priorities present (:func:`_list_merged`).
#: Since store version 6 its key is the stored ``list_state``, which every move sets
#: (a literal in a claim or a completion) instead of an expression over ``status``
#: that SQLite computed for the old and the new row of every move (and checked the
#: partial index's condition, two text comparisons, for each): the drain's claim cycle
#: did 2.2% more work per job that way.
_LIST_PRIO: Final = (
    "CREATE INDEX IF NOT EXISTS jobs_list_prio ON jobs "
    f"(list_state, priority, created_at, id) WHERE {_LISTED}"
)

#: The finalized jobs (COMPLETED or another final status) whose completion time is
#: before their (caller-given) creation time (store version 7): the COMPLETED ones among
#: them are what ``delete_completed_before`` cannot find by walking ``jobs_list_prio``'s
#: COMPLETED runs up to the cutoff by ``created_at`` (a job finalized by the cutoff was
#: created by then, unless it is here). A completion normally adds no entry here, and a
#: claim does not look at it (its ``SET`` names neither column). Until version 6 this
#: was ``jobs_completed``, every completed job by ``finalized_at``: one index entry more
#: per completion, 3.0% of the storage thread's instructions in the drain's claim cycle
#: and 1.7 of its 11.0 WAL frames per commit (benchmarks/results/sqlite-session10.md).
_COMPLETED_CODE: Final = _STATE_CODES[JobStatus.COMPLETED]
_COMPLETED_EARLY: Final = (
    "CREATE INDEX jobs_finalized_early ON jobs (finalized_at) WHERE finalized_at < created_at"
)

_SORT = "COALESCE(scheduled_at, last_retry_at, created_at)"
#: Eligible and due (not waiting for a schedule): what a claim may take.
_DUE = f"{_ELIG} AND wait_until IS NULL"
#: Eligible and waiting for its schedule.
_WAITING = f"wait_until IS NOT NULL AND {_ELIG}"
#: Seconds between a claim's looks for jobs that came due, when this process knows of
#: none (another process sharing the file may have scheduled some).
PROBE_INTERVAL: Final = 0.1


def _due(prefix: str) -> str:
    return f"({_one_of(ELIGIBLE, prefix + '.status')} AND {prefix}.wait_until IS NULL)"


def _due_key(prefix: str) -> str:
    return f"COALESCE({prefix}.scheduled_at, {prefix}.last_retry_at, {prefix}.created_at)"


#: A job's ``seq`` (its rowid): the low :data:`_ORDER_BITS` count enqueue order (a
#: counter kept in ``jobs_order``), the bits above them are its priority's cluster
#: (:func:`_cluster`; 0 for priority 0). Rows of one priority are thereby stored
#: together, in enqueue order: a claim takes jobs in priority order, and the rows it
#: changes (and their completions) then sit on one or two table pages instead of one
#: page per job. ``seq`` still orders the jobs of one priority as they were enqueued
#: (the claim's tie-break); enqueue order across priorities is ``seq & _ORDER_MASK``.
_ORDER_BITS: Final = 40
_ORDER_MASK: Final = (1 << _ORDER_BITS) - 1
_ORDER_TABLE: Final = "CREATE TABLE jobs_order (next INTEGER NOT NULL)"
#: Reserves ``?`` counter values; returns the first.
_RESERVE: Final = "UPDATE jobs_order SET next = next + ?1 RETURNING next - ?1"


def _cluster(priority: int) -> int:
    """The high bits of the ``seq`` of a job of ``priority``: priority 0 has cluster 0
    (its seqs are the plain counter, as in store version 3), then 1, -1, 2, -2 … have
    1, 2, 3, 4 … (at most 65,536: 57 bits in all)."""
    index = 2 * priority - 1 if priority > 0 else -2 * priority
    return index << _ORDER_BITS


#: The indexes of eligible jobs: due ones in selection order, waiting ones by due time,
#: and the active jobs by assignee (store version 6: by ``list_state``).
_JOBS_ELIGIBLE: Final = (
    f"CREATE INDEX jobs_eligible ON jobs (priority DESC, {_SORT}, seq) WHERE {_DUE}",
    f"CREATE INDEX jobs_waiting ON jobs (wait_until) WHERE {_WAITING}",
    f"CREATE INDEX jobs_active ON jobs (assignee_id) WHERE {_ACTIVE}",
)
#: The version 2 parts of the schema (also what an upgrade from version 1 creates; its
#: first two indexes by status, as in versions 2-5: :func:`_upgrade_5_to_6` makes them
#: again by ``list_state``).
_SCHEMA_2: Final = (
    f"CREATE INDEX jobs_eligible ON jobs (priority DESC, {_SORT}, seq) "
    f"WHERE {_ELIG_STATUS} AND wait_until IS NULL",
    "CREATE INDEX jobs_waiting ON jobs (wait_until) "
    f"WHERE wait_until IS NOT NULL AND {_ELIG_STATUS}",
    "CREATE INDEX job_tags_eligible ON job_tags (tag, prio DESC, sort_key, seq) "
    "WHERE sort_key IS NOT NULL",
    f"""CREATE TRIGGER jobs_tag_eligibility
        AFTER UPDATE OF status, last_retry_at, scheduled_at, wait_until ON jobs
        WHEN new.tags <> '[]' AND (
            {_due("old")} <> {_due("new")}
            OR ({_due("new")} AND {_due_key("old")} IS NOT {_due_key("new")}))
        BEGIN
            UPDATE job_tags
            SET sort_key = CASE WHEN {_due("new")} THEN {_due_key("new")} END
            WHERE seq = new.seq;
        END""",
)

_SCHEMA: Final = (
    """CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        job_type TEXT NOT NULL,
        job_definition BLOB NOT NULL,
        tags TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        finalized_at INTEGER,
        error_message TEXT NOT NULL,
        result BLOB,
        retry_count INTEGER NOT NULL,
        last_retry_at INTEGER,
        assignee_id TEXT NOT NULL,
        assigned_at INTEGER,
        scheduled_at INTEGER,
        priority INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        wait_until INTEGER,
        list_state INTEGER
    )""",
    *_JOBS_ELIGIBLE,
    _COMPLETED_EARLY,
    """CREATE TABLE job_tags (
        seq INTEGER NOT NULL,
        tag TEXT NOT NULL,
        sort_key INTEGER,
        created_at INTEGER,
        prio INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (seq, tag)
    ) WITHOUT ROWID""",
    "CREATE INDEX job_tags_tag ON job_tags (tag, seq)",
    *_SCHEMA_2[2:],
    """CREATE TRIGGER jobs_tag_delete AFTER DELETE ON jobs WHEN old.tags <> '[]'
        BEGIN
            DELETE FROM job_tags WHERE seq = old.seq;
        END""",
    _ORDER_TABLE,
    "INSERT INTO jobs_order (next) VALUES (1)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

#: The indexes that serve ``list_jobs`` (newest first by ``created_at``, then id), and
#: the trigger that keeps ``job_tags.created_at`` filled when code older than them
#: inserts tag rows; created with the schema, and on open in stores made before.
_LISTING: Final = (
    "CREATE INDEX IF NOT EXISTS jobs_list ON jobs (created_at, id)",
    # Statuses by a code, not by plain status: an index on plain status would tempt
    # the planner into claiming through it (then sorting every eligible job). Without
    # RUNNING/CANCELLING jobs (listed through jobs_active): a claim and a completion
    # then each change one entry, not two (measured: an index of every status cost 15%
    # of the end-to-end rate, one without the active jobs 3-4%, within noise of none).
    "DROP INDEX IF EXISTS jobs_list_status",  # the full one, briefly on main
    _LIST_PRIO,
    "CREATE INDEX IF NOT EXISTS jobs_list_type ON jobs (job_type, created_at, id)",
    "CREATE INDEX IF NOT EXISTS job_tags_list ON job_tags (tag, created_at, seq)",
    """CREATE TRIGGER IF NOT EXISTS job_tags_created AFTER INSERT ON job_tags
        WHEN new.created_at IS NULL
        BEGIN
            UPDATE job_tags SET created_at = (SELECT created_at FROM jobs WHERE seq = new.seq)
            WHERE seq = new.seq AND tag = new.tag;
        END""",
)
_LISTING_NAMES: Final = frozenset(
    {
        "jobs_list",
        "jobs_list_prio",
        "jobs_list_type",
        "job_tags_list",
        "job_tags_created",
    }
)
#: The lease records (SPEC §8.4); created with the schema, or on the first open of a
#: store written before leases existed.
_LEASES_TABLE: Final = """CREATE TABLE IF NOT EXISTS leases (
        assignee_id TEXT NOT NULL,
        holder TEXT NOT NULL,
        first_seen_at INTEGER NOT NULL,
        renewed_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (assignee_id, holder)
    ) WITHOUT ROWID"""

_INSERT_TAG: Final = (
    "INSERT INTO job_tags (seq, tag, sort_key, created_at, prio) VALUES (?, ?, ?, ?, ?)"
)
_IDS: Final = "SELECT value FROM json_each(?)"


#: The ``SET`` list of a move (:func:`set_clause`), ``list_state`` included: every
#: statement that changes a status is built by this, and each moves only jobs in one
#: of the transition's sources (its ``WHERE`` checks them).
_sets: Final = functools.partial(set_clause, codes=_STATE_CODES, sources_checked=True)


_ASSIGN_SET: Final = _sets(ASSIGN, now="?1", assignee_id="?2")
#: The statements that find eligible jobs name their index: ``list_state <= 3`` is a
#: range on the first column of ``jobs_list_prio`` too, which the planner may take
#: (every idle job, then a sort) where it knows no better.
_HAS_ELIGIBLE: Final = f"SELECT 1 FROM jobs INDEXED BY jobs_eligible WHERE {_DUE} LIMIT 1"
_PROMOTE: Final = (
    f"UPDATE jobs INDEXED BY jobs_waiting SET wait_until = NULL "
    f"WHERE {_WAITING} AND wait_until <= ?"
)

#: What a claim returns: the columns it did not set (status, assignee and assignment
#: time are the claim's own), as :data:`_CLAIM_HEAD` and one more column, NULL when the
#: rest (:data:`_CLAIM_REST`) have a plain job's first run's values (no tags, priority 0,
#: no schedule, started now, one attempt, no outcome, retry or attempt limit), else a
#: JSON array of them (the tags as an array, the result as hex). Each column a
#: statement returns costs SQLite and the sqlite3 module about 1,100 instructions per
#: row (the module releases and takes the GIL for each): the drain's claim cycle
#: returned 15 columns per job, then 8, now 5.
#: (:func:`_claimed` unpacks each row in this order.)
_CLAIM_HEAD: Final = ("id", "job_type", "job_definition", "created_at")
_CLAIM_REST: Final = (
    "tags", "priority", "scheduled_at", "started_at", "finalized_at", "error_message",
    "result", "retry_count", "last_retry_at", "max_attempts", "attempts",
)  # fmt: skip
if sorted(_CLAIM_HEAD + _CLAIM_REST) != sorted(CLAIMED_FIELDS):  # pragma: no cover
    raise RuntimeError("the SQLite claim's columns do not match CLAIMED_FIELDS")
_FIRST_RUN: Final = (
    "tags = '[]' AND priority = 0 AND scheduled_at IS NULL "
    "AND started_at = ?1 AND attempts = 1 AND finalized_at IS NULL AND result IS NULL "
    "AND retry_count = 0 AND last_retry_at IS NULL AND max_attempts IS NULL "
    "AND error_message = ''"
)
_IN_JSON: Final = {"tags": "json(tags)", "result": "iif(result IS NULL, NULL, hex(result))"}
_REST_JSON: Final = "json_array(" + ", ".join(_IN_JSON.get(c, c) for c in _CLAIM_REST) + ")"
_CLAIM_RETURNING: Final = (
    f"{', '.join(_CLAIM_HEAD)}, CASE WHEN {_FIRST_RUN} THEN NULL ELSE {_REST_JSON} END"
)
_NEXT_DUE: Final = (
    f"SELECT wait_until FROM jobs INDEXED BY jobs_waiting WHERE {_WAITING} "
    "ORDER BY wait_until LIMIT 1"
)
#: The claim without tags: one self-committing statement (the ``?3`` oldest eligible).
CLAIM_SQL: Final = (
    f"UPDATE jobs SET {_ASSIGN_SET} WHERE {_ELIG} AND seq IN ("
    f"SELECT seq FROM jobs INDEXED BY jobs_eligible WHERE {_DUE} "
    f"ORDER BY priority DESC, {_SORT}, seq LIMIT ?3"
    f") RETURNING {_CLAIM_RETURNING}"
)


def _tag_filter(several: bool, first: int) -> tuple[str, str]:
    """A ``WITH`` prefix and a condition: ``t0`` is a ``job_tags`` row of tag
    ``?first`` whose job has the other tags of the filter too (params:
    :func:`_tag_params`).

    The other tags are a JSON list (``?first+1``), materialised once per statement,
    and the condition is "none of them is missing from the job" (two ``NOT EXISTS``,
    checked through the ``(seq, tag)`` key): one term whatever the number of tags,
    so no filter is too large for SQLite's expression depth limit (1,000), and as
    cheap as one ``EXISTS`` per tag was.
    """
    cond = f"t0.tag = ?{first}"
    if not several:
        return "", cond
    return (
        f"WITH w(tag) AS MATERIALIZED (SELECT value FROM json_each(?{first + 1})) ",
        f"{cond} AND NOT EXISTS (SELECT 1 FROM w WHERE NOT EXISTS ("
        "SELECT 1 FROM job_tags x WHERE x.seq = t0.seq AND x.tag = w.tag))",
    )


def _tag_params(tags: Sequence[str]) -> tuple[str, ...]:
    """The parameters of :func:`_tag_filter`: the leading tag, then (with more) the
    JSON list of the others."""
    if len(tags) == 1:
        return (tags[0],)
    return tags[0], json.dumps([t for t in dict.fromkeys(tags) if t != tags[0]])


@functools.lru_cache(maxsize=2)
def claim_tags_sql(several: bool) -> str:
    """The claim of jobs carrying one tag or ``several`` (params: now, assignee,
    limit, then :func:`_tag_params`). Walks the per-tag eligible index of the first
    tag in selection order."""
    with_, cond = _tag_filter(several, 4)
    return (
        f"UPDATE jobs SET {_ASSIGN_SET} WHERE {_ELIG} AND seq IN ("
        f"{with_}SELECT t0.seq FROM job_tags t0 WHERE {cond} AND t0.sort_key IS NOT NULL "
        f"ORDER BY t0.prio DESC, t0.sort_key, t0.seq LIMIT ?3"
        f") RETURNING {_CLAIM_RETURNING}"
    )


@functools.lru_cache(maxsize=2)
def _tagged_seqs(several: bool) -> str:
    """A subquery of the seqs of jobs carrying one tag or ``several`` (params:
    :func:`_tag_params`)."""
    with_, cond = _tag_filter(several, 1)
    return f"{with_}SELECT t0.seq FROM job_tags t0 WHERE {cond}"


# --- conversions ----------------------------------------------------------------------


def _us(value: datetime) -> int:
    """A datetime as integer microseconds since the epoch (exact)."""
    return (value - _EPOCH) // _US


def _dt(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(0, 0, value)


def _tag_tuple(text: str) -> tuple[str, ...]:
    return () if text == "[]" else tuple(json.loads(text))


def _tags(text: str) -> list[str]:
    if text == "[]":
        return []
    return cast(list[str], json.loads(text))


def _dt_memo() -> Callable[[int | None], datetime | None]:
    """:func:`_dt` converting each distinct value once (datetimes are immutable): the
    rows of one call share timestamps (the assignment time of a claimed batch, the
    creation time of a batch enqueue)."""
    seen: dict[int | None, datetime | None] = {None: None}

    def dt(value: int | None) -> datetime | None:
        try:
            return seen[value]
        except KeyError:
            assert value is not None
            out: datetime = _EPOCH + timedelta(0, 0, value)
            seen[value] = out
            return out

    return dt


def _jobs(rows: Sequence[Sequence[Any]]) -> list[Job]:
    """:class:`Job` objects from rows of ``JOB_COLUMNS``.

    Each distinct timestamp is converted once (:func:`_dt_memo`).
    """
    dt = _dt_memo()
    c = JOB
    return [
        read_job(
            row, c, STATUS[row[c.status]], row[c.assignee_id], dt(row[c.assigned_at]), dt, _tags
        )
        for row in rows
    ]


def _claimed(rows: Sequence[Sequence[Any]], assignee_id: str, now: datetime) -> list[Job]:
    """The :class:`Job` objects of a claim's rows (:data:`_CLAIM_RETURNING`), assigned
    to ``assignee_id`` at ``now``; a first run's ``started_at`` is ``now`` too.

    Each field is set on a bare instance, as :meth:`Job.copy` does: ``Job(...)`` with
    keyword arguments cost 20.6k instructions per job here, this 4.6k (callgrind); the
    creation times of a batch enqueue are one value, converted once."""
    now_us = _us(now)
    running = JobStatus.RUNNING
    epoch = _EPOCH
    new = _new_object
    created: dict[int, datetime] = {}
    jobs: list[Job] = []
    add = jobs.append
    for job_id, job_type, definition, created_us, rest in rows:
        job: Job = new(Job)
        job.id = job_id
        job.job_type = job_type
        job.job_definition = definition
        job.status = running
        at = created.get(created_us)
        if at is None:
            at = created[created_us] = epoch + timedelta(0, 0, created_us)
        job.created_at = at
        job.assignee_id = assignee_id
        job.assigned_at = now
        if rest is None:  # a plain job's first run: started now, one attempt, no more
            job.tags = []
            job.started_at = now
            job.finalized_at = None
            job.error_message = ""
            job.result = None
            job.retry_count = 0
            job.last_retry_at = None
            job.scheduled_at = None
            job.priority = 0
            job.max_attempts = None
            job.attempts = 1
        else:
            (
                job.tags,
                job.priority,
                scheduled,
                started,
                finalized,
                job.error_message,
                hexed,
                job.retry_count,
                retried,
                job.max_attempts,
                job.attempts,
            ) = json.loads(rest)
            job.scheduled_at = None if scheduled is None else epoch + timedelta(0, 0, scheduled)
            job.started_at = now if started == now_us else epoch + timedelta(0, 0, started)
            job.finalized_at = None if finalized is None else epoch + timedelta(0, 0, finalized)
            job.result = None if hexed is None else bytes.fromhex(hexed)
            job.last_retry_at = None if retried is None else epoch + timedelta(0, 0, retried)
        add(job)
    return jobs


# --- functions run in the connection's thread -------------------------------------------
#
# Each takes the raw ``sqlite3.Connection`` (autocommit mode: ``isolation_level=None``)
# and is run whole by one hop. Multi-statement work goes through ``_transaction``,
# which rolls back on any error so a failed call leaves the store as it was.


def _transaction(conn: sqlite3.Connection, body: Callable[..., T], *args: Any) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        out = body(conn, *args)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    return out


def _classify(conn: sqlite3.Connection, path: str) -> bool:
    """True if this is a jobpool store of our schema, False if it is empty; else raise."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id == APPLICATION_ID:
        if version not in _UPGRADABLE and version != SCHEMA_VERSION:
            raise StorageError(
                f"{path}: jobpool SQLite store has schema version {version}, "
                f"this version of jobpool_async reads version {SCHEMA_VERSION}"
            )
        tables = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' "
            "AND name IN ('jobs', 'job_tags')"
        ).fetchone()[0]
        if tables != 2:
            raise StorageError(f"{path}: jobpool SQLite store is damaged (tables missing)")
        return True
    objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if app_id == 0 and version == 0 and objects == 0:
        return False
    raise StorageError(
        f"{path} is not a jobpool store (an SQLite database of another application); "
        "it was not modified"
    )


def _open_store(conn: sqlite3.Connection, path: str, synchronous: str, busy_ms: int) -> None:
    """Check (or create) the schema, then switch to WAL and set durability."""
    conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    try:
        # One read transaction: the header and the schema from the same moment, even
        # while another process creates the store (else its commit could fall between
        # the reads and make a fresh store look like another application's).
        conn.execute("BEGIN")
        try:
            ours = _classify(conn, path)
        finally:
            conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        if exc.sqlite_errorcode != sqlite3.SQLITE_NOTADB:  # random bytes
            raise
        raise StorageError(f"{path} is not a jobpool store ({exc}); it was not modified") from exc
    mode = _use_wal(conn, busy_ms)
    if str(mode).lower() != "wal":
        raise StorageError(f"{path}: cannot use WAL journal mode (got {mode!r})")
    if not ours:
        _transaction(conn, _create_schema, path)
    elif conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
        _transaction(conn, _upgrade, path)
    if not _has_listing(conn):
        _transaction(conn, _add_listing)
    if not conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'leases'"
    ).fetchone():
        _transaction(conn, _add_leases_table)
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
    conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")


def _use_wal(conn: sqlite3.Connection, busy_ms: int) -> object:
    """Switch to WAL; return the journal mode SQLite reports.

    While another connection holds a write transaction on the file (several queues
    opening one new store at once: one of them is creating the schema), SQLite refuses
    the switch with SQLITE_BUSY at once, without calling the busy handler (it does so
    where waiting could deadlock). So it is tried again here, as the busy handler would,
    until ``busy_ms`` have passed.
    """
    deadline = time.monotonic() + busy_ms / 1000
    pause = 0.001
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)  # the storage thread's own wait, as SQLite's busy handler's
        pause = min(pause * 2, 0.05)


#: Store versions this code upgrades in place on open.
_UPGRADABLE: Final = (1, 2, 3, 4, 5, 6)


def _upgrade(conn: sqlite3.Connection, path: str) -> None:
    """Upgrade to :data:`SCHEMA_VERSION`, step by step, inside the caller's write
    transaction: all of it or nothing. Every job and counter is kept."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:  # another process upgraded it meanwhile
        return
    if version not in _UPGRADABLE:
        raise StorageError(f"{path}: cannot upgrade SQLite store version {version}")
    if _UPGRADE_HOOK is not None:
        _UPGRADE_HOOK(conn)
    if version == 1:
        _upgrade_1_to_2(conn)
    if version <= 2:
        _upgrade_2_to_3(conn)
    if version <= 3:
        _upgrade_3_to_4(conn)
    if version <= 4:
        _upgrade_4_to_5(conn)
    if version <= 5:
        _upgrade_5_to_6(conn)
    _upgrade_6_to_7(conn)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _upgrade_1_to_2(conn: sqlite3.Connection) -> None:
    """Schedules, priorities, attempts: their columns and the eligible indexes in the
    new order. ``attempts`` of jobs from a version 1 store start at 0 (runs before the
    upgrade were not counted)."""
    for column in (
        "scheduled_at INTEGER",
        "priority INTEGER NOT NULL DEFAULT 0",
        "max_attempts INTEGER",
        "attempts INTEGER NOT NULL DEFAULT 0",
        "wait_until INTEGER",
    ):
        conn.execute(f"ALTER TABLE jobs ADD COLUMN {column}")
    conn.execute("ALTER TABLE job_tags ADD COLUMN prio INTEGER NOT NULL DEFAULT 0")
    for old in ("INDEX jobs_eligible", "INDEX job_tags_eligible", "TRIGGER jobs_tag_eligibility"):
        conn.execute(f"DROP {old}")
    for statement in _SCHEMA_2:
        conn.execute(statement)


def _upgrade_2_to_3(conn: sqlite3.Connection) -> None:
    """``jobs_list_idle`` (statuses by name) becomes ``jobs_list_state`` (COMPLETED
    last). A store made before listing has neither; :func:`_add_listing` adds the rest."""
    conn.execute("DROP INDEX IF EXISTS jobs_list_idle")
    conn.execute(_LIST_STATE_4)


def _upgrade_3_to_4(conn: sqlite3.Connection) -> None:
    """The enqueue counter moves out of ``seq`` into ``jobs_order`` (see
    :data:`_ORDER_BITS`). The stored jobs keep their seqs: plain counter values, below
    every clustered seq of their priority, as they were enqueued before any of those."""
    conn.execute(_ORDER_TABLE)
    conn.execute("INSERT INTO jobs_order (next) SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs")


def _upgrade_4_to_5(conn: sqlite3.Connection) -> None:
    """``jobs_list_state`` (idle jobs by status) goes; :func:`_upgrade_5_to_6` makes
    ``jobs_list_prio`` (by status and priority) in its place."""
    conn.execute("DROP INDEX IF EXISTS jobs_list_state")


def _upgrade_5_to_6(conn: sqlite3.Connection) -> None:
    """Every job's ``list_state`` is filled from its status, and the indexes whose key
    or condition was an expression over the status (``jobs_eligible``,
    ``jobs_waiting``, ``jobs_active``, ``jobs_list_prio``) are made again over it;
    ``jobs_completed`` goes (:func:`_upgrade_6_to_7` makes its successor). A store made
    before listing has no ``jobs_list``: then :func:`_add_listing` adds
    ``jobs_list_prio`` with the rest."""
    conn.execute("ALTER TABLE jobs ADD COLUMN list_state INTEGER")
    conn.execute(f"UPDATE jobs SET list_state = {_state()}")
    for name in ("jobs_eligible", "jobs_waiting", "jobs_active", "jobs_completed"):
        conn.execute(f"DROP INDEX {name}")
    for statement in _JOBS_ELIGIBLE:
        conn.execute(statement)
    conn.execute("DROP INDEX IF EXISTS jobs_list_prio")
    if conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'jobs_list'"
    ).fetchone():
        conn.execute(_LIST_PRIO)


def _upgrade_6_to_7(conn: sqlite3.Connection) -> None:
    """``jobs_completed`` (every completed job by ``finalized_at``) gives way to
    ``jobs_finalized_early`` (only the jobs finalized before their creation time): the
    rest are found through ``jobs_list_prio`` (:func:`_purge_sql`)."""
    conn.execute("DROP INDEX IF EXISTS jobs_completed")
    conn.execute(_COMPLETED_EARLY)


#: Called with the connection when an upgrade begins (tests: a crash inside it).
_UPGRADE_HOOK: Callable[[sqlite3.Connection], None] | None = None


def _create_schema(conn: sqlite3.Connection, path: str) -> None:
    if _classify(conn, path):  # another process created it meanwhile
        return
    for statement in _SCHEMA + _LISTING:
        conn.execute(statement)
    _add_leases_table(conn)


def _has_listing(conn: sqlite3.Connection) -> bool:
    names = {
        row[0]
        for row in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger')")
    }
    return names >= _LISTING_NAMES and "jobs_list_status" not in names


def _add_listing(conn: sqlite3.Connection) -> None:
    """Give a store made before ``list_jobs`` its listing indexes (in the caller's
    transaction; another process may have done it meanwhile)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(job_tags)")}
    if "created_at" not in columns:
        conn.execute("ALTER TABLE job_tags ADD COLUMN created_at INTEGER")
        conn.execute(
            "UPDATE job_tags SET created_at = "
            "(SELECT created_at FROM jobs WHERE jobs.seq = job_tags.seq)"
        )
    for statement in _LISTING:
        conn.execute(statement)


def _add_leases_table(conn: sqlite3.Connection) -> None:
    conn.execute(_LEASES_TABLE)


#: Rows per multi-row ``INSERT``; the remainder goes in smaller fixed sizes, so
#: only a handful of statement shapes are ever prepared.
_INSERT_SIZES: Final = (256, 64, 16, 4, 1)
#: Per inserted row: every column bound (a job enqueued with history fields set), or
#: only those a new job may carry, the rest literals (the common case: half the
#: parameters, about 2 µs per job less work in the connection's thread).
#: The columns of both, in their order (that of the parameters ``_new_params`` and
#: ``_full_params`` make).
_INSERT_COLUMNS: Final = (
    "seq, id, job_type, job_definition, tags, status, created_at, started_at, finalized_at, "
    "error_message, result, retry_count, last_retry_at, assignee_id, assigned_at, "
    "scheduled_at, priority, max_attempts, attempts, wait_until, list_state"
)
#: The ``list_state`` of a new job (INITIAL_PENDING: the only status insert receives).
_NEW_STATE: Final = _STATE_CODES[JobStatus.INITIAL_PENDING]
#: attempts 0, then wait_until and list_state
_ROW_FULL: Final = "(" + ", ".join(["?"] * 18) + f", 0, ?, {_NEW_STATE})"
_ROW_NEW: Final = (
    f"(?, ?, ?, ?, ?, '{JobStatus.INITIAL_PENDING.value}', ?, "  # status, created_at
    f"NULL, NULL, ?, NULL, 0, NULL, ?, NULL, NULL, 0, NULL, 0, NULL, {_NEW_STATE})"
)


@functools.lru_cache(maxsize=4)
def _row_timed(scheduled: bool, limited: bool) -> str:
    """The row of a new job with a time field (SPEC §8: a priority, a schedule, an
    attempt limit): ``_ROW_NEW`` plus the priority, and the schedule (twice: it waits
    until then) and the attempt limit where the job has them, NULL literals where not.

    No NULL is ever bound: the sqlite3 module looks for an adapter for every ``None``
    parameter (about 3,000 instructions each, against about 100 for a number), and
    every column bound for such jobs cost the mixed enqueue ~25,000 instructions per
    job (``_full_params``: seven NULLs a job)."""
    sched = "?" if scheduled else "NULL"
    limit = "?" if limited else "NULL"
    return (
        f"(?, ?, ?, ?, ?, '{JobStatus.INITIAL_PENDING.value}', ?, "  # status, created_at
        f"NULL, NULL, ?, NULL, 0, NULL, ?, NULL, {sched}, ?, {limit}, 0, {sched}, {_NEW_STATE})"
    )


#: Every insert is ``OR ROLLBACK``: a constraint failure (a duplicate id) ends the
#: whole transaction, as :func:`_insert` did by hand. A plain multi-row ``INSERT``
#: inside a transaction may abort alone, so SQLite keeps a statement journal for it:
#: a copy of each page it changes, spilled past 64 KiB to a temporary file (a 10,000
#: job enqueue wrote some 900 pages to such files, then unlinked them).
_INSERT_OR: Final = "INSERT OR ROLLBACK INTO jobs"


@functools.lru_cache(maxsize=6 * len(_INSERT_SIZES))
def _insert_sql(row: str, rows: int) -> str:
    return f"{_INSERT_OR} ({_INSERT_COLUMNS}) VALUES " + ", ".join([row] * rows)


_TagRow = tuple[int, str, int | None, int, int]
_Params = tuple[list[Any], list[_TagRow]]


def _insert(conn: sqlite3.Connection, jobs: Sequence[Job]) -> None:
    """Insert ``jobs`` (one multi-row statement per chunk: ~2 µs/job cheaper than
    ``executemany``) and their tags; runs inside the caller's transaction."""
    first = conn.execute(_RESERVE, (len(jobs),)).fetchone()[0]
    try:
        if not any(has_history(job) for job in jobs):
            if _insert_uniform(conn, jobs, first):
                return
            params, tag_rows = _new_params(jobs, first)
            _insert_rows(conn, _ROW_NEW, params)
        elif any(_has_past(job) for job in jobs):
            params, tag_rows = _full_params(jobs, first)
            _insert_rows(conn, _ROW_FULL, params)
        else:
            groups, tag_rows = _timed_params(jobs, first)
            for (scheduled, limited), group in groups.items():
                _insert_rows(conn, _row_timed(scheduled, limited), group)
    except sqlite3.IntegrityError:
        conn.rollback()  # (OR ROLLBACK has: earlier chunks must not count as existing)
        existing = {
            row[0]
            for row in conn.execute(
                f"SELECT id FROM jobs WHERE id IN ({_IDS})", (json.dumps([j.id for j in jobs]),)
            )
        }
        for job in jobs:
            if job.id in existing:
                raise DuplicateJobError(job.id) from None
        raise
    if tag_rows:
        conn.executemany(_INSERT_TAG, tag_rows)


def _blob(value: bytes | None) -> bytearray | None:
    """``value`` as the sqlite3 module binds it cheapest: it stores a ``bytearray`` as
    the same BLOB as ``bytes``, but looks for an adapter for every ``bytes`` parameter
    first (measured with callgrind: 11,100 instructions per one-parameter execute
    against 9,100 with the copy made, 7,800 for a ready bytearray)."""
    return None if value is None else bytearray(value)


def _has_past(job: Job) -> bool:
    """Whether a job to enqueue carries a field of a past run (a re-imported job):
    then every column is bound."""
    return (
        job.started_at is not None
        or job.finalized_at is not None
        or job.result is not None
        or job.retry_count != 0
        or job.last_retry_at is not None
        or job.assigned_at is not None
    )


def _new_row(seq: int, job: Job, created: int) -> tuple[Any, ...]:
    """The parameters a new job's row begins with (``_ROW_NEW``'s, all of them)."""
    tags = job.tags
    return (
        seq,
        job.id,
        job.job_type,
        bytearray(job.job_definition),  # see _blob
        json.dumps(tags) if tags else "[]",
        created,
        job.error_message,
        job.assignee_id,
    )


def _new_params(jobs: Sequence[Job], first: int) -> _Params:
    """The columns of ``_ROW_NEW`` for jobs without history fields, and their tags."""
    params: list[Any] = []
    tag_rows: list[_TagRow] = []
    epoch, us = _EPOCH, _US
    for seq, job in enumerate(jobs, first):
        created = (job.created_at - epoch) // us
        tags = job.tags
        params += _new_row(seq, job, created)
        if tags:
            tag_rows.extend((seq, tag, created, created, 0) for tag in tags)
    return params, tag_rows


def _timed_params(
    jobs: Sequence[Job], first: int
) -> tuple[dict[tuple[bool, bool], list[Any]], list[_TagRow]]:
    """The parameters of new jobs with time fields but no past run, by the shape of
    their row (:func:`_row_timed`: scheduled? attempt limit?), each shape's rows in
    ``seq`` order (a priority's cluster at a time, as :func:`_full_params`), and
    their tags."""
    rows: dict[tuple[bool, bool], list[tuple[Any, ...]]] = {}
    tag_rows: list[_TagRow] = []
    epoch, us = _EPOCH, _US
    for order, job in enumerate(jobs, first):
        priority = job.priority
        seq = _cluster(priority) | order if priority else order
        created = (job.created_at - epoch) // us
        tags = job.tags
        at, limit = job.scheduled_at, job.max_attempts
        row = _new_row(seq, job, created)
        scheduled = None if at is None else (at - epoch) // us
        if scheduled is not None:
            row += (scheduled, priority)
        else:
            row += (priority,)
        if limit is not None:
            row += (limit,)
        if scheduled is not None:
            row += (scheduled,)  # wait_until: it waits (a claim promotes it once due)
        shape = (scheduled is not None, limit is not None)
        group = rows.get(shape)
        if group is None:
            rows[shape] = [row]
        else:
            group.append(row)
        if tags:
            sort_key = created if scheduled is None else None
            tag_rows.extend((seq, tag, sort_key, created, priority) for tag in tags)
    groups: dict[tuple[bool, bool], list[Any]] = {}
    for shape, group in rows.items():
        group.sort(key=_first)
        groups[shape] = [value for row in group for value in row]
    return groups, tag_rows


_first: Final = itemgetter(0)


def _full_params(jobs: Sequence[Job], first: int) -> _Params:
    """Every column of every job, for jobs enqueued with history fields set; rows in
    ``seq`` order (a priority's cluster at a time: SQLite inserts the rows of one
    cluster next to each other instead of hopping between clusters)."""
    rows: list[tuple[Any, ...]] = []
    tag_rows: list[_TagRow] = []
    pending = JobStatus.INITIAL_PENDING.value  # the only status insert receives
    for order, job in enumerate(jobs, first):
        seq = _cluster(job.priority) | order
        created = _us(job.created_at)
        started, finalized, retried, assigned = (
            job.started_at,
            job.finalized_at,
            job.last_retry_at,
            job.assigned_at,
        )
        scheduled = None if job.scheduled_at is None else _us(job.scheduled_at)
        rows.append(
            (
                seq,
                job.id,
                job.job_type,
                job.job_definition,
                json.dumps(job.tags) if job.tags else "[]",
                pending,
                created,
                None if started is None else _us(started),
                None if finalized is None else _us(finalized),
                job.error_message,
                job.result,
                job.retry_count,
                None if retried is None else _us(retried),
                job.assignee_id,
                None if assigned is None else _us(assigned),
                scheduled,
                job.priority,
                job.max_attempts,
                scheduled,  # wait_until: it waits (a claim promotes it once due)
            )
        )
        if job.tags:
            sort_key = (
                None
                if scheduled is not None
                else (_us(retried) if retried is not None else created)
            )
            tag_rows.extend((seq, tag, sort_key, created, job.priority) for tag in job.tags)
    rows.sort(key=_first)
    return [value for row in rows for value in row], tag_rows


@functools.lru_cache(maxsize=len(_INSERT_SIZES))
def _uniform_sql(rows: int) -> str:
    """``rows`` new jobs of one type without tags, message or assignee: ``?1`` the
    first's ``seq`` (the others' follow it), ``?2`` the type, then each job's id,
    definition and creation time."""
    return f"{_INSERT_OR} ({_INSERT_COLUMNS}) VALUES " + ", ".join(
        f"(?1 + {k}, ?{3 * k + 3}, ?2, ?{3 * k + 4}, '[]', "
        f"'{JobStatus.INITIAL_PENDING.value}', ?{3 * k + 5}, NULL, NULL, '', NULL, 0, NULL, "
        f"'', NULL, NULL, 0, NULL, 0, NULL, {_NEW_STATE})"
        for k in range(rows)
    )


def _insert_uniform(conn: sqlite3.Connection, jobs: Sequence[Job], first: int) -> bool:
    """Insert ``jobs`` (none with history fields) binding three parameters per job,
    when they share a type and have no tags, message or assignee (an ``enqueue_jobs``
    batch usually does); False (nothing done) when they do not.

    Five parameters fewer per job than :data:`_ROW_NEW`: the drain's enqueue went
    33.3k -> 31.7k instructions per job in the connection's thread (callgrind)."""
    job_type = jobs[0].job_type
    epoch, us = _EPOCH, _US
    values: list[Any] = []
    for job in jobs:
        if job.tags or job.job_type != job_type or job.error_message or job.assignee_id:
            return False
        values += (job.id, bytearray(job.job_definition), (job.created_at - epoch) // us)
    count, start = len(jobs), 0
    for size in _INSERT_SIZES:
        sql = _uniform_sql(size)
        while count - start >= size:
            conn.execute(sql, [first + start, job_type, *values[3 * start : 3 * (start + size)]])
            start += size
    return True


def _insert_rows(conn: sqlite3.Connection, row: str, params: list[Any]) -> None:
    """Insert the rows of ``params`` (``row``'s parameters, row after row) in chunks
    of :data:`_INSERT_SIZES`."""
    width = row.count("?")
    count = len(params) // width
    start = 0
    for size in _INSERT_SIZES:
        sql = _insert_sql(row, size)
        while count - start >= size:
            conn.execute(sql, params[width * start : width * (start + size)])
            start += size


#: "Did not look": the ``next_due`` of a call that did not probe for waiting jobs.
_NOT_PROBED: Final = -1


def _promote(conn: sqlite3.Connection, now: int) -> int | None:
    """Promote the waiting jobs due at ``now`` (a read first, so nothing to promote
    takes no write lock); return the earliest ``wait_until`` still waiting."""
    row = conn.execute(_NEXT_DUE).fetchone()
    if row is not None and row[0] <= now:
        return _promote_due(conn, now)
    return None if row is None else cast(int, row[0])


def _promote_due(conn: sqlite3.Connection, now: int) -> int | None:
    """Promote the waiting jobs due at ``now``; return the earliest ``wait_until``
    still waiting."""
    conn.execute(_PROMOTE, (now,))
    row = conn.execute(_NEXT_DUE).fetchone()
    return None if row is None else cast(int, row[0])


def _insert_new(conn: sqlite3.Connection, jobs: Sequence[Job]) -> list[Job]:
    """Insert the jobs whose id is not stored (ids in ``jobs`` are distinct), in the
    caller's transaction; return them."""
    existing = {
        row[0]
        for row in conn.execute(
            f"SELECT id FROM jobs WHERE id IN ({_IDS})", (json.dumps([j.id for j in jobs]),)
        )
    }
    fresh = [job for job in jobs if job.id not in existing]
    if fresh:
        _insert(conn, fresh)
    return fresh


def _claim_promoting(
    conn: sqlite3.Connection,
    assignee_id: str,
    tags: Sequence[str],
    limit: int,
    now: int,
    look_first: bool,
    promote: bool,
) -> tuple[list[Any], int | None]:
    """:func:`_claim`, after promoting the jobs that came due (with ``promote``).

    Jobs to promote (a read finds them; none: no write lock) are promoted and claimed
    in one transaction: one commit, not one for the promotion and one for the claim
    (the write of a woken stream's claim, SPEC §8.2's due->claimed latency)."""
    if not promote:
        return _claim(conn, assignee_id, tags, limit, now, look_first), _NOT_PROBED
    row = conn.execute(_NEXT_DUE).fetchone()
    if row is None or row[0] > now:
        next_due = None if row is None else cast(int, row[0])
        return _claim(conn, assignee_id, tags, limit, now, look_first), next_due
    return _transaction(conn, _promote_and_claim, assignee_id, tags, limit, now)


def _promote_and_claim(
    conn: sqlite3.Connection, assignee_id: str, tags: Sequence[str], limit: int, now: int
) -> tuple[list[Any], int | None]:
    """Promote the jobs due at ``now`` and claim (the caller's transaction)."""
    next_due = _promote_due(conn, now)
    return _claim(conn, assignee_id, tags, limit, now, False), next_due


def _claim(
    conn: sqlite3.Connection,
    assignee_id: str,
    tags: Sequence[str],
    limit: int,
    now: int,
    look_first: bool,
) -> list[Any]:
    """Assign up to ``limit`` eligible jobs: one self-committing ``UPDATE … RETURNING``.

    With ``look_first`` a read checks that something is eligible, so an idle poll
    never takes the write lock (skipped while claims keep coming back full).
    """
    if not tags:
        if look_first and conn.execute(_HAS_ELIGIBLE).fetchone() is None:
            return []
        return conn.execute(CLAIM_SQL, (now, assignee_id, limit)).fetchall()
    if len(tags) > 1:
        tags = _rarest_first(conn, tags)
    if look_first and conn.execute(_HAS_TAGGED, (tags[0],)).fetchone() is None:
        return []
    return conn.execute(
        claim_tags_sql(len(tags) > 1), (now, assignee_id, limit, *_tag_params(tags))
    ).fetchall()


_HAS_TAGGED: Final = "SELECT 1 FROM job_tags WHERE tag = ? AND sort_key IS NOT NULL LIMIT 1"
_RARITY_CAP: Final = 256
_RARITY: Final = (
    "SELECT count(*) FROM (SELECT 1 FROM job_tags WHERE tag = ? AND sort_key IS NOT NULL "
    f"LIMIT {_RARITY_CAP})"
)


def _rarest_first(conn: sqlite3.Connection, tags: Sequence[str]) -> list[str]:
    """Tags reordered so the one with the fewest eligible jobs (counted up to a cap,
    so the cost is bounded) leads the claim's index walk."""
    counts = {tag: conn.execute(_RARITY, (tag,)).fetchone()[0] for tag in tags}
    return sorted(tags, key=counts.__getitem__)


_ApplyPlan = tuple[list[Moved], dict[str, JobPoolError], list[Any], int | None]

#: Rows per ``UPDATE … FROM (VALUES …)`` statement (3 parameters each; SQLite allows 32766).
_APPLY_CHUNK: Final = 5000


#: Which per-job columns an apply statement binds: result, message, schedule,
#: attempt limit (the job's id always). An absent one is a NULL literal, never a bound
#: ``None`` (the sqlite3 module looks for an adapter for each: ~3,000 instructions).
_Shape = tuple[bool, bool, bool, bool]
_APPLY_SQL: dict[tuple[int, int, _Shape], tuple[Transition, str]] = {}


def _apply_sql(transition: Transition, rows: int, shape: _Shape) -> str:
    """One statement moving ``rows`` jobs by ``transition``, each with its own values
    of the columns ``shape`` names: ``?1`` is now, then those values per job.

    Cached by transition identity (transitions are not hashable) and shape."""
    key = (id(transition), rows, shape)
    hit = _APPLY_SQL.get(key)
    if hit is None or hit[0] is not transition:
        if len(_APPLY_SQL) > 1024:
            _APPLY_SQL.clear()
        hit = _APPLY_SQL[key] = (transition, _build_apply_sql(transition, rows, shape))
    return hit[1]


def _build_apply_sql(transition: Transition, rows: int, shape: _Shape) -> str:
    with_result, with_error, with_sched, with_max = shape
    columns = ["c_id"]
    for present, column in zip(shape, ("c_result", "c_error", "c_sched", "c_max"), strict=True):
        if present:
            columns.append(column)
    guard = ""
    if transition.guarded:  # the compare-and-set on the assignment
        columns.append("c_at")
        guard = "AND jobs.assigned_at IS c.c_at "
    width = len(columns)
    values = ", ".join(
        "(" + ", ".join(f"?{width * i + k + 2}" for k in range(width)) + ")" for i in range(rows)
    )
    sets = _sets(
        transition,
        now="?1",
        result="c_result" if with_result else None,
        error_message="c_error" if with_error else None,
        scheduled_at="c_sched" if with_sched else "NULL",
        max_attempts="c_max" if with_max else "NULL",
    )
    returning = "jobs.id, jobs.status, jobs.assigned_at"
    if _sole_target(transition) is not None:  # the status is known: not read back
        returning = "jobs.id, jobs.assigned_at"
    elif _may_make_eligible(transition):  # tags wake streams; wait_until arms the timer
        returning += ", jobs.tags, jobs.wait_until"
    return (
        f"WITH c({', '.join(columns)}) AS (VALUES {values}) "
        f"UPDATE jobs SET {sets} FROM c WHERE jobs.id = c.c_id "
        f"AND {_one_of(transition.sources)} {guard}RETURNING {returning}"
    )


_KINDS: dict[int, tuple[Transition, tuple[JobStatus | None, bool, bool]]] = {}


def _kind(transition: Transition) -> tuple[JobStatus | None, bool, bool]:
    """:func:`_sole_target`, :func:`_may_make_eligible` and whether the transition
    writes schedules or attempt limits, cached by identity (as :func:`_apply_sql`)."""
    hit = _KINDS.get(id(transition))
    if hit is None or hit[0] is not transition:
        if len(_KINDS) > 1024:
            _KINDS.clear()
        timed = transition.schedules or bool(transition.exhausted)
        kind = (_sole_target(transition), _may_make_eligible(transition), timed)
        hit = _KINDS[id(transition)] = (transition, kind)
    return hit[1]


#: Where a move frees its job's slot (``refill_limit`` counts those moves).
_IDLE_STATUSES: Final = frozenset(JobStatus) - ACTIVE
_transition_of: Final = itemgetter(1)
_due_at_of: Final = itemgetter(4)
_job_id_of: Final = itemgetter(0)
_result_of: Final = itemgetter(2)
_message_of: Final = itemgetter(3)
if Change._fields[:4] != ("job_id", "transition", "result", "error_message") or (
    Moved._fields[4] != "due_at"
):  # pragma: no cover
    raise RuntimeError("Change's or Moved's fields moved: fix the item getters above")


def _sole_target(transition: Transition) -> JobStatus | None:
    """The status every move by ``transition`` ends in, if it has one and it is not
    eligible (a completion: COMPLETED from any source); then a move returns the id
    and the assignment time only."""
    targets = {*transition.moves.values(), *transition.exhausted.values()}
    if len(targets) != 1:
        return None
    (target,) = targets
    return None if target in ELIGIBLE else target


def _may_make_eligible(transition: Transition) -> bool:
    """Whether a move by ``transition`` can leave a job eligible (then its :class:`Moved`
    needs the tags and the due time; otherwise neither is read back: a completion
    returns three columns, not five)."""
    return any(t in ELIGIBLE for t in (*transition.moves.values(), *transition.exhausted.values()))


def _apply(
    conn: sqlite3.Connection,
    changes: Sequence[Change],
    now: int,
    refill: Refill | None,
    promote: bool = False,
) -> _ApplyPlan:
    """Move every job its transition allows (one statement per transition and chunk),
    look up why the others did not move, and claim the ``refill`` (rows) — all in the
    caller's transaction."""
    transitions = list(map(_transition_of, changes))
    first = transitions[0]
    groups: dict[int, tuple[Transition, Sequence[Change]]]
    if transitions.count(first) == len(transitions):  # identity first: one C loop
        groups = {id(first): (first, changes)}
    else:
        groups = {}
        for change, transition in zip(changes, transitions, strict=True):
            group = groups.get(id(transition))
            if group is None:
                group = groups[id(transition)] = (transition, [])
            cast(list[Change], group[1]).append(change)
    done: dict[str, Moved] = {}
    for transition, members in groups.values():
        for k in range(0, len(members), _APPLY_CHUNK):
            done.update(_move_chunk(conn, transition, members[k : k + _APPLY_CHUNK], now))
    moved, errors = _outcome(conn, changes, done)
    rows: list[Any] = []
    next_due: int | None = _NOT_PROBED
    if refill is not None:
        if len(groups) == 1 and _kind(first)[0] in _IDLE_STATUSES:
            # refill_limit's count when every move ends in one idle status (a
            # completion): the moved jobs that were the stream's. Its generator, with an
            # enum hash (a Python call) per job, cost 14.5k instructions per batch.
            limit = refill.extra + len(refill.job_ids & done.keys())
        else:
            limit = refill_limit(refill, moved)
        if limit:
            if promote:
                next_due = _promote(conn, now)
            rows = _claim(conn, refill.assignee_id, refill.tags, limit, now, False)
    return moved, errors, rows, next_due


def _move_chunk(
    conn: sqlite3.Connection, transition: Transition, chunk: Sequence[Change], now: int
) -> dict[str, Moved]:
    """One statement moving the jobs of ``chunk`` (all of ``transition``) it allows."""
    sole, eligible, timed = _kind(transition)
    results = list(map(_result_of, chunk))
    with_result = results.count(None) != len(results)
    with_error = list(map(_message_of, chunk)).count(None) != len(chunk)
    with_sched = with_max = False
    if timed:
        with_sched = any(c.scheduled_at is not None for c in chunk)
        with_max = any(c.max_attempts is not None for c in chunk)
    shape = (with_result, with_error, with_sched, with_max)
    guarded = transition.guarded
    params: list[Any] = [now]
    if with_result and not (with_error or with_sched or with_max or guarded):
        # the common batch, a completion with results: one short loop (see _blob)
        for c in chunk:
            result = c[2]
            params += (c[0], None if result is None else bytearray(result))
    elif not (with_result or with_error or with_sched or with_max or guarded):
        params += map(_job_id_of, chunk)
    else:
        add = params.append
        for c in chunk:
            add(c.job_id)
            if with_result:
                add(_blob(c.result))
            if with_error:
                add(c.error_message)
            if with_sched:
                add(None if c.scheduled_at is None else _us(c.scheduled_at))
            if with_max:
                add(c.max_attempts)
            if guarded:
                add(None if c.assigned_at is None else _us(c.assigned_at))
    sql = _apply_sql(transition, len(chunk), shape)
    rows = conn.execute(sql, params).fetchall()
    # Each Moved built by tuple.__new__ with every field: the named tuple's own
    # __new__ is a Python function (its defaults), 1.5k instructions more per job. The
    # rows of a batch share their few assignment times: each converted once.
    new = _tuple_new
    if sole is not None:
        at_of = {at: _dt(at) for at in {at for _, at in rows}}
        return {job_id: new(Moved, (job_id, sole, at_of[at], (), None)) for job_id, at in rows}
    if not eligible:
        at_of = {at: _dt(at) for at in {at for _, _, at in rows}}
        return {
            job_id: new(Moved, (job_id, STATUS[status], at_of[at], (), None))
            for job_id, status, at in rows
        }
    dt = _dt_memo()
    return {
        job_id: Moved(
            job_id,
            STATUS[status],
            dt(assigned_at),
            _tag_tuple(tags),
            None if wait is None or STATUS[status] not in ELIGIBLE else dt(wait),
        )
        for job_id, status, assigned_at, tags, wait in rows
    }


def _apply_fast(conn: sqlite3.Connection, changes: Sequence[Change], now: int) -> _ApplyPlan:
    """The common batch (one transition, one statement, no refill) as one self-committing
    statement: no ``BEGIN``/``COMMIT`` around it. Why the others did not move is read
    after it (a read only, so the call still writes all or nothing); a job another
    process moved in between is reported with the status it has then, as PostgreSQL
    reports it."""
    done = _move_chunk(conn, changes[0].transition, changes, now)
    moved, errors = _outcome(conn, changes, done)
    return moved, errors, [], _NOT_PROBED


def _outcome(
    conn: sqlite3.Connection, changes: Sequence[Change], done: dict[str, Moved]
) -> tuple[list[Moved], dict[str, JobPoolError]]:
    """The moves in input order, and why each other change did not move."""
    if len(done) == len(changes):  # every job moved (ids distinct, then)
        moved = list(map(done.__getitem__, map(_job_id_of, changes)))
    else:
        moved = [done[c.job_id] for c in changes if c.job_id in done]
    errors: dict[str, JobPoolError] = {}
    if len(moved) < len(changes):
        missed = {c.job_id: c.transition for c in changes if c.job_id not in done}
        current = dict(
            conn.execute(
                f"SELECT id, status FROM jobs WHERE id IN ({_IDS})", (json.dumps(list(missed)),)
            ).fetchall()
        )
        errors = not_moved(missed, current)
    return moved, errors


def _selected_rows(conn: sqlite3.Connection, selection: Selection) -> list[Any]:
    """``(seq, id, status, tags, assigned_at)`` of the jobs selected by ids and tags:
    ids first (input order), then jobs by tags (enqueue order), each once.

    Only such selections are read row by row (cancel and delete); ``everything`` and
    ``assignee_id`` ones are moved in bulk by :func:`_apply_selected`."""
    if selection.everything or selection.assignee_id is not None:
        raise ValueError("only selections by ids and tags are read row by row")
    rows: list[Any] = []
    if selection.job_ids:
        by_id = {
            row[1]: row
            for row in conn.execute(
                f"SELECT seq, id, status, tags, assigned_at FROM jobs WHERE id IN ({_IDS})",
                (json.dumps(selection.job_ids),),
            )
        }
        rows.extend(by_id[i] for i in dict.fromkeys(selection.job_ids) if i in by_id)
    if selection.tags:
        seen = {row[0] for row in rows}
        tagged = conn.execute(
            f"SELECT j.seq, j.id, j.status, j.tags, j.assigned_at FROM jobs j WHERE j.seq IN "
            f"({_tagged_seqs(len(selection.tags) > 1)}) ORDER BY j.seq & {_ORDER_MASK}",
            _tag_params(selection.tags),
        ).fetchall()
        rows.extend(row for row in tagged if row[0] not in seen)
    return rows


def _apply_selected(
    conn: sqlite3.Connection,
    transition: Transition,
    selection: Selection,
    now: int,
    report_unmatched: bool,
    scheduled_at: datetime | None = None,
) -> SelectOutcome:
    out = SelectOutcome()
    if selection.everything or selection.assignee_id is not None:
        # Bulk moves (reset_running_jobs, mark_worker_unresponsive): one statement.
        # (``report_unmatched`` is for selections by ids and tags: see the contract.)
        sets = _sets(transition, now="?1")
        where = _one_of(transition.sources)
        params: tuple[Any, ...] = (now,)
        if selection.assignee_id is not None:
            where += f" AND assignee_id = ?2 AND {_ACTIVE}"
            params = (now, selection.assignee_id)
        for job_id, status, tags, assigned_at in conn.execute(
            f"UPDATE jobs SET {sets} WHERE {where} RETURNING id, status, tags, assigned_at",
            params,
        ).fetchall():
            out.moved.append(Moved(job_id, STATUS[status], _dt(assigned_at), _tag_tuple(tags)))
        return out
    rows = _selected_rows(conn, selection)
    if report_unmatched and selection.job_ids:
        present = {row[1] for row in rows}
        out.missing = [i for i in dict.fromkeys(selection.job_ids) if i not in present]
        out.unmatched.extend(out.missing)
    seqs = []
    for seq, job_id, status, tags, assigned_at in rows:
        target = transition.target_of(STATUS[status])
        if target is None:
            if report_unmatched:
                out.unmatched.append(job_id)
            continue
        seqs.append(seq)
        due = scheduled_at if transition.schedules and target in ELIGIBLE else None
        out.moved.append(Moved(job_id, target, _dt(assigned_at), _tag_tuple(tags), due))
    if seqs:  # under the write lock, so exactly the rows decided above move
        sched = None if scheduled_at is None else _us(scheduled_at)
        conn.execute(
            f"UPDATE jobs SET {_sets(transition, now='?1', scheduled_at='?3')} "
            f"WHERE seq IN (SELECT value FROM json_each(?2)) AND {_one_of(transition.sources)}",
            (now, json.dumps(seqs), sched) if transition.schedules else (now, json.dumps(seqs)),
        )
    return out


def _delete(conn: sqlite3.Connection, selection: Selection) -> int:
    rows = _selected_rows(conn, selection)
    not_final = [row[1] for row in rows if not STATUS[row[2]].is_final]
    if not_final:
        raise JobsNotFinalError(not_final)
    conn.execute(f"DELETE FROM jobs WHERE seq IN ({_IDS})", (json.dumps([row[0] for row in rows]),))
    return len(rows)


@functools.cache
def _purge_sql() -> str:
    """The ``DELETE`` of the COMPLETED jobs finalized by ``?1`` (store version 7): each
    priority's COMPLETED run of ``jobs_list_prio`` read up to ``created_at <= ?1`` (a
    job finalized by the cutoff was created by then), plus ``jobs_finalized_early``
    (those finalized before their creation time). Its cost is that of the jobs it
    deletes and of the completed jobs created by the cutoff but finalized after it,
    not of every completed job."""
    done = JobStatus.COMPLETED
    with_, _ = _priorities(done)
    return (
        f"DELETE FROM jobs WHERE seq IN ({with_}"
        f"SELECT j.seq FROM p, jobs j INDEXED BY jobs_list_prio WHERE p.v IS NOT NULL "
        f"AND {_listed_by_state(done, 'j.')} AND j.priority = p.v AND j.created_at <= ?1 "
        "AND j.finalized_at <= ?1 "
        "UNION ALL SELECT seq FROM jobs INDEXED BY jobs_finalized_early "
        f"WHERE finalized_at < created_at AND finalized_at <= ?1 "
        f"AND list_state = {_COMPLETED_CODE})"
    )


def _delete_completed_before(conn: sqlite3.Connection, cutoff: int) -> int:
    return conn.execute(_purge_sql(), (cutoff,)).rowcount


#: A listed job comes after the cursor ``(:c, :i)`` (newest first).
_AFTER: Final = "j.created_at <= :c AND (j.created_at < :c OR j.id < :i)"


def _list_sql(query: ListQuery) -> tuple[str, dict[str, Any]]:
    """The ``list_jobs`` statement of a query by tags, by type or of every job (one by
    statuses alone is merged by :func:`_list_merged`): walk one index newest first,
    from the cursor on, checking the other filters on each row.

    Named parameters: ``:c``/``:i`` the cursor, ``:n`` the limit, ``:y`` the type,
    ``:t``/``:w`` the tags. Which index serves the walk is fixed with ``INDEXED BY``: tags
    first (``job_tags_list``), else the type, else all jobs.
    """
    params: dict[str, Any] = {"n": query.limit}
    conds: list[str] = []
    if query.before is not None:
        params["c"], params["i"] = _us(query.before[0]), query.before[1]
    if query.job_type is not None:
        params["y"] = query.job_type
    statuses = sorted(query.statuses)
    cols = ", ".join(f"j.{c}" for c in JOB_FIELDS)
    if query.tags:
        with_ = ""
        params["t"] = query.tags[0]
        if len(query.tags) > 1:  # the others as one JSON list (see _tag_filter)
            params["w"] = json.dumps(list(query.tags[1:]))
            with_ = "WITH w(tag) AS MATERIALIZED (SELECT value FROM json_each(:w)) "
            conds.append(
                "NOT EXISTS (SELECT 1 FROM w WHERE NOT EXISTS ("
                "SELECT 1 FROM job_tags x WHERE x.seq = t.seq AND x.tag = w.tag))"
            )
        if query.before is not None:
            conds.append("t.created_at <= :c AND (t.created_at < :c OR j.id < :i)")
        if statuses:
            conds.append(_one_of(frozenset(statuses), "j.status"))
        if query.job_type is not None:
            conds.append("j.job_type = :y")
        where = " AND ".join(["t.tag = :t", *conds])
        sql = (
            f"{with_}SELECT {cols} FROM job_tags t INDEXED BY job_tags_list "
            f"JOIN jobs j ON j.seq = t.seq WHERE {where} "
            "ORDER BY t.created_at DESC, j.id DESC LIMIT :n"
        )
        return sql, params
    if statuses:
        raise ValueError("a listing by statuses without tags is merged (_list_merged)")
    if query.before is not None:
        conds.append(_AFTER)
    if query.job_type is not None:
        index = "jobs_list_type"
        conds.insert(0, "j.job_type = :y")
    else:
        index = "jobs_list"
    where = f"WHERE {' AND '.join(conds)} " if conds else ""
    sql = (
        f"SELECT {cols} FROM jobs j INDEXED BY {index} {where}"
        "ORDER BY j.created_at DESC, j.id DESC LIMIT :n"
    )
    return sql, params


@functools.lru_cache(maxsize=4 * len(JobStatus))
def _status_part(status: JobStatus, conds: tuple[str, ...]) -> str:
    """The jobs of one ``status`` passing ``conds``, newest first (no ``LIMIT``): an idle
    status walks the run of priority ``:p`` of its part of ``jobs_list_prio``,
    RUNNING/CANCELLING read ``jobs_active`` (every busy slot's job: few) and sort.
    Each WHERE repeats its index's condition word for word, so SQLite may use it."""
    cols = ", ".join(f"j.{c}" for c in JOB_FIELDS)
    if status in ACTIVE:
        where = f"jobs_active WHERE {_ACTIVE} AND j.status = '{status.value}'"
    else:
        where = f"jobs_list_prio WHERE {_listed_by_state(status, 'j.')} AND j.priority = :p"
    return (
        f"SELECT {cols} FROM jobs j INDEXED BY {where}"
        + "".join(f" AND {c}" for c in conds)
        + " ORDER BY j.created_at DESC, j.id DESC"
    )


def _priorities(status: JobStatus) -> tuple[str, str]:
    """A ``WITH`` prefix naming ``p(v)`` the priorities of the jobs in the idle
    ``status``, highest first (one ``jobs_list_prio`` seek each, a skip scan, however
    many jobs there are), and the ``FROM … WHERE`` of that status's part of the index."""
    where = f"FROM jobs INDEXED BY jobs_list_prio WHERE {_listed_by_state(status)}"
    return (
        f"WITH RECURSIVE p(v) AS (SELECT (SELECT max(priority) {where}) "
        f"UNION ALL SELECT (SELECT max(priority) {where} AND priority < p.v) "
        "FROM p WHERE p.v IS NOT NULL) ",
        where,
    )


@functools.lru_cache(maxsize=len(JobStatus))
def _priorities_sql(status: JobStatus) -> str:
    return _priorities(status)[0] + "SELECT v FROM p WHERE v IS NOT NULL"


#: A row of ``JOB_COLUMNS``'s place in listing order (newest first, then by id).
_LIST_KEY: Final = itemgetter(JOB.created_at, JOB.id)


def _list_merged(conn: sqlite3.Connection, query: ListQuery) -> list[Any]:
    """A ``list_jobs`` page of a query by statuses (no tags): ``jobs_list_prio`` holds
    an idle status's jobs newest first within each priority, so each priority's run is
    read from the cursor on, in chunks as the merge needs them, and the runs (and the
    active statuses' pages) are merged newest first. A page costs one seek per
    priority present in the statuses asked for, and its rows, however many jobs are
    stored."""
    n = query.limit
    params: dict[str, Any] = {"n": n}
    conds: tuple[str, ...] = ()
    if query.job_type is not None:
        params["y"] = query.job_type
        conds = ("j.job_type = :y",)
    if query.before is not None:
        params["c"], params["i"] = _us(query.before[0]), query.before[1]
    runs: list[Iterator[Any]] = []
    for status in sorted(query.statuses):
        if status in ACTIVE:
            sql = _status_part(status, (*conds, _AFTER) if query.before else conds)
            runs.append(iter(conn.execute(f"{sql} LIMIT :n", params).fetchall()))
            continue
        priorities = [row[0] for row in conn.execute(_priorities_sql(status))]
        share = -(-n // len(priorities)) if priorities else n  # a fair share of the page
        runs.extend(_run_of(conn, status, conds, params, p, share) for p in priorities)
    if len(runs) == 1:
        return list(itertools.islice(runs[0], n))
    return list(itertools.islice(heapq.merge(*runs, key=_LIST_KEY, reverse=True), n))


def _run_of(
    conn: sqlite3.Connection,
    status: JobStatus,
    conds: tuple[str, ...],
    params: dict[str, Any],
    priority: int,
    size: int,
) -> Iterator[Any]:
    """The jobs of the idle ``status`` and ``priority`` after the query's cursor, newest
    first, read ``size`` rows at a time, each chunk twice the last (up to the page)."""
    after = _status_part(status, (*conds, _AFTER))
    sql = after if "c" in params else _status_part(status, conds)
    args = {**params, "p": priority, "n": size}
    while True:
        rows = conn.execute(f"{sql} LIMIT :n", args).fetchall()
        yield from rows
        if len(rows) < args["n"]:
            return
        args["c"], args["i"] = rows[-1][JOB.created_at], rows[-1][JOB.id]
        args["n"] = min(2 * args["n"], params["n"])
        sql = after


def _oldest_sql(status: JobStatus) -> str:
    """A select of ``m``, the oldest ``created_at`` of the jobs in ``status``: one index
    seek per priority present (RUNNING/CANCELLING: a read of the busy slots' jobs)."""
    if status in ACTIVE:
        return (
            "SELECT min(created_at) AS m FROM jobs INDEXED BY jobs_active "
            f"WHERE {_ACTIVE} AND status = '{status.value}'"
        )
    with_, where = _priorities(status)
    return (
        f"SELECT min(m) AS m FROM ({with_}"
        f"SELECT (SELECT min(created_at) {where} AND priority = p.v) AS m "
        "FROM p WHERE v IS NOT NULL)"
    )


def _probe(path: str) -> None:
    """Open and close ``path`` (creating an empty file if missing), or raise."""
    sqlite3.connect(path).close()


def _fetch_all(
    conn: sqlite3.Connection, sql: str, params: Sequence[Any] | Mapping[str, Any]
) -> list[Any]:
    return conn.execute(sql, params).fetchall()


# --- leases ---------------------------------------------------------------------------------

_LEASE_COLS: Final = "assignee_id, holder, first_seen_at, renewed_at, expires_at"


def _renew_leases(
    conn: sqlite3.Connection,
    holder: str,
    renew: Sequence[str],
    release: Sequence[str],
    now: int,
    expires: int,
) -> None:
    """Upsert ``renew``'s records and delete ``release``'s (the caller's transaction)."""
    if renew:
        conn.execute(
            f"INSERT INTO leases ({_LEASE_COLS}) SELECT value, ?1, ?2, ?2, ?3 "
            "FROM json_each(?4) WHERE true ON CONFLICT (assignee_id, holder) DO UPDATE "
            "SET renewed_at = excluded.renewed_at, expires_at = excluded.expires_at",
            (holder, now, expires, json.dumps(list(renew))),
        )
    if release:
        conn.execute(
            f"DELETE FROM leases WHERE holder = ? AND assignee_id IN ({_IDS})",
            (holder, json.dumps(list(release))),
        )


def _lease_rows(conn: sqlite3.Connection) -> list[LeaseRow]:
    return [
        (
            a,
            h,
            _EPOCH + timedelta(0, 0, f),
            _EPOCH + timedelta(0, 0, r),
            _EPOCH + timedelta(0, 0, e),
        )
        for a, h, f, r, e in conn.execute(f"SELECT {_LEASE_COLS} FROM leases").fetchall()
    ]


_RescueRead = tuple[list[Any], list[tuple[str, str]]]


def _rescue_read(conn: sqlite3.Connection, now: datetime, forget_after: timedelta) -> _RescueRead:
    """The jobs of expired assignees as ``[id, status, assignee, assigned_at]``, and the
    lease records to forget. Reads only: the write re-checks all of it."""
    plan = plan_rescue(_lease_rows(conn), now, forget_after)
    jobs: list[Any] = []
    if plan.expired:
        jobs = conn.execute(
            f"SELECT id, status, assignee_id, assigned_at FROM jobs "
            f"WHERE assignee_id IN ({_IDS}) AND {_ACTIVE}",
            (json.dumps(sorted(plan.expired)),),
        ).fetchall()
    return jobs, list(plan.forget)


_RESCUE_SQL: Final = (
    "WITH c(c_id, c_status, c_assignee, c_at) AS ("
    "SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?2)) "
    f"UPDATE jobs SET {_sets(LEASE_EXPIRED, now='?1', max_attempts='?3')} "
    "FROM c "
    "WHERE jobs.id = c.c_id AND jobs.status = c.c_status AND jobs.assignee_id = c.c_assignee "
    f"AND jobs.assigned_at IS c.c_at AND {_one_of(LEASE_EXPIRED.sources, 'jobs.status')} "
    "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.assignee_id = jobs.assignee_id "
    "AND l.expires_at > ?1) "
    "RETURNING jobs.id, jobs.status, jobs.tags, jobs.assigned_at"
)
_FORGET_SQL: Final = (
    "DELETE FROM leases WHERE expires_at < ?2 AND (assignee_id, holder) IN ("
    "SELECT value ->> 0, value ->> 1 FROM json_each(?3)) AND ("
    "EXISTS (SELECT 1 FROM leases l WHERE l.assignee_id = leases.assignee_id "
    "AND l.expires_at > ?1) OR NOT EXISTS (SELECT 1 FROM jobs "
    f"WHERE jobs.assignee_id = leases.assignee_id AND jobs.{_ACTIVE}))"
)


def _rescue_write(
    conn: sqlite3.Connection,
    jobs: list[Any],
    forget: list[Any],
    now: int,
    cutoff: int,
    max_attempts: int | None,
) -> list[Moved]:
    """The compare-and-set moves of a rescue, then the forgetting (caller's transaction)."""
    moved = []
    if jobs:
        for job_id, status, tags, at in conn.execute(
            _RESCUE_SQL, (now, json.dumps(jobs), max_attempts)
        ):
            moved.append(Moved(job_id, STATUS[status], _dt(at), _tag_tuple(tags)))
    if forget:
        conn.execute(_FORGET_SQL, (now, cutoff, json.dumps(forget)))
    return moved


# --- the backend ----------------------------------------------------------------------------


class SQLiteBackend(Backend):
    """Jobs in one SQLite file (WAL mode); several processes may share it.

    ``synchronous``: ``"NORMAL"`` (default; a commit survives a crash of the
    process, the last commits may be lost on power failure) or ``"FULL"`` (fsync
    on every commit). ``busy_timeout``: seconds to wait for another process's write
    lock before a call fails with :class:`StorageError`.
    """

    default_poll_interval = 1.0

    #: (``Backend._carry_calls``: ``_run`` awaits one aiosqlite future, a hop to the
    #: connection's thread, under no timeout.)
    _carry_calls = True
    #: (``Backend._takes_no_tags``: ``_insert`` and ``insert_in`` only read a copy's
    #: tags, to JSON in the row and the tag table; no copy is kept or handed out.)
    _takes_no_tags = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout: float = 5.0,
    ) -> None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be str or a path, got {type(path).__name__}")
        text = os.fspath(path)
        if not isinstance(text, str) or not text:
            raise ValueError(f"path must be a non-empty file path, got {path!r}")
        if text == ":memory:" or text.startswith("file:"):
            raise ValueError(
                f"SQLiteBackend needs a file path, got {text!r} (use MemoryBackend in memory)"
            )
        mode = synchronous.upper() if isinstance(synchronous, str) else synchronous
        if mode not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        seconds = check_seconds(busy_timeout, "busy_timeout", zero=True)
        self._path = Path(text)
        self._synchronous: str = mode
        self._busy_timeout = seconds
        self._db: aiosqlite.Connection | None = None
        self._closed = False
        #: Per tag filter: did the last claim come back full? (Then skip the look first.)
        self._claims_full: dict[tuple[str, ...], bool] = {}
        #: The earliest time a waiting job comes due, as far as this process knows
        #: (exact after each probe; other processes may add earlier ones in between).
        self._next_due: datetime | None = None
        self._probed_at = float("-inf")

    @property
    def path(self) -> Path:
        return self._path

    @property
    def synchronous(self) -> str:
        return self._synchronous

    def __repr__(self) -> str:
        return f"SQLiteBackend({str(self._path)!r}, synchronous={self._synchronous!r})"

    # --- the bridge -------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in the connection's thread: one hop, one await.

        aiosqlite's ``Connection._execute`` queues a callable to its thread; it is
        the one private name used here (checked in :meth:`open`).
        """
        db = self._db
        if db is None:
            raise StorageError(f"{self._path}: the SQLite store is not open")
        execute = cast(Callable[..., Awaitable[T]], db._execute)
        try:
            return await execute(fn, db._conn, *args)
        except sqlite3.Error as exc:
            raise StorageError(f"{self._path}: {type(exc).__name__}: {exc}") from exc
        except UnicodeEncodeError as exc:  # a lone surrogate in an id, tag or message
            raise ValueError(f"text cannot be stored in SQLite (not valid Unicode): {exc}") from exc
        except ValueError as exc:  # aiosqlite's way to say the connection is gone
            if str(exc) in ("Connection closed", "no active connection"):
                raise StorageError(f"{self._path}: the SQLite store is closed") from exc
            raise

    async def _transact(self, body: Callable[..., T], *args: Any) -> T:
        return await self._run(_transaction, body, *args)

    # --- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        if self._db is not None:
            return
        if self._closed:
            raise StorageError(f"{self._path}: the SQLite backend was closed")
        path = str(self._path)
        check_parent(self._path, "SQLite database file")
        try:
            # A path SQLite cannot open is found here, with plain sqlite3: aiosqlite's
            # own failure path leaves its thread posting to the loop after we return.
            await asyncio.to_thread(_probe, path)
            connection = aiosqlite.connect(path, isolation_level=None, cached_statements=256)
            # aiosqlite's thread is not a daemon: a store never closed would keep the
            # interpreter from exiting. Every write is one SQLite transaction, so a
            # thread stopped at exit loses nothing committed (PoolQueue warns instead).
            thread = getattr(connection, "_thread", None)
            if isinstance(thread, threading.Thread):
                thread.daemon = True
            db = await connection
        except sqlite3.Error as exc:
            raise StorageError(f"{path}: cannot open SQLite store: {exc}") from exc
        if not callable(getattr(db, "_execute", None)):  # pragma: no cover - aiosqlite API
            await db.close()
            raise StorageError("this aiosqlite version lacks Connection._execute")
        self._db = db
        try:
            await self._run(_open_store, path, self._synchronous, int(self._busy_timeout * 1000))
        except BaseException:
            self._db = None
            await db.close()
            raise

    async def close(self) -> None:
        self._closed = True
        db, self._db = self._db, None
        if db is not None:
            try:
                await db.close()
            except sqlite3.Error as exc:
                raise StorageError(f"{self._path}: closing failed: {exc}") from exc

    # --- the contract -----------------------------------------------------------------

    async def insert(self, jobs: Sequence[Job]) -> None:
        if jobs:
            await self._transact(_insert, jobs)
            for job in jobs:
                self._learn(job.scheduled_at)

    def next_due(self) -> datetime | None:
        return self._next_due

    def _should_promote(self, now: datetime) -> bool:
        """Whether a claim looks for waiting jobs that came due: when one this process
        knows of has, and every :data:`PROBE_INTERVAL` for those of other processes."""
        due = self._next_due
        return (due is not None and due <= now) or (
            time.monotonic() - self._probed_at >= PROBE_INTERVAL
        )

    def _probed(self, next_due: int | None) -> None:
        if next_due != _NOT_PROBED:
            self._probed_at = time.monotonic()
            self._next_due = _dt(next_due)

    def _learn(self, due: datetime | None) -> None:
        if due is not None and (self._next_due is None or due < self._next_due):
            self._next_due = due

    async def insert_new(self, jobs: Sequence[Job]) -> list[str]:
        if not jobs:
            return []
        fresh: list[Job] = await self._transact(_insert_new, jobs)
        for job in fresh:
            self._learn(job.scheduled_at)
        return [job.id for job in fresh]

    async def claim(
        self, assignee_id: str, tags: Sequence[str], limit: int, now: datetime
    ) -> list[Job]:
        key = tuple(tags)
        full = self._claims_full
        promote = self._should_promote(now)
        rows, next_due = await self._run(
            _claim_promoting, assignee_id, key, limit, _us(now), not full.get(key), promote
        )
        self._probed(next_due)
        if len(full) > 256:
            full.clear()
        full[key] = len(rows) == limit
        return _claimed(rows, assignee_id, now)

    async def apply(
        self, changes: Sequence[Change], now: datetime, refill: Refill | None = None
    ) -> ApplyOutcome:
        if not changes:
            return ApplyOutcome()
        transition = changes[0].transition
        if (
            refill is None
            and len(changes) <= _APPLY_CHUNK
            and all(c.transition is transition for c in changes)
        ):
            moved, errors, rows, next_due = await self._run(_apply_fast, changes, _us(now))
        else:
            promote = refill is not None and self._should_promote(now)
            moved, errors, rows, next_due = await self._transact(
                _apply, changes, _us(now), refill, promote
            )
        self._probed(next_due)
        for due in map(_due_at_of, moved):  # a method call only for a job not due yet
            if due is not None:
                self._learn(due)
        claimed = _claimed(rows, refill.assignee_id, now) if refill and rows else []
        return ApplyOutcome(moved=moved, errors=errors, claimed=claimed)

    async def apply_selected(
        self,
        transition: Transition,
        selection: Selection,
        now: datetime,
        *,
        report_unmatched: bool = False,
        scheduled_at: datetime | None = None,
    ) -> SelectOutcome:
        out: SelectOutcome = await self._transact(
            _apply_selected, transition, selection, _us(now), report_unmatched, scheduled_at
        )
        for m in out.moved:
            self._learn(m.due_at)
        return out

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        if not job_ids:
            return []
        rows = await self._run(
            _fetch_all,
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE id IN ({_IDS})",
            (json.dumps(list(job_ids)),),
        )
        by_id = {job.id: job for job in _jobs(rows)}
        out: list[Job] = []
        for i in job_ids:
            job = by_id.pop(i, None)
            if job is not None:
                out.append(job)
                by_id[i] = job.copy()  # a repeated id gets its own snapshot
        return out

    async def job_states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        if not job_ids:
            return {}
        rows = await self._run(
            _fetch_all,
            f"SELECT id, status, assigned_at FROM jobs WHERE id IN ({_IDS})",
            (json.dumps(list(job_ids)),),
        )
        return {row[0]: JobState(STATUS[row[1]], _dt(row[2])) for row in rows}

    async def count_by_status(self, tags: Sequence[str]) -> tuple[dict[JobStatus, int], int]:
        if tags:
            sql = (
                "SELECT status, count(*), COALESCE(sum(retry_count), 0) FROM jobs "
                f"WHERE seq IN ({_tagged_seqs(len(tags) > 1)}) GROUP BY status"
            )
        else:
            sql = "SELECT status, count(*), COALESCE(sum(retry_count), 0) FROM jobs GROUP BY status"
        rows = await self._run(_fetch_all, sql, _tag_params(tags) if tags else ())
        return {STATUS[s]: n for s, n, _ in rows}, sum(r for _, _, r in rows)

    async def delete(self, selection: Selection) -> int:
        return await self._transact(_delete, selection)

    async def delete_completed_before(self, cutoff: datetime) -> int:
        return await self._transact(_delete_completed_before, _us(cutoff))

    async def oldest_created(self, statuses: frozenset[JobStatus]) -> datetime | None:
        if not statuses:
            return None
        parts = " UNION ALL ".join(_oldest_sql(s) for s in sorted(statuses))
        rows = await self._run(_fetch_all, f"SELECT min(m) FROM ({parts})", ())
        return _dt(rows[0][0])

    async def list_jobs(self, query: ListQuery) -> list[Job]:
        if query.statuses and not query.tags:
            return _jobs(await self._run(_list_merged, query))
        sql, params = _list_sql(query)
        return _jobs(await self._run(_fetch_all, sql, params))

    # --- leases -----------------------------------------------------------------------

    async def renew_leases(
        self,
        holder: str,
        renew: Sequence[str],
        release: Sequence[str],
        lease: timedelta,
        now: datetime,
    ) -> None:
        await self._transact(_renew_leases, holder, renew, release, _us(now), _us(now + lease))

    async def list_leases(self) -> list[Lease]:
        return aggregate(await self._run(_lease_rows))

    async def rescue_expired(
        self, now: datetime, forget_after: timedelta, max_attempts: int | None = None
    ) -> list[Moved]:
        jobs, forget = await self._run(_rescue_read, now, forget_after)
        if not jobs and not forget:
            return []
        await self._after_rescue_read()
        return await self._transact(
            _rescue_write, jobs, forget, _us(now), _us(now - forget_after), max_attempts
        )
