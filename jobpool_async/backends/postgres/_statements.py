"""The SQL text of the PostgreSQL backend: its conditions, keys and statements.

Everything here is text built from names and the transition table (``.._sql``);
nothing runs a statement. :class:`Statements` holds the statements of one store
(its schema, its NOTIFY channel, its instance's token), built once where they do
not depend on a call's input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from itertools import accumulate, repeat
from operator import floordiv, sub
from typing import Any, cast

from .._sql import CLAIMED_COLUMNS, CLAIMED_FIELDS, in_list, set_clause
from ..base import (
    ACTIVE,
    ASSIGN,
    ELIGIBLE,
    FINAL,
    JobStatus,
    Selection,
    Transition,
)
from ._notifications import MAX_PAYLOAD

#: SQL of a ``timestamptz`` as exact integer microseconds since the epoch (for NOTIFY
#: payloads: JSON has no timestamp type, and a float would lose the microseconds).
EPOCH_US = "CASE WHEN isfinite({0}) THEN (extract(epoch FROM {0}) * 1000000)::bigint END"
TAG_KEY_MAX = 256
#: The jobs of an insert from which its statement hides its arrays from the planner
#: (see :meth:`Statements._insert`).
LARGE_INSERT = 1000
#: The jobs of an insert of new jobs from which it is a binary ``COPY`` (see
#: :func:`copy_records`): a transaction of its own, four round trips, not one.
COPY_INSERT = 1000
#: The columns a ``COPY`` insert writes; every other column takes its default
#: (:data:`COPY_DEFAULTS`, or NULL, or ``seq``'s next value).
COPY_COLUMNS = ("id_key", "id", "job_type", "job_definition", "created_at")


def tag_key(tag: str) -> str:
    """The indexed form of a tag: itself when short, else its SHA-256 (B-tree and GIN
    entries are limited to about 2.7 kB). Must equal the schema's ``tag_keys()``."""
    raw = tag.encode("utf-8")
    if len(raw) <= TAG_KEY_MAX:
        return tag
    return "sha256:" + hashlib.sha256(raw).hexdigest()


# PARAMETERS. Lists of per-job values go to the server as one text parameter in
# PostgreSQL's array syntax, parsed there (``$1::text::text[]``), and bytes as one
# ``bytea`` holding them all, cut there by end offsets and lengths (two such text
# parameters): asyncpg encodes an array parameter element by element, asking two
# ``isinstance`` checks against ``collections.abc`` classes of each before it sees a
# scalar, which cost about 5,000 instructions per element (a third of the drain's
# client-side storage work). ``str.join`` and ``map`` do these in C. A literal that
# only ever feeds ``unnest`` is parsed once per statement; never subscript one per row.


def copy_records(jobs: Iterable[Any]) -> list[tuple[Any, ...]] | None:
    """The rows of :data:`COPY_COLUMNS` for a binary ``COPY`` of new ``jobs``, or
    ``None`` when one needs a column the ``COPY`` leaves to its default (tags, a
    message, an assignee, a history or time field: those go through the ``INSERT``)
    or is created in year 1 or 9999 (``datetime.min``/``max`` are written as
    ``-infinity``/``infinity`` by the ``INSERT``; asyncpg's binary encoder does so only
    for naive values).

    Against the ``INSERT`` of parallel arrays (10,000 new jobs without tags, callgrind):
    the server's work per job 67.1k -> 55.4k instructions (no text literals parsed, no
    ``unnest``, its sort and expressions; ``COPY`` writes heap rows a page at a time)
    (benchmarks/results/pg-session14.md). Binary, not text: a text ``COPY`` parses each
    timestamp and hex payload, 69.2k on the server. One loop, every field read inline
    (a call of ``has_history`` per job, or a pass per field, cost the client more than
    the ``INSERT``'s joins).
    """
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    for j in jobs:
        created = j.created_at
        job_id = j.id
        if (
            j.tags
            or j.error_message
            or j.assignee_id
            or j.scheduled_at is not None
            or j.priority
            or j.max_attempts is not None
            or j.started_at is not None
            or j.finalized_at is not None
            or j.result is not None
            or j.retry_count
            or j.last_retry_at is not None
            or j.assigned_at is not None
            or created.year in _EXTREME_YEARS
        ):
            return None
        key = job_id if len(job_id) <= _SHORT_KEY else tag_key(job_id)
        append((key, job_id, j.job_type, j.job_definition, created))
    return rows


def text_array(values: Sequence[str | None]) -> str:
    """``values`` as a PostgreSQL array literal (every element quoted; ``None`` as NULL)."""
    try:
        body = '","'.join(values)  # type: ignore[arg-type]
    except TypeError:  # a None
        body = None
    if body is None or "\\" in body or body.count('"') != 2 * len(values) - 2:
        return (
            "{"
            + ",".join(
                "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                for v in values
            )
            + "}"
        )
    return '{"' + body + '"}'


def int_array(values: Iterable[int]) -> str:
    """Integers (any iterable) as a PostgreSQL array literal."""
    return "{" + ",".join(map(str, values)) + "}"


#: The instants asyncpg sends as PostgreSQL's ``infinity`` and ``-infinity``, and
#: how :func:`micros_array` writes them.
_MAX_UTC = datetime.max.replace(tzinfo=UTC)
_MIN_UTC = datetime.min.replace(tzinfo=UTC)
_INFINITY, _MINUS_INFINITY = 2**63 - 1, -(2**63)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: A text of at most this many characters is at most :data:`TAG_KEY_MAX` bytes in
#: UTF-8 (4 a character at most), so its own key (:func:`tag_key`): checked without
#: encoding it.
_SHORT_KEY = TAG_KEY_MAX // 4
#: The years of ``datetime.min`` and ``datetime.max`` (see :func:`copy_records`).
_EXTREME_YEARS = (1, 9999)
_MICROSECOND = timedelta(microseconds=1)


def micros_array(values: Sequence[datetime]) -> str:
    """Aware datetimes as a PostgreSQL array literal of microseconds since the Unix
    epoch (exact; ``map`` over C functions, a fifth of ``isoformat``'s cost), the
    extremes as asyncpg sends them (its ``infinity``/``-infinity``); read back by
    :func:`from_micros`."""
    if values and (max(values) >= _MAX_UTC or min(values) <= _MIN_UTC):
        return int_array(
            _INFINITY
            if v >= _MAX_UTC
            else _MINUS_INFINITY
            if v <= _MIN_UTC
            else (v - _EPOCH) // _MICROSECOND
            for v in values
        )
    return int_array(map(floordiv, map(sub, values, repeat(_EPOCH)), repeat(_MICROSECOND)))


def from_micros(expr: str) -> str:
    """SQL: the ``timestamptz`` of a value of :func:`micros_array` (``bigint`` SQL
    ``expr``). Whole seconds through ``to_timestamp`` (exact for every year a
    ``datetime`` holds), the rest as an interval of microseconds."""
    return (
        f"CASE {expr} WHEN {_INFINITY} THEN 'infinity'::timestamptz "
        f"WHEN {_MINUS_INFINITY} THEN '-infinity'::timestamptz "
        f"ELSE to_timestamp({expr} / 1000000) + ({expr} % 1000000) * interval '1 microsecond' END"
    )


def bytea_parts(values: Sequence[bytes | None]) -> tuple[bytes, str, str]:
    """Bytes (``None``: NULL) as one ``bytea``, the text literal of each one's end
    offset in it and that of its length (-1 for NULL); see :func:`bytes_at`."""
    try:
        blob = b"".join(values)  # type: ignore[arg-type]
    except TypeError:  # a None
        lengths = [-1 if v is None else len(v) for v in values]
        blob = b"".join(v for v in values if v is not None)
        ends = accumulate(max(n, 0) for n in lengths)
        return blob, int_array(ends), int_array(lengths)
    lengths = list(map(len, cast("Sequence[bytes]", values)))  # (join took them all)
    return blob, int_array(accumulate(lengths)), int_array(lengths)


def bytes_at(blob: str, end: str, length: str) -> str:
    """SQL: one value of :func:`bytea_parts` from the blob ``blob`` (each argument
    is an SQL expression)."""
    cut = f"substring({blob} FROM {end} - {length} + 1 FOR {length})"
    return f"CASE WHEN {length} >= 0 THEN {cut} END"


ELIGIBLE_IN = in_list(ELIGIBLE)
#: Eligible and due (not waiting for its schedule): what a claim may take.
DUE = f"status IN {ELIGIBLE_IN} AND wait_until IS NULL"
WAITING = f"status IN {ELIGIBLE_IN} AND wait_until IS NOT NULL"
#: A job with tags (in the GIN indexes and ``jobs_idle_tagged``; every tag filter adds it).
TAGGED = "tag_keys <> '{}'"
#: Selection order (SPEC §8.2): the eligible index's columns.
ORDER = "priority DESC, COALESCE(scheduled_at, last_retry_at, created_at), seq"
ACTIVE_IN = in_list(ACTIVE)
FINAL_IN = in_list(FINAL)
_RUNNING = JobStatus.RUNNING.value


def key(text: str) -> str:
    """SQL for the indexed key of the text expression ``text``: the schema's
    ``id_key()``/``tag_keys()`` rule written inline. A call of that SQL function
    is not inlined by the planner (it is ``STRICT``, its ``CASE`` is not), and each
    call costs microseconds; a batch statement makes several per job."""
    return (
        f"(CASE WHEN octet_length({text}) <= {TAG_KEY_MAX} THEN {text} "
        f"ELSE 'sha256:' || encode(sha256(convert_to({text}, 'UTF8')), 'hex') END)"
    )


#: The indexed prefix of an assignee id (at most 800 bytes in UTF-8).
ASSIGNEE_PREFIX = "left({}, 200)"
#: ``list_jobs`` order among jobs created at the same instant: by id key, byte order
#: (which is code point order, as on the other backends, for ids of up to 256 bytes).
ID_ORDER = 'id_key COLLATE "C"'
#: The indexed prefix of a job type (at most 800 bytes in UTF-8).
TYPE_PREFIX = "left(job_type, 200)"


def quote_ident(name: str) -> str:
    """A double-quoted SQL identifier (embedded quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


#: SQL types of the claimed columns, for the NULL padding of rows that carry no job.
_CLAIMED_TYPES = {
    "id": "text", "job_type": "text", "job_definition": "bytea", "tags": "text[]",
    "created_at": "timestamptz", "started_at": "timestamptz", "finalized_at": "timestamptz",
    "error_message": "text", "result": "bytea", "retry_count": "bigint",
    "last_retry_at": "timestamptz", "scheduled_at": "timestamptz", "priority": "smallint",
    "max_attempts": "integer", "attempts": "integer",
}  # fmt: skip


#: SQL, in a claim: some rows it locked were not moved. Each was updated and committed by
#: another transaction after the statement's snapshot (and stayed due): the lock takes
#: its newest version, which the snapshot does not see, so the update by tuple id misses
#: it. The row stays eligible; the caller claims again, in a statement of its own.
SKIPPED = "(SELECT count(*) FROM picked) > (SELECT count(*) FROM claimed)"

#: The column where the claimed job's :data:`CLAIMED_COLUMNS` start in the rows of
#: kind 2 of :meth:`Statements.apply` (after the kind). A moved row's columns share
#: the first six of them, of the same types (id; status with job_type; a NULL
#: bytea; tags; assigned_at with created_at; wait_until with started_at): each row
#: decodes 16 columns, not 21.
REFILL_START = 1
#: A moved row's columns in :meth:`Statements.apply`.
MOVED_ID, MOVED_STATUS, MOVED_TAGS, MOVED_AT, MOVED_WAIT = 1, 2, 4, 5, 6


# LOCK_ORDER. Why a one-statement apply locks its rows in key order (two calls naming the same
# jobs in other orders must not wait for each other: PostgreSQL would abort one with
# a deadlock). An UPDATE locks each row as its join produces it, so the join must
# produce them in key order whatever the planner picks. Its input ``c`` is sorted by
# key; no join clause can be hashed or merged (``id_key = ANY(ARRAY[key])``, the others
# wrapped in ``(…) IS TRUE``), so the join is a nested loop, in the order of its outer
# side: ``c``, or the jobs read through the primary key; and the status condition is
# written ``(status IN (…)) IS TRUE``, which no partial index's condition is proven from, so
# no other index (in another order: the assignee index holds one worker's jobs in
# the order they were written) can be the outer side. (Before, the planner read ten
# running jobs of one worker through the assignee index, and two calls deadlocked.)
# An explicit ``SELECT … ORDER BY id_key FOR UPDATE`` first would also do, but it
# locks every row twice: 5-7 µs of server CPU per job more in a complete, and the
# e2e workloads with 100 slots 0.81-0.92 of before in an A/B.
# Key order is byte order: ``id_key`` is ``COLLATE "C"`` (store version 7), so every
# ``ORDER BY id_key`` sorts in it, and ``c``, sorted on a parameter's key, says so.


def _claimed_returning(table: str, now: str) -> str:
    """:data:`CLAIMED_COLUMNS`, each qualified by ``table`` (for ``RETURNING``), but
    ``started_at`` NULL when it is the claim's time ``now`` (a job's first run: the
    caller knows it; decoding a timestamp cost asyncpg 6,000 instructions). A claimed
    job's ``started_at`` is never NULL otherwise."""
    return ", ".join(
        f"NULLIF({table}.started_at, {now}) AS started_at"
        if c.strip() == "started_at"
        else f"{table}.{c.strip()}"
        for c in CLAIMED_COLUMNS.split(",")
    )


def busy_or_idle(status: JobStatus) -> str:
    """The index condition a query for ``status`` repeats so the planner may use the
    partial index that holds it (``jobs_active_assignee`` or a ``jobs_idle_*``)."""
    return f"status IN {ACTIVE_IN}" if status in ACTIVE else f"status NOT IN {ACTIVE_IN}"


class Statements:
    """The statements of the store in PostgreSQL schema ``schema``: its NOTIFY
    ``channel``, and the ``token`` of the backend instance that sends them."""

    def __init__(self, schema: str, channel: str, token: str) -> None:
        self._s = quote_ident(schema)
        self._t = f"{self._s}.jobs"
        self.channel = channel
        self._token = token
        self._sql_cache: dict[tuple[int, bool, bool], tuple[Transition, str]] = {}
        self._generation = 0
        #: By (new jobs only, ignore existing ids, at least :data:`LARGE_INSERT` jobs).
        self.insert = {
            (new, ignore, large): self._insert(full=not new, ignore=ignore, large=large)
            for new in (False, True)
            for ignore in (False, True)
            for large in (False, True)
        }
        #: The enqueue notification of a ``COPY`` insert (``$1``: its payload).
        self.notify = f"SELECT pg_notify('{channel}', $1::text)"
        #: The claim without tags and with them (``$5``).
        self.claim = self._claim(False)
        self.claim_tags = self._claim(True)
        #: The same, leaving out the jobs of the text array in the last parameter (a
        #: refill's claim never takes a job its own call named: see :meth:`apply`).
        self.claim_excluding = self._claim(False, True)
        self.claim_tags_excluding = self._claim(True, True)
        #: Lock the jobs of ``$1`` in key order (a call of several transitions does so
        #: first, as a one-statement apply takes them: see LOCK_ORDER).
        self.lock_ids = (
            f"SELECT 1 FROM {self._t} WHERE {self.id_match('', '$1')} ORDER BY id_key FOR UPDATE"
        )

    def key_ordered_update(self, name: str, where: str, sets: str, returning: str) -> str:
        """Two CTEs: lock the jobs matching ``where`` in key order (see LOCK_ORDER), then
        update them as ``name``, found through the primary key (``where`` wrapped in
        ``(…) IS TRUE`` proves no partial index usable). For a statement whose jobs are
        found through an index in another order (due time, nonce)."""
        t = self._t
        return f"""lk AS (SELECT id_key FROM {t} WHERE {where} ORDER BY id_key FOR UPDATE),
            {name} AS (UPDATE {t} SET {sets}
                WHERE id_key = ANY(ARRAY(SELECT id_key FROM lk)) AND ({where}) IS TRUE
                RETURNING {returning})"""

    def note(self, source: str) -> str:
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
                             CASE WHEN octet_length(p) <= {MAX_PAYLOAD} THEN p ELSE '{tok}' END)
            FROM (SELECT '{tok} ' || json_agg(json_build_array(
                                  id, status, tags, {EPOCH_US.format("assigned_at")},
                                  CASE WHEN status IN {ELIGIBLE_IN}
                                       THEN {EPOCH_US.format("wait_until")} END
                              ))::text AS p
                  FROM {source}
                  WHERE status IN {ELIGIBLE_IN}
                     OR (status <> '{_RUNNING}'
                         AND (claimed_by IS NULL OR claimed_by NOT LIKE '{tok}:%'))) s
            WHERE p IS NOT NULL)"""

    def _claim(self, with_tags: bool, excluding: bool = False) -> str:
        """One statement: lock the oldest eligible matching jobs, skipping locked ones, and
        move them to RUNNING (compare-and-set on the status again, in the same statement).
        Rows of :data:`CLAIMED_COLUMNS`, and one more with every column NULL when
        :data:`SKIPPED` (the caller then claims again for the jobs it did not get)."""
        t = self._t
        tag_cond = f"AND {self.tag_match('tags', '$5')}" if with_tags else ""
        if excluding:
            tag_cond += f" AND NOT (id = ANY(${6 if with_tags else 5}::text[]))"
        sets = set_clause(
            ASSIGN, now="$1::timestamptz", assignee_id="$2::text", sources_checked=True
        )
        nulls = ", ".join(f"NULL::{_CLAIMED_TYPES[c]}" for c in CLAIMED_FIELDS)
        return f"""
            WITH picked AS (
                SELECT ctid AS pid FROM {t}
                WHERE {DUE} {tag_cond}
                ORDER BY {ORDER}
                LIMIT $3
                FOR UPDATE SKIP LOCKED),
            claimed AS (
                UPDATE {t} SET {sets}, claimed_by = $4::text
                WHERE {t}.ctid = ANY(ARRAY(SELECT pid FROM picked))
                  -- the compare-and-set, written so the planner fetches the rows by their
                  -- tuple ids rather than walking the eligible index
                  AND ({t}.status IN {in_list(ASSIGN.sources)}) IS TRUE
                RETURNING {_claimed_returning(t, "$1::timestamptz")})
            SELECT {CLAIMED_COLUMNS} FROM claimed
            UNION ALL SELECT {nulls} WHERE {SKIPPED}"""

    def _insert(self, full: bool, ignore: bool = False, large: bool = False) -> str:
        """Insert a batch from parallel arrays (tags as slices of one flat array), in input
        order (so ``seq`` follows it), and send the enqueue notification, in one statement.

        ``full`` binds every column; otherwise (new jobs whose history fields are unset,
        the usual case) those columns are literals: six fewer arrays to encode and unnest.
        The tag slices (``$5``, ``$6``: NULL when no job has tags) and, for new jobs, the
        messages and assignees (NULL when all are empty) may be NULL arrays.
        ``ignore`` skips ids that exist (``ON CONFLICT DO NOTHING``) and returns the
        inserted ids. Ids, types, creation times (microseconds), and for new jobs messages and
        assignees are text literals, the definitions one ``bytea`` (``$3``) and last
        their end offsets and lengths (see PARAMETERS).

        ``large`` (for a batch of at least :data:`LARGE_INSERT` jobs) puts each array
        behind a sub-select (an InitPlan, run once). A custom plan (a connection's first
        runs of the statement: an enqueue into a fresh queue) otherwise parses every text
        literal once more while planning, only to estimate ``unnest``'s rows
        (``array_unnest_support``): 4,600 of the 69,900 server instructions per job of
        an enqueue of 3,000 jobs. The sub-selects cost about 50,000 per statement (a
        one-job enqueue's 392,000 became 445,000), so a smaller batch goes without them
        (benchmarks/results/pg-session12.md).
        """
        if full:
            history = (
                "u.started_at, u.finalized_at, u.err, u.res, u.rc, u.lra, u.aid, u.aat, "
                "u.sched, u.prio, u.maxa, 0, u.sched"
            )
            arrays = [
                "$7::text::int8[]", "$8::timestamptz[]", "$9::timestamptz[]", "$10::text[]",
                "$11::bytea[]", "$12::bigint[]", "$13::timestamptz[]", "$14::text[]",
                "$15::timestamptz[]", "$16::timestamptz[]", "$17::smallint[]", "$18::integer[]",
            ]  # fmt: skip
            names = (
                "created_at, started_at, finalized_at, err, res, rc, lra, aid, aat, sched, prio, "
                "maxa"
            )
            payload, keys, defs = "$19", "$20", 21
        else:
            history = (
                "NULL, NULL, COALESCE(u.err, ''), NULL, 0, NULL, COALESCE(u.aid, ''), NULL, "
                "NULL, 0, NULL, 0, NULL"
            )
            arrays = ["$7::text::int8[]", "$8::text::text[]", "$9::text::text[]"]
            names = "created_at, err, aid"
            payload, keys, defs = "$10", "$11", 12
        columns = [
            "$1::text::text[]", "$2::text::text[]", f"${defs}::text::int[]",
            f"${defs + 1}::text::int[]", "$5::int[]", "$6::int[]", *arrays,
        ]  # fmt: skip
        if large:
            columns = [f"(SELECT {c})" for c in columns]
        return f"""
            WITH ins AS (
                INSERT INTO {self._t} (
                    id, job_type, job_definition, tags, status, created_at, started_at,
                    finalized_at, error_message, result, retry_count, last_retry_at,
                    assignee_id, assigned_at, scheduled_at, priority, max_attempts, attempts,
                    wait_until, tag_keys, id_key)
                SELECT u.id, u.job_type, {bytes_at("$3::bytea", "u.dend", "u.dlen")},
                       COALESCE(($4::text[])[u.ts:u.te], '{{}}'),
                       '{JobStatus.INITIAL_PENDING.value}', {from_micros("u.created_at")},
                       {history},
                       COALESCE(({keys}::text[])[u.ts:u.te], '{{}}'), {key("u.id")}
                FROM unnest({", ".join(columns)})
                     WITH ORDINALITY AS u(id, job_type, dend, dlen, ts, te, {names}, ord)
                ORDER BY u.ord
                {"ON CONFLICT (id_key) DO NOTHING RETURNING id" if ignore else "RETURNING 1"})
            SELECT {"array_agg(id)" if ignore else "count(*)"},
                   pg_notify('{self.channel}', {payload}::text) FROM ins"""

    def apply(
        self, transition: Transition, refill: bool = False, tags: bool = False, generation: int = 0
    ) -> str:
        """One statement moving jobs by ``transition``: ``$1`` ids, ``$2`` results, ``$3``
        messages, ``$4`` now, and last the results' end offsets and lengths (see
        PARAMETERS: ids and messages are text literals, results one ``bytea``). Rows:
        ``kind`` 1, id, new status, NULL, tags (NULL when the transition makes nothing
        eligible), assignment time, due time for each job it moved, or ``kind`` 4 and
        no assignment time when it is the previous row's (a batch's jobs were most
        often claimed together: a timestamp not decoded); a job it did not move
        has no row (:meth:`apply` then reads why).

        With ``refill``, the :class:`Refill` claim too, in the same statement (one round
        trip, one commit): ``$5`` assignee, ``$6`` the stream's job ids (NULL: all of
        ``$1``), ``$7`` the claim's nonce, ``$8`` its tags (with ``tags``), then (after
        the timed arrays, if any) its ``extra``. It takes one job per freed slot, plus
        ``extra``, and sees the statement's snapshot, so it could not see a move this
        statement made: it takes no job named in ``$1`` at all (one the call moved is
        left for a claim of its own, one it could not move keeps the status its error
        names). Its rows are of kind 2 and carry :data:`CLAIMED_COLUMNS`
        from column 1 on; one row of kind 3 says :data:`SKIPPED`.

        ``generation`` (nonzero) goes into the text as a comment, so each is a new
        prepared statement, whose plan cache starts afresh: five custom plans, then the
        generic plan, of the same cost. The backend starts generation 1 after its first
        ``VACUUM (ANALYZE)``: statistics then raise the statement's estimated cost (its
        claim's ``LIMIT`` is an expression, so the planner takes a tenth of the eligible
        jobs, which it then counts: 129 -> 281 at 5,000 of 10,000), and PostgreSQL,
        comparing the new generic plan with the average of the custom plans made before
        the statistics existed, went on planning every run anew until that average
        caught up (a drain of 10,000 jobs planned 29 times instead of 14-16, 10-13 ms of
        planning instead of 6-8: benchmarks/results/pg-session12.md).
        """
        if generation != self._generation:
            self._sql_cache.clear()
            self._generation = generation
        cache_key = (id(transition), refill, tags)
        cached = self._sql_cache.get(cache_key)
        if cached is not None and cached[0] is transition:
            return cached[1]
        t = self._t
        timed = transition.schedules or bool(transition.exhausted)
        first = 5 if not refill else (9 if tags else 8)  # the timed arrays' placeholders
        sets = set_clause(
            transition,
            # The WHERE moves only jobs in a source status: literal SETs, no CASE over the
            # old status (not for timed moves, whose SQLite-style conditions do not apply)
            sources_checked=not timed,
            now="c.cnow",
            result="c.cres",
            error_message="c.cerr",
            scheduled_at="c.csched" if timed else "NULL",
            max_attempts="c.cmax" if timed else "NULL",
        )
        last = (first + 1 if timed else first - 1) + (1 if refill else 0)
        guard = ""
        if transition.guarded:  # the compare-and-set on the assignment: the last array
            last += 1
            guard = f"AND ({t}.assigned_at = c.cat) IS TRUE"
        unnest = f"$1::text::text[], ${last + 1}::text::int[], ${last + 2}::text::int[], "
        unnest += "$3::text::text[]"
        names = "cid, cend, clen, cerr"
        if timed:
            unnest += f", ${first}::timestamptz[], ${first + 1}::integer[]"
            names += ", csched, cmax"
        if transition.guarded:
            unnest += f", ${last}::timestamptz[]"
            names += ", cat"
        wait_out = "wait_until" if transition.schedules else "NULL::timestamptz"
        claim = rest = claimed = ""
        # Tags matter only for a job that became eligible (streams to wake); not
        # reading them back otherwise saves decoding an array per job.
        tags_out = "tags" if set(transition.moves.values()) & ELIGIBLE else "NULL::text[]"
        if refill:
            extra = first + 2 if timed else first
            assign = set_clause(
                ASSIGN, now="$4::timestamptz", assignee_id="$5::text", sources_checked=True
            )
            tag_cond = f"AND {self.tag_match('tags', '$8')}" if tags else ""
            rest = ", " + ", ".join(f"NULL::{_CLAIMED_TYPES[c]}" for c in CLAIMED_FIELDS[6:])
            nulls = ", ".join(f"NULL::{_CLAIMED_TYPES[c]}" for c in CLAIMED_FIELDS)
            claim = f""",
            picked AS (
                SELECT ctid AS pid FROM {t}
                WHERE {DUE} {tag_cond}
                ORDER BY {ORDER}
                LIMIT (SELECT count(*) FROM moved
                       WHERE ($6::text[] IS NULL OR moved.id = ANY($6::text[]))
                         AND moved.status NOT IN {ACTIVE_IN}) + ${extra}::integer
                FOR UPDATE SKIP LOCKED),
            claimed AS (
                UPDATE {t} SET {assign}, claimed_by = $7::text
                WHERE {t}.ctid = ANY(ARRAY(SELECT pid FROM picked))
                  AND ({t}.status IN {in_list(ASSIGN.sources)}) IS TRUE
                  -- none of the call's own jobs: one picked is SKIPPED (claimed again apart)
                  AND NOT ({t}.id = ANY(ARRAY(SELECT cid FROM c)))
                RETURNING {_claimed_returning(t, "$4::timestamptz")})"""
            claimed = f"""
            UNION ALL
            SELECT 2, {CLAIMED_COLUMNS} FROM claimed
            UNION ALL
            SELECT 3, {nulls} WHERE {SKIPPED}"""
        sql = f"""{f"/* plans {generation} */" if generation else ""}
            WITH c AS (SELECT u.*, {bytes_at("$2::bytea", "u.cend", "u.clen")} AS cres,
                              $4::timestamptz AS cnow
                       FROM unnest({unnest}) AS u({names})
                       ORDER BY {key("u.cid")} COLLATE "C"),
            moved AS (
                -- Rows are locked in the join's order, which must be key order (see
                -- LOCK_ORDER): "= ANY" and "IS TRUE" make the join a nested loop and keep
                -- every index but the primary key out of it.
                UPDATE {t} SET {sets}
                FROM c WHERE {t}.id_key = ANY(ARRAY[{key("c.cid")}]) AND ({t}.id = c.cid) IS TRUE
                  AND ({t}.status IN {in_list(transition.sources)}) IS TRUE {guard}
                RETURNING {t}.id, {t}.status, {t}.tags, {t}.claimed_by, {t}.assigned_at,
                          {t}.wait_until),
            {self.note("moved")}{claim}
            SELECT CASE WHEN same THEN 4 ELSE 1 END AS kind, id, status, NULL::bytea, {tags_out},
                   CASE WHEN same THEN NULL ELSE assigned_at END, {wait_out}{rest}
            FROM (SELECT *, assigned_at IS NOT DISTINCT FROM lag(assigned_at) OVER () AS same
                  FROM moved) m
            WHERE (SELECT count(*) FROM note) >= 0{claimed}"""
        self._sql_cache[cache_key] = (transition, sql)
        return sql

    def id_match(self, prefix: str, param: str) -> str:
        """Jobs whose id is in the text array ``param``, found by their short keys."""
        keys = f"ARRAY(SELECT {key('x')} FROM unnest({param}::text[]) AS x)"
        return f"({prefix}id_key = ANY({keys}) AND {prefix}id = ANY({param}::text[]))"

    def tag_match(self, column: str, param: str) -> str:
        """Jobs carrying every tag in ``param``: the GIN index on short tag keys finds
        candidates, the comparison of the real tags decides (a hash never does)."""
        keys_column = column[: -len("tags")] + "tag_keys"
        wanted = f"{self._s}.tag_keys({param}::text[])"
        return (
            f"({keys_column} <> '{{}}' AND {keys_column} @> {wanted} "
            f"AND {column} @> {param}::text[])"
        )

    def selection(
        self, selection: Selection, alias: str, first: int
    ) -> tuple[str, list[Any], int | None]:
        """A WHERE condition for ``selection`` on ``alias``, with placeholders from ``$first``.

        Returns the condition, its arguments, and the placeholder number of the id list.
        """
        if selection.everything:
            return "TRUE", [], None
        if selection.assignee_id is not None:
            prefix = ASSIGNEE_PREFIX.format
            cond = (
                f"({prefix(f'{alias}.assignee_id')} = {prefix(f'${first}::text')} "
                f"AND {alias}.assignee_id = ${first}::text AND {alias}.status IN {ACTIVE_IN})"
            )
            return cond, [selection.assignee_id], None
        parts: list[str] = []
        args: list[Any] = []
        ids_at: int | None = None
        if selection.job_ids:
            ids_at = first + len(args)
            args.append(list(selection.job_ids))
            parts.append(self.id_match(f"{alias}.", f"${ids_at}"))
        if selection.tags:
            args.append(list(selection.tags))
            parts.append(self.tag_match(f"{alias}.tags", f"${first + len(args) - 1}"))
        return ("(" + " OR ".join(parts) + ")" if parts else "FALSE"), args, ids_at
