"""The web dashboard: ``create_app(queue)`` is an ASGI app (Starlette).

Server-side HTML with a few lines of plain JavaScript (no build step): an
overview (counts by status and tag, throughput and queue-wait charts for the last
hour, the oldest waiting job's age), the job list with the ``list_jobs`` filters,
job detail, workers, and actions (cancel, delete, and requeue where the queue has
``requeue_jobs``) on one job or a selection, each confirmed and answered with what
it did. Pages refresh their live part by short polling; every read goes through a
cache shared by all viewers, so however many browsers watch, each view kind reads
the store at most once per ``refresh`` seconds (default 1).

Also ``/healthz`` and ``/metrics`` (Prometheus text format). Needs the ``web``
extra: ``pip install 'jobpool_async[web]'``. Mount it in your own app with
``app.mount("/jobs", create_app(queue))``, or serve it with ``jobpool dashboard``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import html
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ._errors import JobNotFoundError, JobsNotFinalError
from ._listing import MAX_LIMIT, JobPage
from ._models import ELIGIBLE, Job, JobStats, JobStatus, utcnow
from ._operate import active_assignees, job_json, preview, stats_json
from ._queue import PoolQueue

__all__ = ["create_app"]

#: Jobs read for the charts and the metrics' counters: the newest, created within the
#: last hour, at most this many per refresh.
SAMPLE_LIMIT = 5000
#: The most jobs one action takes from "all matching" a filter.
MAX_SELECTED = 5000
#: Tags shown on the overview when none are given: the most frequent in the sample.
TOP_TAGS = 8
#: Histogram buckets (seconds) of processing time and queue wait.
BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


def e(value: object) -> str:
    """Escape for HTML text and attribute values (every rendered value goes through it)."""
    return html.escape(str(value), quote=True)


# --- the shared cache ------------------------------------------------------------------


class _Cache:
    """One refresh per key per ``ttl`` seconds, shared by every concurrent reader."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._values: dict[str, tuple[float, Any]] = {}
        self._inflight: dict[str, asyncio.Task[Any]] = {}

    async def get(self, key: str, fetch: Callable[[], Awaitable[Any]]) -> Any:
        hit = self._values.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        task = self._inflight.get(key)
        if task is None:

            async def run() -> Any:
                try:
                    value = await fetch()
                    self._values[key] = (time.monotonic(), value)
                    if len(self._values) > 512:  # many distinct filters: drop the oldest
                        oldest = min(self._values, key=lambda k: self._values[k][0])
                        self._values.pop(oldest, None)
                    return value
                finally:
                    self._inflight.pop(key, None)

            task = asyncio.ensure_future(run())
            self._inflight[key] = task
        return await asyncio.shield(task)

    def forget(self) -> None:
        """After an action: the next read of every view is fresh."""
        self._values.clear()


# --- what the dashboard observes (charts and metrics) --------------------------------


@dataclass(slots=True)
class _Observed:
    """Counters and histograms built from the jobs the dashboard has seen, each event
    counted once (jobs are remembered while they are in the one-hour sample)."""

    enqueued: int = 0
    completed: int = 0
    failed: int = 0
    processing: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    processing_sum: float = 0.0
    waiting: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    waiting_sum: float = 0.0
    seen: dict[str, tuple[bool, bool, int]] = field(default_factory=dict)

    def observe(self, jobs: Sequence[Job], horizon: datetime) -> None:
        for job in jobs:
            started = job.started_at is not None
            done = job.status is JobStatus.COMPLETED
            before = self.seen.get(job.id)
            if before is None:
                self.enqueued += 1
                before = (False, False, 0)
            was_started, was_done, retries = before
            if started and not was_started and job.started_at is not None:
                wait = (job.started_at - job.created_at).total_seconds()
                self.waiting_sum += wait
                self.waiting[_bucket(wait)] += 1
            if done and not was_done:
                self.completed += 1
                if job.started_at is not None and job.finalized_at is not None:
                    took = (job.finalized_at - job.started_at).total_seconds()
                    self.processing_sum += took
                    self.processing[_bucket(took)] += 1
            if job.retry_count > retries:
                self.failed += job.retry_count - retries
            self.seen[job.id] = (started or was_started, done or was_done, job.retry_count)
        if len(self.seen) > 4 * SAMPLE_LIMIT:  # forget jobs that left the sample
            keep = {job.id for job in jobs if job.created_at >= horizon}
            self.seen = {k: v for k, v in self.seen.items() if k in keep}


def _bucket(seconds: float) -> int:
    for i, bound in enumerate(BUCKETS):
        if seconds <= bound:
            return i
    return len(BUCKETS)


class _Collector:
    """Prometheus metrics from the latest snapshot (collected when /metrics is read)."""

    def __init__(self, dash: _Dashboard) -> None:
        self.dash = dash

    def collect(self) -> Iterable[Metric]:
        snap = self.dash.last_overview
        jobs = GaugeMetricFamily("jobpool_jobs", "Jobs in the store by status", labels=["status"])
        tagged = GaugeMetricFamily(
            "jobpool_jobs_by_tag", "Jobs carrying a tag, by status", labels=["tag", "status"]
        )
        if snap is not None:
            for status in JobStatus:
                jobs.add_metric([status.value], snap.stats.by_status.get(status, 0))
            for tag, stats in snap.tags.items():
                for status in JobStatus:
                    tagged.add_metric([tag, status.value], stats.by_status.get(status, 0))
        yield jobs
        yield tagged
        o = self.dash.observed
        for name, value, text in (
            ("jobpool_jobs_enqueued", o.enqueued, "Jobs seen enqueued"),
            ("jobpool_jobs_completed", o.completed, "Jobs seen completed"),
            ("jobpool_jobs_failed", o.failed, "Failed runs seen (retry_count increments)"),
        ):
            yield CounterMetricFamily(name, text, value=value)
        for name, counts, total, text in (
            (
                "jobpool_job_processing_seconds",
                o.processing,
                o.processing_sum,
                "Seconds from a job's start to its completion",
            ),
            (
                "jobpool_job_queue_wait_seconds",
                o.waiting,
                o.waiting_sum,
                "Seconds from a job's creation to its first start",
            ),
        ):
            cumulative, buckets = 0, []
            for bound, n in zip([*map(str, BUCKETS), "+Inf"], counts, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            yield HistogramMetricFamily(name, text, buckets=buckets, sum_value=total)


# --- snapshots -------------------------------------------------------------------------


@dataclass(slots=True)
class _Overview:
    stats: JobStats
    tags: dict[str, JobStats]
    oldest_waiting: datetime | None
    throughput: list[int]  # completions per minute, oldest minute first (60)
    wait: list[float | None]  # median queue wait (s) of the jobs started in each minute
    at: datetime


def _minute_series(sample: Sequence[Job], now: datetime) -> tuple[list[int], list[float | None]]:
    done = [0] * 60
    waits: list[list[float]] = [[] for _ in range(60)]
    for job in sample:
        if job.status is JobStatus.COMPLETED and job.finalized_at is not None:
            m = 59 - int((now - job.finalized_at).total_seconds() // 60)
            if 0 <= m < 60:
                done[m] += 1
        if job.started_at is not None:
            m = 59 - int((now - job.started_at).total_seconds() // 60)
            if 0 <= m < 60:
                waits[m].append((job.started_at - job.created_at).total_seconds())
    medians = [sorted(w)[len(w) // 2] if w else None for w in waits]
    return done, medians


class _Dashboard:
    def __init__(self, queue: PoolQueue, refresh: float, tags: Sequence[str] | None) -> None:
        self.queue = queue
        self.cache = _Cache(refresh)
        self.fixed_tags = list(tags) if tags else None
        self.observed = _Observed()
        self.last_overview: _Overview | None = None

    async def sample(self) -> list[Job]:
        """The newest jobs created within the last hour (at most SAMPLE_LIMIT)."""
        horizon = utcnow() - timedelta(hours=1)
        out: list[Job] = []
        after: str | None = None
        while len(out) < SAMPLE_LIMIT:
            page: JobPage = await self.queue.list_jobs(limit=MAX_LIMIT, after=after)
            fresh = [j for j in page.jobs if j.created_at >= horizon]
            out += fresh
            if len(fresh) < len(page.jobs) or page.next_after is None:
                break
            after = page.next_after
        self.observed.observe(out, horizon)
        return out

    async def overview(self) -> _Overview:
        async def fetch() -> _Overview:
            now = utcnow()
            stats = await self.queue.get_job_stats()
            sample = await self.sample()
            tags = self.fixed_tags
            if tags is None:
                counts: dict[str, int] = {}
                for job in sample:
                    for tag in job.tags:
                        counts[tag] = counts.get(tag, 0) + 1
                tags = sorted(counts, key=lambda t: (-counts[t], t))[:TOP_TAGS]
            by_tag = {t: await self.queue.get_job_stats([t]) for t in tags}
            oldest = await self.queue.backend.oldest_created(frozenset(ELIGIBLE))
            throughput, wait = _minute_series(sample, now)
            snap = _Overview(stats, by_tag, oldest, throughput, wait, now)
            self.last_overview = snap
            return snap

        result: _Overview = await self.cache.get("overview", fetch)
        return result


# --- HTML ------------------------------------------------------------------------------

_CSS = """
body{font:14px system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#243447;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:center}
header a{color:#cde;text-decoration:none}header a.on{color:#fff;font-weight:600}
main{padding:1em 1.4em}table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef2f6}.num{text-align:right}.cards{display:flex;flex-wrap:wrap;gap:.6em}
.card{background:#fff;border:1px solid #ddd;padding:.5em .9em;min-width:8em}
.card b{display:block;font-size:1.5em}pre{background:#fff;border:1px solid #ddd;padding:.6em;
overflow:auto;max-height:30em}.msg{background:#ffe;border:1px solid #cc9;padding:.6em}
.err{background:#fee;border-color:#c99}form.inline{display:inline}
.muted{color:#777}svg{background:#fff;border:1px solid #ddd}
"""

#: Polls the page's live part (same URL, ``fragment=1``) every REFRESH ms; pauses while
#: a box is ticked, so a selection is not wiped out under the user's pointer.
_JS = """
(function(){const live=document.getElementById('live');if(!live)return;
const every=+live.dataset.refresh;async function tick(){
if(!live.querySelector('input:checked')){try{const u=new URL(location.href);
u.searchParams.set('fragment','1');const r=await fetch(u,{headers:{'Accept':'text/html'}});
if(r.ok){live.innerHTML=await r.text();}}catch(e){}}setTimeout(tick,every);}
setTimeout(tick,every);
document.addEventListener('click',function(ev){const b=ev.target.closest('[data-all]');
if(b){live.querySelectorAll('input[name=id]').forEach(c=>c.checked=b.checked);}});})();
"""

_NAV = (("", "Overview"), ("jobs", "Jobs"), ("workers", "Workers"))


def _age(since: datetime | None, now: datetime) -> str:
    if since is None:
        return "none waiting"
    seconds = max(0, int((now - since).total_seconds()))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    parts.append(f"{seconds}s")
    return " ".join(parts[:2])


def _bars(values: Sequence[float | None], title: str, unit: str) -> str:
    """A 60-bar inline SVG chart (one bar per minute of the last hour)."""
    top = max((v for v in values if v is not None), default=0) or 1
    w, h = 600, 120
    bw = w / len(values)
    bars = []
    for i, v in enumerate(values):
        if v is None or v <= 0:
            continue
        bh = max(1.0, (h - 20) * v / top)
        bars.append(
            f'<rect x="{i * bw:.1f}" y="{h - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" '
            f'fill="#4a7ab0"><title>{e(f"{v:g}")} {e(unit)}</title></rect>'
        )
    label = f"{title} (max {top:g} {unit}; last 60 minutes)"
    return (
        f"<figure><figcaption>{e(label)}</figcaption>"
        f'<svg width="{w}" height="{h}" role="img" aria-label="{e(title)}">{"".join(bars)}</svg>'
        "</figure>"
    )


class _Pages:
    def __init__(self, dash: _Dashboard, read_only: bool, refresh: float) -> None:
        self.dash = dash
        self.queue = dash.queue
        self.read_only = read_only
        self.refresh_ms = int(refresh * 1000)
        self.csrf = secrets.token_urlsafe(32)

    # -- page frame --

    @staticmethod
    def base(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def page(self, request: Request, title: str, active: str, live: str, extra: str = "") -> str:
        base = self.base(request)
        nav = "".join(
            f'<a href="{e(base)}/{e(path)}" class="{"on" if path == active else ""}">{e(name)}</a>'
            for path, name in _NAV
        )
        mode = '<span class="muted">read-only</span>' if self.read_only else ""
        return (
            "<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{e(title)} · jobpool</title><style>{_CSS}</style></head><body>"
            f"<header><strong>jobpool</strong>{nav}{mode}</header><main>"
            f"<h1>{e(title)}</h1>{extra}"
            f'<div id="live" data-refresh="{self.refresh_ms}">{live}</div>'
            f"</main><script>{_JS}</script></body></html>"
        )

    def respond(
        self, request: Request, title: str, active: str, live: str, extra: str = ""
    ) -> Response:
        if request.query_params.get("fragment") == "1":
            return HTMLResponse(live)
        return HTMLResponse(self.page(request, title, active, live, extra))

    def job_link(self, request: Request, job_id: str) -> str:
        return f'<a href="{e(self.base(request))}/jobs/{e(quote(job_id, safe=""))}">{e(job_id)}</a>'

    def action_form(self, request: Request, action: str, ids: Sequence[str], label: str) -> str:
        if self.read_only:
            return ""
        hidden = "".join(f'<input type="hidden" name="id" value="{e(i)}">' for i in ids)
        return (
            f'<form class="inline" method="post" '
            f'action="{e(self.base(request))}/actions/{e(action)}">'
            f'<input type="hidden" name="csrf" value="{e(self.csrf)}">{hidden}'
            f'<button type="submit" name="step" value="confirm">{e(label)}</button></form>'
        )

    def actions(self) -> list[tuple[str, str]]:
        acts = [("cancel", "Cancel"), ("delete", "Delete")]
        if hasattr(self.queue, "requeue_jobs"):
            acts.insert(1, ("requeue", "Requeue"))
        return acts

    # -- overview --

    async def overview(self, request: Request) -> Response:
        snap = await self.dash.overview()
        cards = "".join(
            f'<div class="card" data-status="{e(s.value)}">{e(s.value)}'
            f'<b data-count="{e(s.value)}">{snap.stats.by_status.get(s, 0)}</b></div>'
            for s in JobStatus
        )
        total = f'<div class="card">total<b data-count="total">{snap.stats.total_jobs}</b></div>'
        tag_rows = "".join(
            f"<tr><td>{e(tag)}</td>"
            + "".join(f'<td class="num">{st.by_status.get(s, 0)}</td>' for s in JobStatus)
            + "</tr>"
            for tag, st in snap.tags.items()
        )
        head = "".join(f"<th>{e(s.value)}</th>" for s in JobStatus)
        tags = (
            f"<h2>By tag</h2><table><tr><th>tag</th>{head}</tr>{tag_rows}</table>"
            if snap.tags
            else '<p class="muted">no tagged jobs in the last hour</p>'
        )
        live = (
            f'<div class="cards">{cards}{total}</div>'
            f"<p>Oldest waiting job: <b data-oldest>{e(_age(snap.oldest_waiting, snap.at))}</b>"
            f' <span class="muted">(as of {e(snap.at.strftime("%H:%M:%S"))} UTC)</span></p>'
            f"{tags}<h2>Last hour</h2>"
            f"{_bars(snap.throughput, 'Completed per minute', 'jobs')}"
            f"{_bars(snap.wait, 'Median queue wait of jobs started per minute', 's')}"
        )
        return self.respond(request, "Overview", "", live)

    async def overview_json(self, request: Request) -> Response:
        snap = await self.dash.overview()
        return JSONResponse(
            {
                "stats": stats_json(snap.stats),
                "tags": {t: stats_json(s) for t, s in snap.tags.items()},
                "oldest_waiting": snap.oldest_waiting.isoformat() if snap.oldest_waiting else None,
                "throughput_per_minute": snap.throughput,
                "median_wait_per_minute": snap.wait,
            }
        )

    # -- jobs --

    async def jobs(self, request: Request) -> Response:
        q = request.query_params
        statuses = q.getlist("status")
        tags = [t for t in q.getlist("tag") if t]
        job_type = q.get("type") or None
        try:
            limit = int(q.get("limit") or 50)
        except ValueError:
            return _bad(f"limit must be a whole number, got {q.get('limit')!r}")
        after = q.get("after") or None
        try:
            wanted = [JobStatus(s) for s in statuses if s]
        except ValueError as exc:
            return _bad(f"bad status filter: {exc}")

        key = "jobs?" + urlencode(
            [("s", s) for s in sorted(statuses)]
            + [("t", t) for t in tags]
            + [("y", job_type or ""), ("l", str(limit)), ("a", after or "")]
        )

        async def fetch() -> JobPage:
            return await self.queue.list_jobs(
                statuses=wanted or None,
                tags=tags or None,
                job_type=job_type,
                limit=limit,
                after=after,
            )

        try:
            page: JobPage = await self.dash.cache.get(key, fetch)
        except (ValueError, TypeError) as exc:
            return _bad(str(exc))
        base = self.base(request)
        rows = "".join(
            "<tr>"
            + (
                ""
                if self.read_only
                else f'<td><input type="checkbox" name="id" value="{e(j.id)}" form="sel"></td>'
            )
            + f"<td>{self.job_link(request, j.id)}</td><td>{e(j.job_type)}</td>"
            f'<td data-status="{e(j.status.value)}">{e(j.status.value)}</td>'
            f"<td>{e(', '.join(j.tags))}</td>"
            f"<td>{e(j.created_at.strftime('%Y-%m-%d %H:%M:%S'))}</td>"
            f'<td class="num">{j.retry_count}</td><td>{e(j.assignee_id)}</td></tr>'
            for j in page.jobs
        )
        sel = "" if self.read_only else '<th><input type="checkbox" data-all title="all"></th>'
        nxt = ""
        if page.next_after:
            params = [(k, v) for k, v in q.multi_items() if k not in ("after", "fragment")]
            href = f"{base}/jobs?{urlencode([*params, ('after', page.next_after)])}"
            nxt = f'<p><a href="{e(href)}" rel="next">next page →</a></p>'
        if after:
            params = [(k, v) for k, v in q.multi_items() if k not in ("after", "fragment")]
            first = f"{base}/jobs?{urlencode(params)}"
            nxt = f'<p><a href="{e(first)}" rel="first">← newest</a></p>' + nxt
        live = (
            f"<table id=jobs><tr>{sel}<th>id</th><th>type</th><th>status</th><th>tags</th>"
            f"<th>created (UTC)</th><th>retries</th><th>assignee</th></tr>{rows}</table>"
            f"<p class=muted>{len(page.jobs)} shown</p>{nxt}"
        )
        opts = "".join(
            f'<option value="{e(s.value)}"{" selected" if s.value in statuses else ""}>'
            f"{e(s.value)}</option>"
            for s in JobStatus
        )
        filters = (
            f'<form method="get" action="{e(base)}/jobs" id="filters">'
            f'<label>status <select name="status" multiple size="3">{opts}</select></label> '
            f'<label>tag <input name="tag" value="{e(tags[0] if tags else "")}"></label> '
            f'<label>type <input name="type" value="{e(job_type or "")}"></label> '
            f'<label>limit <input name="limit" value="{limit}" size="4"></label> '
            '<button type="submit">Filter</button></form>'
        )
        bulk = ""
        if not self.read_only:
            buttons = "".join(
                f'<button type="submit" name="action" value="{e(a)}">{e(label)} selected</button> '
                for a, label in self.actions()
            )
            bulk = (
                f'<form method="post" action="{e(base)}/actions/selected" id="sel">'
                f'<input type="hidden" name="csrf" value="{e(self.csrf)}">'
                f'<input type="hidden" name="step" value="confirm">{buttons}</form>'
            )
            if wanted or tags or job_type:  # the whole filtered selection, not only this page
                kept = [("status", s.value) for s in wanted] + [("tag", t) for t in tags]
                kept += [("type", job_type)] if job_type else []
                hidden = "".join(
                    f'<input type="hidden" name="{e(k)}" value="{e(v)}">' for k, v in kept
                )
                every = "".join(
                    f'<button type="submit" name="action" value="{e(a)}">'
                    f"{e(label)} all matching</button> "
                    for a, label in self.actions()
                )
                bulk += (
                    f'<form method="post" action="{e(base)}/actions/selected" id="matching">'
                    f'<input type="hidden" name="csrf" value="{e(self.csrf)}">'
                    '<input type="hidden" name="scope" value="filter">'
                    f'<input type="hidden" name="step" value="confirm">{hidden}{every}</form>'
                )
        return self.respond(request, "Jobs", "jobs", live, filters + bulk)

    async def matching(self, form: _Form) -> list[str] | str:
        """Ids of every job matching the form's filters (at most MAX_SELECTED), or why not."""
        try:
            statuses = [JobStatus(s) for s in form.getlist("status") if s]
        except ValueError as exc:
            return f"bad status filter: {exc}"
        tags = [t for t in form.getlist("tag") if t]
        job_type = form.get("type") or None
        ids: list[str] = []
        after: str | None = None
        while True:
            page = await self.queue.list_jobs(
                statuses=statuses or None,
                tags=tags or None,
                job_type=job_type,
                limit=MAX_LIMIT,
                after=after,
            )
            ids += [j.id for j in page.jobs]
            if len(ids) > MAX_SELECTED:
                return f"more than {MAX_SELECTED:,} jobs match: narrow the filter"
            if page.next_after is None:
                return ids
            after = page.next_after

    async def job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]

        async def fetch() -> Job | None:
            try:
                return await self.queue.get_job(job_id)
            except JobNotFoundError:
                return None

        job: Job | None = await self.dash.cache.get("job:" + job_id, fetch)
        if job is None:
            return HTMLResponse(
                self.page(
                    request,
                    "Not found",
                    "jobs",
                    f'<p class="msg err">No job with id {e(job_id)}.</p>',
                ),
                status_code=404,
            )
        fields = "".join(
            f'<tr><th>{e(k)}</th><td data-field="{e(k)}">{e(v)}</td></tr>'
            for k, v in job_json(job).items()
        )
        blobs = ""
        for name, data in (("job_definition", job.job_definition), ("result", job.result)):
            if data is None:
                blobs += f"<h2>{e(name)}</h2><p class=muted>none</p>"
                continue
            kind, text = preview(data)
            blobs += (
                f"<h2>{e(name)} <small>{len(data)} bytes, {e(kind)}</small></h2>"
                f"<pre>{e(text)}</pre>"
            )
        error = (
            f"<h2>error_message</h2><pre>{e(job.error_message)}</pre>" if job.error_message else ""
        )
        acts = " ".join(
            self.action_form(request, a, [job.id], label) for a, label in self.actions()
        )
        live = f"<table>{fields}</table>{error}{blobs}"
        return self.respond(request, f"Job {job.id}", "jobs", live, f"<p>{acts}</p>")

    async def workers(self, request: Request) -> Response:
        rows = await self.dash.cache.get("workers", lambda: active_assignees(self.queue))
        base = self.base(request)

        def when(value: datetime | None) -> str:
            return e(value.strftime("%Y-%m-%d %H:%M:%S")) if value else "-"

        body = ""
        for r in rows:
            lease = r["lease"]
            if lease is None:
                state, lease_cells = "no lease", "<td>-</td><td>-</td><td>-</td>"
            else:
                state = "live" if lease["live"] else "expired"
                lease_cells = (
                    f"<td>{when(lease['renewed_at'])}</td><td>{when(lease['expires_at'])}</td>"
                    f"<td>{e(', '.join(lease['holders']))}</td>"
                )
            body += (
                f"<tr><td>{e(r['assignee_id'])}</td><td class=num>{r['running']}</td>"
                f"<td class=num>{r['cancelling']}</td><td>{when(r['since'])}</td>"
                f'<td data-lease="{e(state)}">{e(state)}</td>{lease_cells}'
                f'<td><a href="{e(base)}/jobs?status=running&amp;'
                'status=cancelling">jobs</a></td></tr>'
            )
        live = (
            "<table><tr><th>assignee</th><th>running</th><th>cancelling</th>"
            "<th>holding since (UTC)</th><th>lease</th><th>renewed</th><th>expires</th>"
            f"<th>holders</th><th></th></tr>{body}</table>"
            "<p class=muted>Assignees holding RUNNING or CANCELLING jobs now, and every "
            "lease the store keeps (an expired lease's jobs are rescued).</p>"
        )
        return self.respond(request, "Workers", "workers", live)

    # -- actions --

    async def act(self, request: Request) -> Response:
        if self.read_only:
            return PlainTextResponse("the dashboard is read-only", status_code=403)
        form = await _form(request)
        if form is None:
            return _bad("expected a form (application/x-www-form-urlencoded) of at most 1 MB")
        token = form.get("csrf", "")
        if not hmac.compare_digest(token, self.csrf) or not _same_origin(request):
            return PlainTextResponse(
                "refused: not a request from this dashboard's own page (cross-site)",
                status_code=403,
            )
        action = request.path_params["action"]
        if action == "selected":
            action = form.get("action", "")
        if action not in dict(self.actions()):
            return _bad(f"unknown action {action!r}")
        if form.get("scope") == "filter":
            found = await self.matching(form)
            if isinstance(found, str):
                return _bad(found)
            ids = found
        else:
            ids = list(dict.fromkeys(i for i in form.getlist("id") if i))
        if not ids:
            return _bad("no jobs selected (or none match)")
        base = self.base(request)
        label = dict(self.actions())[action]
        if form.get("step") != "do":
            hidden = "".join(f'<input type="hidden" name="id" value="{e(i)}">' for i in ids)
            listing = "".join(f"<li>{self.job_link(request, i)}</li>" for i in ids[:200])
            more = f"<li>… and {len(ids) - 200} more</li>" if len(ids) > 200 else ""
            body = (
                f"<p>{e(label)} these {len(ids)} job(s)?</p><ul>{listing}{more}</ul>"
                f'<form method="post" action="{e(base)}/actions/{e(action)}">'
                f'<input type="hidden" name="csrf" value="{e(self.csrf)}">{hidden}'
                '<button type="submit" name="step" value="do" id="confirm">'
                f"Yes, {e(label.lower())}</button> "
                f'<a href="{e(base)}/jobs">No, back</a></form>'
            )
            return HTMLResponse(self.page(request, f"Confirm: {label}", "jobs", body))
        message = await self.perform(action, ids)
        self.dash.cache.forget()
        return HTMLResponse(
            self.page(
                request,
                f"{label}: done",
                "jobs",
                f'<div class="msg" id="outcome">{message}</div>'
                f'<p><a href="{e(base)}/jobs">back to jobs</a></p>',
            )
        )

    async def perform(self, action: str, ids: list[str]) -> str:
        """Do ``action`` on ``ids``; say (as HTML) what happened to each."""
        if action == "cancel":
            res = await self.queue.cancel_jobs(job_ids=ids)
            lines = [f"Cancelled {len(res.cancelled)}: {e(', '.join(res.cancelled)) or '-'}."]
            if res.unknown:
                lines.append("Not cancelled: " + await self._why(res.unknown) + ".")
            return "<br>".join(lines)
        if action == "delete":
            try:
                n = await self.queue.delete_jobs(job_ids=ids)
            except JobsNotFinalError as exc:
                return (
                    "Deleted nothing: not final (cancel them first): "
                    + await self._why(exc.job_ids)
                    + "."
                )
            return f"Deleted {n} of {len(ids)} (the others no longer existed)."
        requeue = self.queue.requeue_jobs
        moved = list(await requeue(job_ids=ids))
        rest = [i for i in ids if i not in set(moved)]
        text = f"Requeued {len(moved)}: {e(', '.join(moved)) or '-'}."
        if rest:
            text += "<br>Not requeued: " + await self._why(rest) + "."
        return text

    async def _why(self, ids: Sequence[str]) -> str:
        jobs = {j.id: j for j in await self.queue.get_jobs(list(ids))}
        return ", ".join(
            f"{e(i)} ({e(jobs[i].status.value) if i in jobs else 'no such job'})" for i in ids
        )

    # -- machine endpoints --

    async def healthz(self, request: Request) -> Response:
        try:
            await self.dash.cache.get("health", self.queue.get_job_stats)
        except Exception as exc:  # any failure to read the store is "unhealthy"
            return PlainTextResponse(f"unhealthy: {type(exc).__name__}: {exc}", status_code=503)
        return PlainTextResponse("ok")

    async def metrics(self, request: Request) -> Response:
        await self.dash.overview()
        return Response(generate_latest(self.registry), media_type="text/plain; version=0.0.4")

    registry: CollectorRegistry


class _Form:
    """A parsed urlencoded form (the dashboard's forms are small; no multipart)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def get(self, key: str, default: str = "") -> str:
        return next((v for k, v in self.pairs if k == key), default)

    def getlist(self, key: str) -> list[str]:
        return [v for k, v in self.pairs if k == key]


async def _form(request: Request) -> _Form | None:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > 1 << 20:
            return None
    try:
        return _Form(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except (UnicodeDecodeError, ValueError):
        return None


def _bad(message: str) -> Response:
    return HTMLResponse(
        f"<!doctype html><title>Bad request</title><p>Bad request: {e(message)}</p>",
        status_code=400,
    )


def _same_origin(request: Request) -> bool:
    """Refuse a request another site's page made: its ``Origin`` (or, without one,
    ``Referer``) must be this host; ``Sec-Fetch-Site`` must not say cross-site."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source:
        return True  # not a browser (curl, tests): the CSRF token still had to match
    return urlsplit(source).netloc == request.headers.get("host", "")


class _Auth(BaseHTTPMiddleware):
    """Basic auth and/or a bearer token on every path except ``/healthz``."""

    def __init__(self, app: Any, basic: str | None, token: str | None) -> None:
        super().__init__(app)
        self.basic = basic
        self.token = token

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        path, root = request.url.path, str(request.scope.get("root_path", ""))
        if path.startswith(root):
            path = path[len(root) :]
        if path == "/healthz" or self._allowed(request.headers.get("authorization", "")):
            return await call_next(request)
        headers = {"WWW-Authenticate": 'Basic realm="jobpool"'} if self.basic else {}
        return PlainTextResponse("authentication required", status_code=401, headers=headers)

    def _allowed(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if self.token and scheme.lower() == "bearer":
            return hmac.compare_digest(value.strip().encode(), self.token.encode())
        if self.basic and scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(given, self.basic.encode())
        return False


def create_app(
    queue: PoolQueue,
    *,
    read_only: bool = False,
    basic_auth: str | None = None,
    token: str | None = None,
    refresh: float = 1.0,
    tags: Sequence[str] | None = None,
    own_queue: bool = False,
) -> Starlette:
    """The dashboard for ``queue`` as an ASGI app.

    ``read_only`` hides and refuses actions. ``basic_auth`` (``"user:pass"``) and/or
    ``token`` (a bearer token) require credentials on every path but ``/healthz``.
    ``refresh``: seconds a snapshot of each view is shared between viewers (the store
    is read at most once per view kind per ``refresh``), also the browsers' polling
    interval. ``tags``: the tags the overview counts (default: the most frequent among
    the jobs of the last hour). ``own_queue``: close the queue when the app shuts down.
    """
    if not isinstance(queue, PoolQueue):
        raise TypeError(f"queue must be a PoolQueue, got {type(queue).__name__}")
    if basic_auth is not None and ":" not in basic_auth:
        raise ValueError("basic_auth must be 'user:password'")
    if not refresh > 0:
        raise ValueError(f"refresh must be positive, got {refresh!r}")
    dash = _Dashboard(queue, refresh, tags)
    pages = _Pages(dash, read_only, refresh)
    pages.registry = CollectorRegistry(auto_describe=False)
    pages.registry.register(_Collector(dash))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await queue.open()
        try:
            yield
        finally:
            if own_queue:
                await queue.close()

    middleware = [Middleware(_Auth, basic=basic_auth, token=token)] if (basic_auth or token) else []
    app = Starlette(
        routes=[
            Route("/", pages.overview),
            Route("/api/overview", pages.overview_json),
            Route("/jobs", pages.jobs),
            Route("/jobs/{job_id:path}", pages.job),
            Route("/workers", pages.workers),
            Route("/actions/{action}", pages.act, methods=["POST"]),
            Route("/healthz", pages.healthz),
            Route("/metrics", pages.metrics),
        ],
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={500: _server_error},
    )
    app.state.jobpool = dash
    return app


async def _server_error(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(f"the dashboard failed: {type(exc).__name__}: {exc}", status_code=500)
