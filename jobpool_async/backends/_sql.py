"""What the SQLite and PostgreSQL backends share: the columns of a job and where each
stands in a row, the status names, why a job was not moved, and the transition
table compiled into SQL.

Rows are read by column *name*: :class:`JobColumns` gives each :class:`Job` field's
position in a select list, computed once at import from the same tuple of names the
list's text is made of, so reordering a select list (or ``Job``'s fields) cannot
silently swap two values of the same type.


The SQL backends never hand-write which status goes where: they build their
``UPDATE`` statements from :class:`~jobpool_async._transitions.Transition` objects,
so the table in ``_transitions.py`` stays the single source of truth. In an
``UPDATE``, every ``SET`` expression sees the row's *old* values, so ``status``
below is the status before the move (a compare-and-set inside one statement).

Status values are enum literals, never user input, so inlining them is safe.
Placeholders differ per driver (``?``, ``:name``, ``$1``) and are passed in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from .base import (
    InvalidTransitionError,
    Job,
    JobNotFoundError,
    JobPoolError,
    JobStatus,
    Transition,
)

__all__ = [
    "ABSENT",
    "CLAIMED",
    "CLAIMED_COLUMNS",
    "CLAIMED_FIELDS",
    "JOB",
    "JOB_COLUMNS",
    "JOB_FIELDS",
    "STATUS",
    "JobColumns",
    "exhausted_sql",
    "in_list",
    "not_moved",
    "read_job",
    "set_clause",
    "status_case",
]

#: The stored columns of a job, named as :class:`Job`'s fields, in the order the
#: statements that read whole jobs select them (:data:`JOB_COLUMNS`).
JOB_FIELDS: tuple[str, ...] = (
    "id", "job_type", "job_definition", "tags", "status", "created_at", "started_at",
    "finalized_at", "error_message", "result", "retry_count", "last_retry_at",
    "assignee_id", "assigned_at", "scheduled_at", "priority", "max_attempts", "attempts",
)  # fmt: skip
JOB_COLUMNS = ", ".join(JOB_FIELDS)
#: The columns a claim returns: those it did not set itself (status, assignee and
#: assignment time are the claim's own values, so reading them back is wasted work).
CLAIMED_FIELDS = tuple(f for f in JOB_FIELDS if f not in ("status", "assignee_id", "assigned_at"))
CLAIMED_COLUMNS = ", ".join(CLAIMED_FIELDS)
#: A stored status value's :class:`JobStatus`.
STATUS = {s.value: s for s in JobStatus}


#: The position of a field a row does not hold: past the end of any row, so reading
#: it fails (``IndexError``) instead of reading some other column.
ABSENT = 1 << 30


class JobColumns(NamedTuple):
    """Where each :class:`Job` field stands in a row (:data:`ABSENT`: not in it).

    Build one with :meth:`of` from a select list's names, once, at import; a reader
    then takes ``row[c.created_at]``: by name, as cheap as a literal index once
    bound to a local.
    """

    id: int
    job_type: int
    job_definition: int
    tags: int
    status: int
    created_at: int
    started_at: int
    finalized_at: int
    error_message: int
    result: int
    retry_count: int
    last_retry_at: int
    assignee_id: int
    assigned_at: int
    scheduled_at: int
    priority: int
    max_attempts: int
    attempts: int

    @classmethod
    def of(cls, fields: Sequence[str], start: int = 0) -> JobColumns:
        """The positions of ``fields`` in a row whose column ``start`` is the first."""
        unknown = set(fields) - set(cls._fields)
        if unknown or len(set(fields)) != len(fields):
            raise ValueError(f"not a list of distinct Job fields: {fields!r}")
        at = {name: start + i for i, name in enumerate(fields)}
        return cls(**{name: at.get(name, ABSENT) for name in cls._fields})


def _check_fields() -> None:
    """:class:`JobColumns` and :data:`JOB_FIELDS` name every field of :class:`Job` (a
    field added to ``Job`` and not stored fails here, at import)."""
    names = {f.name for f in dataclasses.fields(Job)}
    if set(JobColumns._fields) != names or set(JOB_FIELDS) != names:
        raise RuntimeError("the SQL column lists do not match Job's fields")


_check_fields()

#: Positions in a row of :data:`JOB_COLUMNS` and of :data:`CLAIMED_COLUMNS`.
JOB = JobColumns.of(JOB_FIELDS)
CLAIMED = JobColumns.of(CLAIMED_FIELDS)


class Row(Protocol):
    """A row of a driver's result: columns by position (a tuple, an asyncpg Record)."""

    def __getitem__(self, index: int, /) -> Any: ...


def read_job(
    row: Row,
    c: JobColumns,
    status: JobStatus,
    assignee_id: str,
    assigned_at: datetime | None,
    when: Callable[[Any], datetime | None],
    tags: Callable[[Any], list[str]],
) -> Job:
    """The job in ``row``, its columns at ``c``: ``when`` decodes a stored timestamp,
    ``tags`` the stored tags. Status, assignee and assignment time are given (a
    claim knows them; a read decodes them from the row)."""
    return Job(
        id=row[c.id],
        job_type=row[c.job_type],
        job_definition=row[c.job_definition],
        tags=tags(row[c.tags]),
        status=status,
        created_at=when(row[c.created_at]),  # type: ignore[arg-type]
        started_at=when(row[c.started_at]),
        finalized_at=when(row[c.finalized_at]),
        error_message=row[c.error_message],
        result=row[c.result],
        retry_count=row[c.retry_count],
        last_retry_at=when(row[c.last_retry_at]),
        assignee_id=assignee_id,
        assigned_at=assigned_at,
        scheduled_at=when(row[c.scheduled_at]),
        priority=row[c.priority],
        max_attempts=row[c.max_attempts],
        attempts=row[c.attempts],
    )


def not_moved(
    unmoved: Mapping[str, Transition], current: Mapping[str, str]
) -> dict[str, JobPoolError]:
    """Why each job a move did not move was not: ``current`` holds the stored status
    of those still stored (read after the move), so the others are gone and these
    are in a status their transition does not leave."""
    errors: dict[str, JobPoolError] = {}
    for job_id, transition in unmoved.items():
        status = current.get(job_id)
        errors[job_id] = (
            JobNotFoundError(job_id)
            if status is None
            else InvalidTransitionError(job_id, STATUS[status], transition.target)
        )
    return errors


def in_list(statuses: Iterable[JobStatus]) -> str:
    """``('running', 'cancelling')`` — a SQL list of status literals (sorted, stable)."""
    values = sorted(s.value for s in statuses)
    if not values:
        return "(NULL)"
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


def status_case(
    transition: Transition, column: str = "status", exhausted: str | None = None
) -> str:
    """``CASE status WHEN 'running' THEN 'completed' … END`` for the transition's moves;
    with ``exhausted`` (a SQL condition: no attempts left), its exhausted targets first."""
    whens = " ".join(
        f"WHEN '{src.value}' THEN '{dst.value}'"
        for src, dst in sorted(transition.moves.items(), key=lambda kv: kv[0].value)
    )
    case = f"CASE {column} {whens} END"
    if not transition.exhausted or exhausted is None:
        return case
    first = " ".join(
        f"WHEN {column} = '{src.value}' AND ({exhausted}) IS TRUE THEN '{dst.value}'"
        for src, dst in sorted(transition.exhausted.items(), key=lambda kv: kv[0].value)
    )
    return f"CASE {first} ELSE {case} END"


def _code_of(transition: Transition, new_status: str, codes: Mapping[JobStatus, int]) -> str:
    """SQL: the code (``codes``; NULL where it has none) of the status ``new_status``
    computes for a job moved by ``transition``."""
    targets = sorted({*transition.moves.values(), *transition.exhausted.values()})
    values = {t: str(codes[t]) if t in codes else "NULL" for t in targets}
    if len(set(values.values())) == 1:
        return values[targets[0]]
    whens = " ".join(f"WHEN '{t.value}' THEN {v}" for t, v in values.items())
    return f"CASE {new_status} {whens} END"


def exhausted_sql(default_max_attempts: str) -> str:
    """SQL: the job has no attempts left (``max_attempts``, else the given default)."""
    return f"attempts >= COALESCE(max_attempts, {default_max_attempts})"


def set_clause(
    transition: Transition,
    *,
    now: str,
    result: str | None = None,
    error_message: str | None = None,
    assignee_id: str | None = None,
    retry_increment: str = "1",
    scheduled_at: str = "NULL",
    max_attempts: str = "NULL",
    codes: Mapping[JobStatus, int] | None = None,
    code_column: str = "list_state",
    sources_checked: bool = False,
) -> str:
    """The ``SET`` list of an ``UPDATE`` applying ``transition`` with its side effects.

    ``now``/``result``/``error_message``/``assignee_id``/``scheduled_at``/
    ``max_attempts`` (the default attempt limit) are SQL expressions (placeholders);
    ``result`` and ``error_message`` keep the stored value when the bound parameter
    is NULL (and ``error_message`` a non-empty stored one under ``keeps_message``).
    A ``schedules`` transition writes ``scheduled_at`` and ``wait_until``
    (the backends' "not yet due" marker, cleared when the job comes due). The caller
    adds ``WHERE status IN in_list(sources)``.

    With ``codes``, ``code_column`` is set to the code of the new status (NULL for a
    status without one): a literal when every move ends in one status (a claim, a
    completion), else a ``CASE`` over the new status.

    ``sources_checked``: the statement moves only jobs in one of the transition's
    sources (its ``WHERE`` says so), so a transition with one target sets it as a
    literal instead of a ``CASE`` that compares the old status with each source, a
    side effect of every source is set without a condition, and the others test the
    old status with ``=`` (SQLite builds a temporary index for an ``IN`` list each
    time the statement runs).
    """

    def old_status_in(statuses: Iterable[JobStatus]) -> str | None:
        """SQL: the old status is one of ``statuses``; None when every moved job's is."""
        wanted = set(statuses)
        if not sources_checked:
            return f"status IN {in_list(wanted)}"
        if transition.sources <= wanted:
            return None
        inside = sorted(s.value for s in wanted & transition.sources)
        return "(" + (" OR ".join(f"status = '{v}'" for v in inside) or "0") + ")"

    exhausted = exhausted_sql(max_attempts) if transition.exhausted else None
    targets = set(transition.moves.values())
    if sources_checked and not transition.exhausted and len(targets) == 1:
        new_status = f"'{targets.pop().value}'"
    else:
        new_status = status_case(transition, exhausted=exhausted)
    parts = [f"status = {new_status}"]
    if codes is not None:
        parts.append(f"{code_column} = {_code_of(transition, new_status, codes)}")
    if transition.assign:
        if assignee_id is None:
            raise ValueError(f"{transition.name} needs an assignee_id expression")
        parts += [
            f"assignee_id = {assignee_id}",
            f"assigned_at = {now}",
            f"started_at = COALESCE(started_at, {now})",
            "attempts = attempts + 1",
        ]
    if transition.retry_sources:
        cond = old_status_in(transition.retry_sources)
        if cond is None:
            parts += [f"retry_count = retry_count + {retry_increment}", f"last_retry_at = {now}"]
        else:
            parts += [
                f"retry_count = retry_count + CASE WHEN {cond} THEN {retry_increment} ELSE 0 END",
                f"last_retry_at = CASE WHEN {cond} THEN {now} ELSE last_retry_at END",
            ]
    if transition.reopens:  # clears result, unless the change gives one (set below)
        parts += ["finalized_at = NULL"] + (["result = NULL"] if result is None else [])
    elif transition.finalize_sources or exhausted is not None:
        final = old_status_in(transition.finalize_sources)
        if transition.finalize_sources and final is None:  # every move finalizes
            parts.append(f"finalized_at = {now}")
        else:
            whens = ""
            if transition.finalize_sources:
                whens += f" WHEN {final} THEN {now}"
            if exhausted is not None:
                spent = old_status_in(transition.exhausted) or "1"
                whens += f" WHEN {spent} AND ({exhausted}) IS TRUE THEN {now}"
            parts.append(f"finalized_at = CASE{whens} ELSE finalized_at END")
    if transition.schedules:
        cond = old_status_in(transition.schedule_sources) or "1"
        if exhausted is not None:
            cond += f" AND NOT (({exhausted}) IS TRUE)"
        for column in ("scheduled_at", "wait_until"):
            parts.append(f"{column} = CASE WHEN {cond} THEN {scheduled_at} ELSE {column} END")
    if result is not None:
        kept = "NULL" if transition.reopens else "result"
        parts.append(f"result = COALESCE({result}, {kept})")
    if error_message is not None:
        given = f"COALESCE({error_message}, error_message)"
        if transition.keeps_message:  # only a job with no message of its own
            given = f"CASE WHEN error_message = '' THEN {given} ELSE error_message END"
        parts.append(f"error_message = {given}")
    return ", ".join(parts)
