"""Helpers shared by the ``jobpool`` command and the web dashboard: jobs as JSON,
payload previews, and who holds jobs now."""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import datetime
from typing import Any

from ._listing import MAX_LIMIT
from ._models import ACTIVE, Job, JobStats, JobStatus, utcnow
from ._queue import PoolQueue

__all__ = ["active_assignees", "job_json", "preview", "stats_json"]


def job_json(job: Job, *, full: bool = False) -> dict[str, Any]:
    """A job as JSON: every field; bytes as base64 (``full``) or left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(job):
        value = getattr(job, f.name)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, JobStatus):
            value = value.value
        elif isinstance(value, bytes):
            if not full:
                out[f"{f.name}_size"] = len(value)
                continue
            value = base64.b64encode(value).decode("ascii")
        out[f.name] = value
    return out


def stats_json(stats: JobStats) -> dict[str, Any]:
    out = dataclasses.asdict(stats)
    out["by_status"] = {s.value: n for s, n in stats.by_status.items()}
    return out


def preview(data: bytes, limit: int = 2000) -> tuple[str, str]:
    """``(kind, text)`` of a payload: ``json`` (pretty), ``text`` or ``hex`` (a dump)."""
    if not data:
        return "empty", ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        shown = data[: limit // 4]
        lines = [f"{i:08x}  {shown[i : i + 16].hex(' ')}" for i in range(0, len(shown), 16)]
        more = f"\n… {len(data) - len(shown)} more bytes" if len(data) > len(shown) else ""
        return "hex", "\n".join(lines) + more
    try:
        return "json", json.dumps(json.loads(text), indent=2, ensure_ascii=False)[:limit]
    except ValueError:
        return "text", text[:limit]


async def active_assignees(queue: PoolQueue, page_size: int = MAX_LIMIT) -> list[dict[str, Any]]:
    """Every worker the store knows of: each assignee holding RUNNING/CANCELLING jobs
    now (how many, held since when) and each with a lease record (its holders, when
    first seen, last renewed, when it expires, and whether it is live), by name."""
    seen: dict[str, dict[str, Any]] = {}

    def entry(assignee_id: str) -> dict[str, Any]:
        return seen.setdefault(
            assignee_id,
            {
                "assignee_id": assignee_id,
                "running": 0,
                "cancelling": 0,
                "since": None,
                "lease": None,
            },
        )

    after: str | None = None
    while True:
        page = await queue.list_jobs(statuses=ACTIVE, limit=page_size, after=after)
        for job in page.jobs:
            e = entry(job.assignee_id)
            e[job.status.value] += 1
            if job.assigned_at and (e["since"] is None or job.assigned_at < e["since"]):
                e["since"] = job.assigned_at
        if page.next_after is None:
            break
        after = page.next_after
    now = utcnow()
    for lease in await queue.list_workers():
        entry(lease.assignee_id)["lease"] = {
            "holders": list(lease.holders),
            "first_seen_at": lease.first_seen_at,
            "renewed_at": lease.renewed_at,
            "expires_at": lease.expires_at,
            "live": lease.expires_at > now,
        }
    return sorted(seen.values(), key=lambda e: e["assignee_id"])
