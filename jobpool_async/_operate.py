"""Helpers shared by the ``jobpool`` command and the web dashboard: jobs as JSON,
payload previews, and who holds jobs now."""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import datetime
from typing import Any

from ._listing import MAX_LIMIT
from ._models import ACTIVE, Job, JobStats, JobStatus
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
    """Each assignee holding RUNNING/CANCELLING jobs now: job count and oldest assignment."""
    seen: dict[str, dict[str, Any]] = {}
    after: str | None = None
    while True:
        page = await queue.list_jobs(statuses=ACTIVE, limit=page_size, after=after)
        for job in page.jobs:
            entry = seen.setdefault(
                job.assignee_id,
                {"assignee_id": job.assignee_id, "running": 0, "cancelling": 0, "since": None},
            )
            entry[job.status.value] += 1
            if job.assigned_at and (entry["since"] is None or job.assigned_at < entry["since"]):
                entry["since"] = job.assigned_at
        if page.next_after is None:
            break
        after = page.next_after
    return sorted(seen.values(), key=lambda e: e["assignee_id"])
