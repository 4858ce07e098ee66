"""Compile the transition table into SQL, for the SQLite and PostgreSQL backends.

The SQL backends never hand-write which status goes where: they build their
``UPDATE`` statements from :class:`~jobpool_async._transitions.Transition` objects,
so the table in ``_transitions.py`` stays the single source of truth. In an
``UPDATE``, every ``SET`` expression sees the row's *old* values, so ``status``
below is the status before the move (a compare-and-set inside one statement).

Status values are enum literals, never user input, so inlining them is safe.
Placeholders differ per driver (``?``, ``:name``, ``$1``) and are passed in.
"""

from __future__ import annotations

from collections.abc import Iterable

from .base import (
    JobStatus,
    Transition,
)

__all__ = ["CLAIMED_COLUMNS", "exhausted_sql", "in_list", "set_clause", "status_case"]

#: The columns a claim returns: those it did not set itself (status, assignee and
#: assignment time are the claim's own values, so reading them back is wasted work).
CLAIMED_COLUMNS = (
    "id, job_type, job_definition, tags, created_at, started_at, finalized_at, "
    "error_message, result, retry_count, last_retry_at, scheduled_at, priority, "
    "max_attempts, attempts"
)


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
) -> str:
    """The ``SET`` list of an ``UPDATE`` applying ``transition`` with its side effects.

    ``now``/``result``/``error_message``/``assignee_id``/``scheduled_at``/
    ``max_attempts`` (the default attempt limit) are SQL expressions (placeholders);
    ``result`` and ``error_message`` keep the stored value when the bound parameter
    is NULL. A ``schedules`` transition writes ``scheduled_at`` and ``wait_until``
    (the backends' "not yet due" marker, cleared when the job comes due). The caller
    adds ``WHERE status IN in_list(sources)``.
    """
    exhausted = exhausted_sql(max_attempts) if transition.exhausted else None
    parts = [f"status = {status_case(transition, exhausted=exhausted)}"]
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
        cond = f"status IN {in_list(transition.retry_sources)}"
        parts += [
            f"retry_count = retry_count + CASE WHEN {cond} THEN {retry_increment} ELSE 0 END",
            f"last_retry_at = CASE WHEN {cond} THEN {now} ELSE last_retry_at END",
        ]
    if transition.reopens:  # clears result, unless the change gives one (set below)
        parts += ["finalized_at = NULL"] + (["result = NULL"] if result is None else [])
    elif transition.finalize_sources or exhausted is not None:
        whens = ""
        if transition.finalize_sources:
            whens += f" WHEN status IN {in_list(transition.finalize_sources)} THEN {now}"
        if exhausted is not None:
            whens += (
                f" WHEN status IN {in_list(transition.exhausted)} AND ({exhausted}) IS TRUE"
                f" THEN {now}"
            )
        parts.append(f"finalized_at = CASE{whens} ELSE finalized_at END")
    if transition.schedules:
        cond = f"status IN {in_list(transition.schedule_sources)}"
        if exhausted is not None:
            cond += f" AND NOT (({exhausted}) IS TRUE)"
        for column in ("scheduled_at", "wait_until"):
            parts.append(f"{column} = CASE WHEN {cond} THEN {scheduled_at} ELSE {column} END")
    if result is not None:
        kept = "NULL" if transition.reopens else "result"
        parts.append(f"result = COALESCE({result}, {kept})")
    if error_message is not None:
        parts.append(f"error_message = COALESCE({error_message}, error_message)")
    return ", ".join(parts)
