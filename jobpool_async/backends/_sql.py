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

from .._models import JobStatus
from .._transitions import Transition

__all__ = ["CLAIMED_COLUMNS", "in_list", "set_clause", "status_case"]

#: The columns a claim returns: those it did not set itself (status, assignee and
#: assignment time are the claim's own values, so reading them back is wasted work).
CLAIMED_COLUMNS = (
    "id, job_type, job_definition, tags, created_at, started_at, finalized_at, "
    "error_message, result, retry_count, last_retry_at"
)


def in_list(statuses: Iterable[JobStatus]) -> str:
    """``('running', 'cancelling')`` — a SQL list of status literals (sorted, stable)."""
    values = sorted(s.value for s in statuses)
    if not values:
        return "(NULL)"
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


def status_case(transition: Transition, column: str = "status") -> str:
    """``CASE status WHEN 'running' THEN 'completed' … END`` for the transition's moves."""
    whens = " ".join(
        f"WHEN '{src.value}' THEN '{dst.value}'"
        for src, dst in sorted(transition.moves.items(), key=lambda kv: kv[0].value)
    )
    return f"CASE {column} {whens} END"


def set_clause(
    transition: Transition,
    *,
    now: str,
    result: str | None = None,
    error_message: str | None = None,
    assignee_id: str | None = None,
    retry_increment: str = "1",
) -> str:
    """The ``SET`` list of an ``UPDATE`` applying ``transition`` with its side effects.

    ``now``/``result``/``error_message``/``assignee_id`` are SQL expressions
    (placeholders); ``result`` and ``error_message`` keep the stored value when the
    bound parameter is NULL. The caller adds ``WHERE status IN in_list(sources)``.
    """
    parts = [f"status = {status_case(transition)}"]
    if transition.assign:
        if assignee_id is None:
            raise ValueError(f"{transition.name} needs an assignee_id expression")
        parts += [
            f"assignee_id = {assignee_id}",
            f"assigned_at = {now}",
            f"started_at = COALESCE(started_at, {now})",
        ]
    if transition.retry_sources:
        cond = f"status IN {in_list(transition.retry_sources)}"
        parts += [
            f"retry_count = retry_count + CASE WHEN {cond} THEN {retry_increment} ELSE 0 END",
            f"last_retry_at = CASE WHEN {cond} THEN {now} ELSE last_retry_at END",
        ]
    if transition.finalize_sources:
        cond = f"status IN {in_list(transition.finalize_sources)}"
        parts.append(f"finalized_at = CASE WHEN {cond} THEN {now} ELSE finalized_at END")
    if result is not None:
        parts.append(f"result = COALESCE({result}, result)")
    if error_message is not None:
        parts.append(f"error_message = COALESCE({error_message}, error_message)")
    return ", ".join(parts)
